"""A killed fine-tune resumes to exactly what an uninterrupted one gives (issue 11, docs/reliability.md): same
checkpoint bytes, same run.json metrics, same MLflow metric histories, one MLflow run; with and without gradient
accumulation. A checkpoint that does not load is moved aside (the run resumes from the previous one or restarts),
and a full disk while writing a checkpoint fails with one line and leaves the previous checkpoint whole.

Faults are real: the process SIGKILLs itself, or a file-size limit (RLIMIT_FSIZE) makes the kernel refuse the
checkpoint write, at a given optimizer step (DRIVER: a Lightning callback added to the stage's run; the
checkpoint callback runs after it, so "step 3" with checkpoints every 2 steps resumes from step 2), or the
process SIGKILLs itself at an audit event (a Python hook, `sys.addaudithook`)."""
from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import make_study, run, tiny_params

STEPS, EVERY = 6, 2  # optimizer steps; checkpoint and validation every EVERY steps

DRIVER = r"""
import dataclasses, os, resource, signal, sys
import lightning as L
import clex.train
from clex.cli import main

fault, at_step = sys.argv[1], int(sys.argv[2])
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
if fault == "after_outputs":  # killed when it drops its resume folder, its output already in place
    out = os.path.join("build", "finetune", sys.argv[4], "seed0", "run.json")
    sys.addaudithook(lambda event, args: event == "shutil.rmtree" and "/build/resume/" in str(args[0])
                     and os.path.exists(out) and os.kill(os.getpid(), signal.SIGKILL))

class Fault(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if fault == "kill" and trainer.global_step == at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if fault == "full_disk" and trainer.global_step == at_step:  # the checkpoint is far larger than 1 kB
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))

    def on_exception(self, trainer, pl_module, exception):  # before the logger closes its run: lift the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))

stage_run = clex.train.stage_run
clex.train.stage_run = lambda *a: dataclasses.replace(stage_run(*a), callbacks=[Fault()])
sys.exit(main(sys.argv[3:]))
"""


def _study(dest: Path, trained_study: Path) -> Path:
    """A study with the trained study's data and base model, fine-tuning STEPS steps."""
    params = tiny_params()
    params["finetune"]["steps"] = STEPS
    params["trainer"].update(checkpoint_every_n_steps=EVERY, val_every_n_steps=EVERY)
    study = make_study(dest, params)
    for d in ("build/data", "build/base"):
        shutil.copytree(trained_study / d, study / d)
    return study


def _finetune(study: Path, exp: str, fault: str | None = None, step: int = 0, check: bool = True):
    cmd = ["finetune", exp, "--seed", "0"]
    if fault is None:
        return run(study, "clex", *cmd)
    return run(study, sys.executable, "-c", DRIVER, fault, str(step), *cmd, check=check)


def _result(study: Path, exp: str) -> dict:
    """What an uninterrupted and a resumed fine-tune must share: checkpoint hash, steps, final metrics, every
    (metric, step, value) logged to MLflow (a resumed run logs the steps after its checkpoint twice, identically);
    and its stage's runs as (id, status)."""
    info = json.loads((study / f"build/finetune/{exp}/seed0/run.json").read_text())
    c = mlflow.MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    exp_id = c.get_experiment_by_name("clex-study").experiment_id
    runs = c.search_runs([exp_id], f"tags.dvc_stage = 'finetune@{exp}-0'")
    logged = {(key, m.step, m.value) for key in c.get_run(info["run_id"]).data.metrics if key != "train_tokens_per_s"
              for m in c.get_metric_history(info["run_id"], key)}
    return {"checkpoint_sha256": info["checkpoint_sha256"], "steps": info["steps"], "metrics": info["metrics"],
            "logged": logged, "runs": [(r.info.run_id, r.info.status) for r in runs], "run_id": info["run_id"]}


def _same(resumed: dict, uninterrupted: dict) -> None:
    for key in ("checkpoint_sha256", "steps", "metrics"):
        assert resumed[key] == uninterrupted[key], key
    assert resumed["logged"] == uninterrupted["logged"], sorted(resumed["logged"] ^ uninterrupted["logged"])[:6]
    assert resumed["runs"] == [(resumed["run_id"], "FINISHED")]  # one run: the one the killed attempt opened


@pytest.fixture(scope="module")
def uninterrupted(trained_study, tmp_path_factory):
    """The uninterrupted fine-tune's `_result` per experiment, computed once."""
    done = {}

    def get(exp: str) -> dict:
        if exp not in done:
            study = _study(tmp_path_factory.mktemp("uninterrupted"), trained_study)
            _finetune(study, exp)
            done[exp] = _result(study, exp)
        return done[exp]

    return get


