"""Shared fixtures: a study folder with the tiny profile, and a runner for the real `clex`/`dvc` commands."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clex.config import ParamsError, load_study, merged
from clex.pipeline import write

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).with_name("tiny_params.yaml")
STUDY_FILES = ["clex", "experiments", "ablations", "analysis", "dvc.yaml", ".dvc/config", ".dvcignore", "pyproject.toml"]


def make_study(dest: Path, params: dict | None = None) -> Path:
    """A git+DVC study folder at dest: this repo's code and configs, params from the tiny profile."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in STUDY_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params or tiny_params()))
    try:  # dvc.yaml's generated part (reuse evaluations, ablations): rewrite it for these params (bad ones keep the repo's)
        write(load_study(dest))
    except ParamsError:
        pass
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def tiny_params() -> dict:
    """The repo's params.yaml with the tiny profile's overrides (DVC needs every tracked key spelled out)."""
    return merged(yaml.safe_load((REPO / "params.yaml").read_text()), yaml.safe_load(TINY.read_text()))


def run(study: Path, *cmd: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command in the study folder with its own MLflow store and this interpreter's tools on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{study / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(list(cmd), cwd=study, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def trained_study(tmp_path_factory) -> Path:
    """A tiny study with data prepared and the base model pretrained (through the real CLI)."""
    study = make_study(tmp_path_factory.mktemp("study"))
    run(study, "clex", "prepare")
    run(study, "clex", "pretrain")
    return study


@pytest.fixture(scope="session")
def repro_study(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny study after `dvc repro ablations/discrete_vs_continuous` (the real pipeline), and that command's
    output. Shared by the end-to-end test (which adds more stages), the MLflow server test and the
    notebook tests, which read its store; tests that add runs must not assume they are the only ones."""
    study = make_study(tmp_path_factory.mktemp("repro"))
    return study, run(study, "dvc", "repro", "ablations/discrete_vs_continuous")

