"""The real pipeline, end to end, on the tiny profile: `dvc repro`, the report, DVC metrics, MLflow runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import yaml

from conftest import run, tiny_params


def _runs(study):
    client = mlflow.MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clex-study")
    return client, exp, client.search_runs([exp.experiment_id], max_results=1000)


def test_dvc_repro_ablation_end_to_end(repro_study):
    study, proc = repro_study
    assert "Running stage 'ablations/discrete_vs_continuous'" in proc.stdout

    table = (study / "reports/discrete_vs_continuous/table.md").read_text()
    protocols = tiny_params()["eval"]["protocols"]
    assert f"Eval protocols: **{protocols[0]}** (primary)" in table
    assert all(f"## Protocol `{p}`" in table for p in protocols)
    for row in ("| naive_ft |", "| clex |", "| clex_discrete |", "| base (plain RoPE, no fine-tune) |"):
        assert row in table
    assert " ± " in table  # two seeds: a CI per cell
    assert "5.86 / " in table and "7.13 / " in table  # the paper's numbers beside ours
    assert (study / "reports/discrete_vs_continuous/ppl_vs_length.png").stat().st_size > 10_000

    shown = json.loads(run(study, "dvc", "metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]["reports/discrete_vs_continuous/metrics.json"]["data"]
    assert set(metrics) == {"base", "naive_ft", "clex", "clex_discrete"}
    assert set(metrics["clex"]) == {"ppl", "val_ppl", "passkey_acc"} and set(metrics["clex"]["ppl"]) == set(protocols)
    assert set(metrics["clex"]["ppl"][protocols[0]]) == set(metrics["clex"]["passkey_acc"]) == {"32", "64", "128"}
    assert "## Passkey retrieval" in table and "| clex | 0.5 |" in table  # per length and per depth
    assert all(0 <= v <= 1 for v in metrics["clex"]["passkey_acc"].values())

    client, exp, runs = _runs(study)
    by_role = {}
    for r in runs:
        by_role.setdefault(r.data.tags["role"], []).append(r)
    pipeline_roles = ("pretrain", "finetune", "evaluate", "report")  # other tests may add sweep runs to this store
    n_protocols = len(tiny_params()["eval"]["protocols"])  # one evaluation run per protocol
    assert {k: len(by_role[k]) for k in pipeline_roles} == {"pretrain": 1, "finetune": 6, "evaluate": 7 * n_protocols,
                                                            "report": 1}
    assert all(r.info.status == "FINISHED" for role in pipeline_roles for r in by_role[role])
    assert exp.artifact_location == (study / "mlruns").as_uri()
    for r in by_role["evaluate"]:
        tags = r.data.tags
        for key in ("experiment", "seed", "ablations", "git_commit", "data_hash", "checkpoint_sha256",
                    "eval_protocol", "dvc_stage", "mlflow.parentRunId"):
            assert tags.get(key), key
        history = client.get_metric_history(r.info.run_id, "ppl")
        assert sorted(m.step for m in history) == [32, 64, 128]  # step = length: PPL-vs-length curves
        primary = r.data.tags["eval_primary"] == "true"  # passkey: scored once, on the primary protocol's run
        assert primary == (r.data.tags["eval_protocol"] == tiny_params()["eval"]["protocols"][0])
        passkey = client.get_metric_history(r.info.run_id, "passkey_acc")
        assert sorted(m.step for m in passkey) == ([32, 64, 128] if primary else [])
        assert ("passkey_acc_128_depth0.5" in r.data.metrics) == primary
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_ppl")) == [32, 64, 128]
        assert r.data.params["model.train_len"] == "32"
    finetunes = {r.data.tags["dvc_stage"]: r for r in by_role["finetune"]}
    assert set(finetunes) == {f"finetune@{e}-{s}" for e in ("naive_ft", "clex", "clex_discrete") for s in (0, 1)}
    clex = finetunes["finetune@clex-0"]
    assert [m.step for m in client.get_metric_history(clex.info.run_id, "train_loss")] == [0, 1, 2]
    assert client.get_metric_history(clex.info.run_id, "lr") and client.get_metric_history(clex.info.run_id, "val_loss")
    artifacts = {a.path for a in client.list_artifacts(clex.info.run_id)}
    assert {"frequencies.json", "run.json"} <= artifacts
    assert "clex-study" in [e.name for e in client.search_experiments()]

    # every report number is the tracked run's number
    record = json.loads((study / "build/eval/clex/seed1.json").read_text())
    tracked = {m.step: m.value for m in client.get_metric_history(record["run_id"], "ppl")}
    assert tracked == {int(k): v for k, v in record["ppl"].items()}

    # a second repro changes nothing and adds no run
    again = run(study, "dvc", "repro", "ablations/discrete_vs_continuous")
    assert "didn't change, skipping" in again.stdout or "Data and pipelines are up to date" in again.stdout
    assert len(_runs(study)[2]) == len(runs)

    # another ablation reuses the cached base and clex runs and trains only what it adds
    other = run(study, "dvc", "repro", "ablations/constant_term")
    assert "Running stage 'pretrain'" not in other.stdout and "Running stage 'finetune@clex-0'" not in other.stdout
    table = (study / "reports/constant_term/table.md").read_text()
    assert "| clex_no_xi |" in table and "5.88 / " in table
    added = {}
    for r in _runs(study)[2][: len(_runs(study)[2]) - len(runs)]:  # newest first
        added[r.data.tags["role"]] = added.get(r.data.tags["role"], 0) + 1
    assert added == {"finetune": 2, "evaluate": 2 * n_protocols, "report": 1}

    # reuse experiments evaluate another's checkpoints: inference-time baselines naive_ft's, the attention log
    # scale clex's (the same fine-tune at N = L); no fine-tune stage of their own
    reuse = run(study, "dvc", "repro", "evaluate_on_naive_ft@dynamic_ntk-0", "evaluate_on_naive_ft@streaming-1",
                "evaluate_on_clex@clex_attn_log_scale-0")
    assert "Running stage 'finetune@" not in reuse.stdout
    client, _, after = _runs(study)
    for exp, seed, source in (("dynamic_ntk", 0, "naive_ft"), ("streaming", 1, "naive_ft"), ("clex_attn_log_scale", 0, "clex")):
        trained = {r.data.tags["seed"]: r.info.run_id for r in after
                   if r.data.tags.get("dvc_stage", "").startswith(f"finetune@{source}-")}
        record = json.loads((study / f"build/eval/{exp}/seed{seed}.json").read_text())
        assert record["reused_checkpoint_of"] == source and record["train_run_id"] == trained[str(seed)]
        tags = client.get_run(record["run_id"]).data.tags
        assert tags["checkpoint_of"] == source and tags["mlflow.parentRunId"] == trained[str(seed)]
        assert tags["dvc_stage"] == f"evaluate_on_{source}@{exp}-{seed}"
    clex_eval = json.loads((study / "build/eval/clex/seed0.json").read_text())["ppl"]
    log_scale = json.loads((study / "build/eval/clex_attn_log_scale/seed0.json").read_text())["ppl"]
    assert log_scale["32"] == clex_eval["32"] and log_scale["128"] != clex_eval["128"]  # the factor acts beyond L only
    # the window (round(0.977·32) = 31 plus 1 sink) only changes lengths beyond it
    naive_eval = json.loads((study / "build/eval/naive_ft/seed1.json").read_text())["ppl"]
    streaming = json.loads((study / "build/eval/streaming/seed1.json").read_text())["ppl"]
    assert streaming["32"] == naive_eval["32"] and streaming["128"] != naive_eval["128"]


def test_finetune_ddp_two_cpu_processes_logs_one_run(trained_study):
    params = tiny_params()
    params["trainer"].update(devices=2, strategy="ddp", accelerator="cpu")
    (trained_study / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        run(trained_study, "clex", "finetune", "clex", "--seed", "1")
    finally:  # the study is shared by the session
        (trained_study / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    client, exp, runs = _runs(trained_study)
    mine = [r for r in runs if r.data.tags.get("dvc_stage") == "finetune@clex-1"]
    assert len(mine) == 1 and mine[0].info.status == "FINISHED"
    info = json.loads((trained_study / "build/finetune/clex/seed1/run.json").read_text())
    assert info["run_id"] == mine[0].info.run_id
    assert info["train_tokens"] == 3 * 2 * 4 * 32  # steps x ranks x batch x L: both ranks trained


def test_rerun_closes_runs_a_killed_stage_left_running(trained_study):
    """A process killed mid-stage leaves its MLflow run RUNNING; the stage's next run marks it KILLED."""
    client, exp, _ = _runs(trained_study)
    stale = {stage: client.create_run(exp.experiment_id, tags={"dvc_stage": stage, "role": role}).info.run_id
             for stage, role in (("finetune@naive_ft-0", "finetune"), ("evaluate@naive_ft-0", "evaluate"))}
    other = client.create_run(exp.experiment_id, tags={"dvc_stage": "finetune@clex-0"}).info.run_id
    run(trained_study, "clex", "finetune", "naive_ft", "--seed", "0")
    run(trained_study, "clex", "evaluate", "naive_ft", "--seed", "0")
    for stage, run_id in stale.items():
        assert client.get_run(run_id).info.status == "KILLED"
        mine = [r for r in _runs(trained_study)[2] if r.data.tags.get("dvc_stage") == stage]
        finished = 1 if stage.startswith("finetune") else len(tiny_params()["eval"]["protocols"])  # a run per protocol
        assert sorted(r.info.status for r in mine) == ["FINISHED"] * finished + ["KILLED"]
    assert client.get_run(other).info.status == "RUNNING"  # another stage's run is not touched
    client.set_terminated(other)


