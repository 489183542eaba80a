"""A sweep worker killed mid-trial (issue 11, docs/reliability.md): the rerun fails that trial, closes its MLflow run,
drops its resume folder, retries its parameters once and completes the missing trials; the study stays loadable
with every trial in a final state. The kill is real and exact: the worker SIGKILLs itself when it is about to move
its first checkpoint into place (an audit hook on os.rename)."""
from __future__ import annotations

import signal
import sys

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from conftest import make_study, run, tiny_params

KILL_AT = r"""
import os, signal, sys
event, part = sys.argv[1], sys.argv[2]
sys.addaudithook(lambda e, args: e == event and part in str(args[0]) and os.kill(os.getpid(), signal.SIGKILL))
from clex.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_killed_sweep_worker_trial_is_failed_retried_and_the_study_completed(tmp_path):
    name = "killed"
    params = tiny_params()
    params["sweep"].update(name=name, trials=2, sampler="random", startup_trials=2)
    study = make_study(tmp_path / "study", params)
    run(study, "dvc", "repro", "pretrain")
    proc = run(study, sys.executable, "-c", KILL_AT, "os.rename", "last.ckpt", "sweep", check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    storage = f"sqlite:///{study / 'build/sweeps' / name}.db"
    (killed,) = optuna.load_study(study_name=name, storage=storage).trials
    assert killed.state == TrialState.RUNNING and (study / f"build/resume/sweeps/{name}/trial0").exists()

    run(study, "clex", "sweep")
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2 and trials[0].state == TrialState.FAIL
    assert {t.state for t in trials} == {TrialState.FAIL, TrialState.COMPLETE}  # nothing left RUNNING or WAITING
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert not (study / f"build/resume/sweeps/{name}/trial0").exists()
    assert not [p for p in (study / "build/resume").rglob("*") if p.is_file()]
    c = mlflow.MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    exp_id = c.get_experiment_by_name("clex-study").experiment_id
    runs = c.search_runs([exp_id], f"tags.sweep = '{name}' and tags.role = 'sweep_trial'")
    by_number = {}
    for r in runs:
        by_number.setdefault(int(r.data.tags["trial_number"]), []).append((r.info.status, r.data.tags["state"]))
    assert by_number == {0: [("KILLED", "failed")], **{t.number: [("FINISHED", "complete")] for t in trials[1:]}}
    frame = pd.read_csv(study / f"reports/sweeps/{name}/trials.csv")
    assert list(frame.number) == [t.number for t in trials] and list(frame.state)[0] == "fail"
    assert yaml.safe_load((study / f"reports/sweeps/{name}/best.yaml").read_text())["extends"] == "clex"
