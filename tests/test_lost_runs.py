"""Runs the eval JSONs name but the MLflow store lacks or never closed (issue 11, docs/reliability.md): a deleted or
replaced mlflow.db, and a stage killed between moving its output into place and closing its runs. The report names
the stages and the command that recreates their runs; that command, run as printed, does; the rerun of an
interrupted stage leaves no run RUNNING and one FINISHED run per protocol. On a copy of the pipeline's study."""
from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import run, tiny_params

ABLATION = "discrete_vs_continuous"
STAGES = ["evaluate_base"] + [f"evaluate@{e}-{s}" for e in ("naive_ft", "clex", "clex_discrete") for s in (0, 1)]

# Kill the process (SIGKILL) at the first audit event `event` whose path contains `part`: a real kill at an exact point
KILL_AT = r"""
import os, signal, sys
event, part = sys.argv[1], sys.argv[2]
sys.addaudithook(lambda e, args: e == event and part in str(args[0]) and os.kill(os.getpid(), signal.SIGKILL))
from clex.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture
def study(repro_study, tmp_path) -> Path:
    """A copy of the study after `dvc repro ablations/discrete_vs_continuous` (shared, so not changed in place)."""
    copy = tmp_path / "study"
    shutil.copytree(repro_study[0], copy)
    return copy


def _client(study: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{study / 'mlflow.db'}")


def _report_fails(study: Path) -> tuple[str, str]:
    """(stderr, the command it prints) of a `clex report` that stops on missing runs."""
    proc = run(study, "clex", "report", ABLATION, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "clex report: MLflow runs missing" in proc.stderr
    return proc.stderr, proc.stderr.strip().splitlines()[-1].strip()


def _recreate(study: Path, command: str) -> None:
    """Run the printed command; the report then reads runs the store holds, FINISHED."""
    run(study, "bash", "-c", command)
    c = _client(study)
    for path in [study / "build/eval/base.json", *sorted((study / "build/eval").glob("*/seed*.json"))]:
        for entry in json.loads(path.read_text())["protocols"].values():
            assert c.get_run(entry["run_id"]).info.status == "FINISHED"
    assert "Data and pipelines are up to date" in run(study, "dvc", "repro", f"ablations/{ABLATION}").stdout


def test_deleted_store_names_every_stage_and_the_command(study):
    (study / "mlflow.db").unlink()
    err, command = _report_fails(study)
    assert f"the MLflow store sqlite:///{study / 'mlflow.db'} lacks finished runs that 7 evaluation outputs name" in err
    for stage in STAGES:
        assert f"  {stage} (build/eval/" in err
    assert err.count("is not in the store") == len(STAGES) * len(tiny_params()["eval"]["protocols"])
    assert command == f"dvc repro --force --single-item {' '.join(STAGES)} && dvc repro ablations/{ABLATION}"


@pytest.mark.slow
def test_store_replaced_by_an_older_copy_and_the_printed_command_recreates_the_runs(study, tmp_path):
    """Only what was logged since the copy is missing. `dvc repro` reruns the report (an eval JSON changed since),
    which stops naming that stage; the printed command, run as printed, recreates the runs and the report."""
    backup = tmp_path / "mlflow.db"
    shutil.copy(study / "mlflow.db", backup)
    run(study, "dvc", "repro", "--force", "--single-item", "evaluate@clex-0")
    shutil.copy(backup, study / "mlflow.db")
    proc = run(study, "dvc", "repro", f"ablations/{ABLATION}", check=False)
    assert proc.returncode != 0 and "clex report: MLflow runs missing" in proc.stderr
    err, command = _report_fails(study)
    assert "  evaluate@clex-0 (build/eval/clex/seed0.json): progressive run " in err and "evaluate@clex-1" not in err
    assert command == f"dvc repro --force --single-item evaluate@clex-0 && dvc repro ablations/{ABLATION}"
    _recreate(study, command)


@pytest.mark.slow
def test_interrupted_evaluation_is_detected_and_its_rerun_leaves_one_finished_run(study):
    """Killed right after its eval JSON is moved into place (the `.partial` folder's removal), before its runs
    are closed: the report refuses the RUNNING runs; the printed command reruns the stage, which marks them KILLED."""
    proc = run(study, sys.executable, "-c", KILL_AT, "os.rmdir", ".partial", "evaluate", "clex", "--seed", "1",
               check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed = {e["run_id"] for e in json.loads((study / "build/eval/clex/seed1.json").read_text())["protocols"].values()}
    err, command = _report_fails(study)
    assert "  evaluate@clex-1 (build/eval/clex/seed1.json): progressive run" in err and "is RUNNING" in err
    _recreate(study, command)
    runs = _client(study).search_runs([_client(study).get_experiment_by_name("clex-study").experiment_id],
                                      "tags.dvc_stage = 'evaluate@clex-1'")
    status = {r.info.run_id: r.info.status for r in runs}
    assert {status[r] for r in killed} == {"KILLED"} and "RUNNING" not in status.values()
    current = {e["run_id"] for e in json.loads((study / "build/eval/clex/seed1.json").read_text())["protocols"].values()}
    assert {status[r] for r in current} == {"FINISHED"}
    assert list(status.values()).count("FINISHED") == 2 * len(tiny_params()["eval"]["protocols"])  # repro's + this one