def test_killed_finetune_resumes_into_the_same_run(trained_study):
    """SIGKILL mid-training, rerun: it resumes from the last checkpoint and finishes the same MLflow run."""
    params = tiny_params()
    params["finetune"]["steps"] = 400
    params["trainer"].update(checkpoint_every_n_steps=5, val_every_n_steps=1000)
    (trained_study / "params.yaml").write_text(yaml.safe_dump(params))
    resume = trained_study / "build/resume/finetune@naive_ft-1"
    try:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "MLFLOW_TRACKING_URI": f"sqlite:///{trained_study / 'mlflow.db'}"}
        proc = subprocess.Popen(["clex", "finetune", "naive_ft", "--seed", "1"], cwd=trained_study, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while not (resume / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None, "training ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        state = json.loads((resume / "state.json").read_text())
        client, exp, runs = _runs(trained_study)
        mine = [r for r in runs if r.data.tags.get("dvc_stage") == "finetune@naive_ft-1"]
        assert [(r.info.run_id, r.info.status) for r in mine] == [(state["run_id"], "RUNNING")]

        run(trained_study, "clex", "finetune", "naive_ft", "--seed", "1")
        mine = [r for r in _runs(trained_study)[2] if r.data.tags.get("dvc_stage") == "finetune@naive_ft-1"]
        assert [(r.info.run_id, r.info.status) for r in mine] == [(state["run_id"], "FINISHED")]
        info = json.loads((trained_study / "build/finetune/naive_ft/seed1/run.json").read_text())
        assert info["run_id"] == state["run_id"] and info["steps"] == 400 and not resume.exists()
    finally:
        (trained_study / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