def _killed(tmp_path: Path, trained_study: Path, exp: str, step: int) -> tuple[Path, Path, str]:
    """(study, resume folder, run id) of a fine-tune SIGKILLed at `step`, its MLflow run left RUNNING."""
    study = _study(tmp_path / "study", trained_study)
    proc = _finetune(study, exp, "kill", step, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    resume = study / f"build/resume/finetune@{exp}-0"
    run_id = json.loads((resume / "state.json").read_text())["run_id"]
    assert not (study / f"build/finetune/{exp}").exists()
    return study, resume, run_id


@pytest.mark.parametrize("exp", [pytest.param("clex_accum1", marks=pytest.mark.slow), "clex"])  # accumulate 1, 4
def test_killed_finetune_resumes_bit_for_bit(trained_study, tmp_path, uninterrupted, exp):
    study, resume, run_id = _killed(tmp_path, trained_study, exp, step=3)
    assert torch.load(resume / "last.ckpt", weights_only=False)["global_step"] == 2
    proc = _finetune(study, exp)
    resumed = _result(study, exp)
    assert resumed["run_id"] == run_id
    _same(resumed, uninterrupted(exp))
    assert "not resumable" not in proc.stderr and "does not load" not in proc.stderr
    assert not resume.exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_last_checkpoint_is_moved_aside_and_the_previous_one_resumed(trained_study, tmp_path, uninterrupted,
                                                                             damage):
    study, resume, run_id = _killed(tmp_path, trained_study, "clex", step=5)  # checkpoints at steps 2 and 4
    last = resume / "last.ckpt"
    data = last.read_bytes()
    bad = data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100
    last.write_bytes(bad)
    proc = _finetune(study, "clex")
    lines = [line for line in proc.stderr.splitlines() if "does not load" in line]
    (aside,) = study.glob("build/resume/finetune@clex-0.last.ckpt.corrupt-*")
    assert lines == [f"finetune@clex-0: {last} does not load ({lines[0].split('(', 1)[1].split(')')[0]}); moved aside "
                     f"to {aside}; resuming from last.ckpt.prev (step 2)"]
    assert aside.read_bytes() == bad  # kept, not deleted
    resumed = _result(study, "clex")
    assert resumed["run_id"] == run_id
    _same(resumed, uninterrupted("clex"))


@pytest.mark.slow
def test_corrupt_only_checkpoint_restarts_in_the_same_run(trained_study, tmp_path, uninterrupted):
    study, resume, run_id = _killed(tmp_path, trained_study, "clex", step=3)  # one checkpoint, at step 2
    (resume / "last.ckpt").write_bytes(b"not a checkpoint")
    proc = _finetune(study, "clex")
    (aside,) = study.glob("build/resume/finetune@clex-0.last.ckpt.corrupt-*")
    assert f"moved aside to {aside}; no earlier checkpoint: restarting from step 0" in proc.stderr
    assert aside.read_bytes() == b"not a checkpoint"
    resumed = _result(study, "clex")
    assert resumed["run_id"] == run_id
    _same(resumed, uninterrupted("clex"))


@pytest.mark.slow
def test_full_disk_while_writing_a_checkpoint(trained_study, tmp_path, uninterrupted):
    """The write of step 4's checkpoint fails (the kernel refuses it: file-size limit): one line, exit 1, the run
    FAILED, step 2's checkpoint whole and no partial file; the rerun resumes and equals the uninterrupted run."""
    study = _study(tmp_path / "study", trained_study)
    proc = _finetune(study, "clex", "full_disk", 4, check=False)
    resume = study / "build/resume/finetune@clex-0"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "clex finetune: no space to write" in proc.stderr
    assert f"[Errno 27] File too large: '{resume / 'last.ckpt'}'" in proc.stderr
    assert torch.load(resume / "last.ckpt", weights_only=False)["global_step"] == 2
    assert sorted(p.name for p in resume.iterdir()) == ["last.ckpt", "state.json"]
    run_id = json.loads((resume / "state.json").read_text())["run_id"]
    assert _runs(study) == [(run_id, "FAILED")]
    assert not (study / "build/finetune/clex").exists()
    _finetune(study, "clex")
    _same(_result(study, "clex"), uninterrupted("clex"))


def _runs(study: Path) -> list[tuple[str, str]]:
    c = mlflow.MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    exp_id = c.get_experiment_by_name("clex-study").experiment_id
    return [(r.info.run_id, r.info.status) for r in c.search_runs([exp_id], "tags.dvc_stage = 'finetune@clex-0'")]


@pytest.mark.slow
def test_finetune_killed_after_writing_its_output_reruns_into_the_same_run(trained_study, tmp_path, uninterrupted):
    """Killed with its output in place and its MLflow run FINISHED, before it drops its resume folder (as when DVC
    is interrupted before recording the stage): the rerun resumes into the same run from the last checkpoint
    (step 4: the last step is never checkpointed) and writes the same output; no second run."""
    study = _study(tmp_path / "study", trained_study)
    proc = _finetune(study, "clex", "after_outputs", 0, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    first = _result(study, "clex")
    assert first["runs"] == [(first["run_id"], "FINISHED")]
    _finetune(study, "clex")
    _same(_result(study, "clex"), uninterrupted("clex"))
    assert _result(study, "clex")["run_id"] == first["run_id"]
