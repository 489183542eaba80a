"""`clex sweep` on real stores: a DVC stage, an Optuna sqlite storage, MLflow parent and nested trial runs,
pruning, resumption, several workers on one storage, and the best trial as an experiment YAML."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from clex.config import load_study
from conftest import make_study, run, tiny_params


def _params(**sweep) -> dict:
    params = tiny_params()
    params["sweep"].update(sweep)
    return params


def _write(study: Path, params: dict) -> None:
    (study / "params.yaml").write_text(yaml.safe_dump(params))


def _optuna(study: Path, name: str, storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{study / 'build/sweeps' / name}.db")


def _mlflow_runs(study: Path, name: str) -> tuple[mlflow.MlflowClient, list, list]:
    client = mlflow.MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clex-study")
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{name}'", max_results=1000)
    return client, [r for r in runs if r.data.tags["role"] == "sweep"], [r for r in runs if r.data.tags["role"] == "sweep_trial"]


@pytest.fixture(scope="module")
def sweep_study(tmp_path_factory) -> Path:
    """A tiny study of its own (the sweep tests change params.yaml): data prepared, base model trained."""
    study = make_study(tmp_path_factory.mktemp("sweep"), _params(sampler="random", startup_trials=1))
    run(study, "dvc", "repro", "pretrain")
    return study


def test_dvc_stage_records_trials_prunes_and_resumes(sweep_study):
    study, name = sweep_study, "ode_width_tmax"
    proc = run(study, "dvc", "repro", f"sweeps/{name}")
    assert f"Running stage 'sweeps/{name}'" in proc.stdout

    st = _optuna(study, name)
    assert [t.state for t in st.trials] == [TrialState.COMPLETE] * 3
    client, parents, trials = _mlflow_runs(study, name)
    assert len(parents) == 1 and len(trials) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna_study"] == name
    assert parent.data.params["space.ode_width"] == "[1, 2]" and parent.data.params["space.t_max"] == "[2, 4]"
    by_number = {int(r.data.tags["trial_number"]): r for r in trials}
    for t in st.trials:  # each trial: one nested run with its params, intermediate values and final objective
        r = by_number[t.number]
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.data.tags["state"] == "complete"
        assert r.info.status == "FINISHED" and t.user_attrs["mlflow_run_id"] == r.info.run_id
        assert int(r.data.params["trial.ode_width"]) == t.params["ode_width"]
        assert int(r.data.params["trial.t_max"]) == t.params["t_max"]
        history = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "val_ppl")}
        assert history == pytest.approx(t.intermediate_values) and sorted(history) == [1, 2, 3]
        assert r.data.metrics["objective"] == pytest.approx(t.value) == pytest.approx(history[3])
        assert r.data.metrics["val_ppl_64"] == pytest.approx(t.value)  # one objective length: 2×L = 64
        # what every CLEX fine-tune records: the recipe knobs, the basis monitor, the solver check
        rope_step, scale = float(r.data.params["finetune.rope_step"]), float(r.data.params["rope_step_scale"])
        assert float(r.data.params["rope_lr_resolved"]) == pytest.approx(rope_step / scale)  # lr = rope_step / S
        assert "finetune.accumulate" in r.data.params
        monitored = client.get_metric_history(r.info.run_id, f"basis_max_dz_t{t.params['t_max']}")
        assert [m.step for m in monitored] == [1, 2, 3] and 0 <= r.data.metrics["solver_max_rel_error"] < 1e-4
    metrics = json.loads((study / f"reports/sweeps/{name}/metrics.json").read_text())
    assert metrics["best_value"] == pytest.approx(st.best_value) and metrics["trials_complete"] == 3
    frame = pd.read_csv(study / f"reports/sweeps/{name}/trials.csv")
    assert list(frame.number) == [0, 1, 2] and set(frame.state) == {"complete"}

    # three finished trials far better than anything this model reaches: every new trial is pruned at step 1
    for _ in range(3):
        st.add_trial(optuna.trial.create_trial(
            params={"ode_width": 1, "t_max": 2}, value=1.0, intermediate_values={1: 1.0, 2: 1.0, 3: 1.0},
            distributions={"ode_width": IntDistribution(1, 2, log=True), "t_max": IntDistribution(2, 4, log=True)}))
    _write(study, _params(sampler="random", startup_trials=1, trials=8))  # only the budget changes: same study
    run(study, "dvc", "repro", f"sweeps/{name}")
    st = _optuna(study, name)
    assert [t.state for t in st.trials[6:]] == [TrialState.PRUNED] * 2 and len(st.trials) == 8
    assert all(list(t.intermediate_values) == [1] for t in st.trials[6:])
    client, parents, trials = _mlflow_runs(study, name)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # the same parent run continues
    pruned = [r for r in trials if r.data.tags["state"] == "pruned"]
    assert sorted(int(r.data.tags["trial_number"]) for r in pruned) == [6, 7]
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in pruned)
    assert all([m.step for m in client.get_metric_history(r.info.run_id, "val_ppl")] == [1] for r in pruned)
    assert [t.user_attrs["mlflow_run_id"] for t in st.trials[6:]] == [
        next(r.info.run_id for r in pruned if r.data.tags["trial_number"] == str(t.number)) for t in st.trials[6:]]
    metrics = json.loads((study / f"reports/sweeps/{name}/metrics.json").read_text())
    assert (metrics["trials_pruned"], metrics["pruned_share"], metrics["best_value"]) == (2, 0.25, 1.0)

    # the same name with other settings is refused before any compute, and nothing is added
    _write(study, _params(sampler="random", startup_trials=1, trials=9, t_max=[2, 8]))
    proc = run(study, "clex", "sweep", check=False)
    assert proc.returncode == 2
    assert "sweep.name: 'ode_width_tmax' already holds a study" in proc.stderr and "(sweep differ)" in proc.stderr
    assert len(_optuna(study, name).trials) == 8
    _write(study, _params(sampler="random", startup_trials=1))


def test_best_trial_yaml_is_an_experiment_the_pipeline_trains(sweep_study, tmp_path):
    best = sweep_study / "reports/sweeps/ode_width_tmax/best.yaml"
    study = make_study(tmp_path / "copy")
    for folder in ("build/data", "build/base"):
        shutil.copytree(sweep_study / folder, study / folder)
    shutil.copy(best, study / "experiments/clex_swept.yaml")
    spec = yaml.safe_load(best.read_text())
    exp = load_study(study).experiment("clex_swept")
    assert spec["extends"] == "clex" and exp.rope.type == "clex"
    assert (exp.rope.ode_width, exp.rope.t_max) == (spec["rope"]["ode_width"], spec["rope"]["t_max"])
    run(study, "clex", "finetune", "clex_swept", "--seed", "0")
    info = json.loads((study / "build/finetune/clex_swept/seed0/run.json").read_text())
    assert len(json.loads((study / "build/finetune/clex_swept/seed0/frequencies.json").read_text())["t"]) == exp.rope.t_max
    assert info["steps"] == 3


def test_workers_share_one_storage_without_losing_a_trial(sweep_study):
    """Two commands at once on one sqlite storage given by URL, one of them with two worker processes: three writers."""
    study, name = sweep_study, "parallel"
    storage = f"sqlite:///{study / 'shared' / 'optuna.db'}"  # any SQLAlchemy URL; sqlite is what this machine has
    _write(study, _params(name=name, trials=5, sampler="random", startup_trials=5, storage=storage))
    env_run = [str(Path(sys.executable).parent / "clex"), "sweep"]
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{study / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen(env_run + extra, cwd=study, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for extra in (["--workers", "2"], [])]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
        assert "database is locked" not in "".join(outputs)
    finally:
        _write(study, _params(sampler="random", startup_trials=1))
    st = _optuna(study, name, storage)
    assert not (study / "build/sweeps/parallel.db").exists()
    states = [t.state for t in st.trials]
    assert states.count(TrialState.COMPLETE) >= 5 and TrialState.FAIL not in states and TrialState.RUNNING not in states
    client, parents, trials = _mlflow_runs(study, name)
    assert len(parents) == 1, "every worker must share the study's one parent run"
    numbers = sorted(int(r.data.tags["trial_number"]) for r in trials)
    assert numbers == [t.number for t in st.trials]  # one MLflow run per trial: none lost, none doubled
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    assert all(r.info.status == "FINISHED" and r.data.tags["state"] == "complete" for r in trials)


@pytest.mark.slow
def test_rerun_retries_the_trial_of_a_killed_worker(sweep_study):
    """SIGKILL a worker mid-trial; the rerun fails that trial once its heartbeat is stale, closes its MLflow
    run, and runs it again with the same parameters."""
    study, name = sweep_study, "killed"
    params = _params(name=name, trials=2, sampler="random", startup_trials=2, val_every_n_steps=100)
    params["finetune"]["steps"] = 300
    _write(study, params)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{study / 'mlflow.db'}"}
    try:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "clex"), "sweep"], cwd=study, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120  # wait until the first trial's run exists, then a little into its training
        while time.time() < deadline and proc.poll() is None and not _mlflow_runs(study, name)[2]:
            time.sleep(0.5)
        time.sleep(2)
        assert proc.poll() is None, "the trial ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = _optuna(study, name).trials[0]
        assert killed.state == TrialState.RUNNING
        run(study, "clex", "sweep")
    finally:
        _write(study, _params(sampler="random", startup_trials=1))
    st = _optuna(study, name)
    assert st.trials[0].state == TrialState.FAIL
    done = [t for t in st.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    retried = [t for t in done if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].params == killed.params
    client, _, trials = _mlflow_runs(study, name)
    first = [r for r in trials if r.data.tags["trial_number"] == "0"]
    assert [(r.info.status, r.data.tags["state"]) for r in first] == [("KILLED", "failed")]
