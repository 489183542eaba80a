"""MLflow conventions: where the store is, how runs are named and tagged, and what every run carries.

The store defaults to a sqlite file at the study root (`MLFLOW_TRACKING_URI` overrides it) and
artifacts are anchored at `<root>/mlruns` whatever the stage's working directory (MLflow 3.17: otherwise
they land relative to the cwd at experiment creation). Every run gets the flattened params and the
tags that make its numbers traceable: experiment, seed, ablations, git commit, data hash, checkpoint
hash, eval protocol, DVC stage (`run_tags`, the one place that builds them, used by training, evaluation,
the report and the sweep); `start_run`/`open_run` create the runs the stages log with the client API.

MLflow stores those artifact locations as absolute URIs, so a study folder that was moved (or copied)
would send new artifacts to the old path. The locations follow the root instead: when the store is the
study's own `<root>/mlflow.db` and its experiment points at another folder's `mlruns`, every location
under that `mlruns` is rewritten to `<root>/mlruns` (the folder moved with the study), with one line saying so.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

MLFLOW_EXPERIMENT = "clex-study"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def client(root: Path):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(root))
    return mlflow.MlflowClient(tracking_uri(root))


def experiment_id(root: Path, name: str = MLFLOW_EXPERIMENT) -> str:
    """The MLflow experiment, created on first use with its artifact location at <root>/mlruns (which follows
    a moved study folder: `_follow_root`)."""
    c = client(root)
    exp = c.get_experiment_by_name(name)
    artifacts = (Path(root).resolve() / "mlruns").as_uri()
    if exp is None:
        return c.create_experiment(name, artifact_location=artifacts)
    if exp.artifact_location != artifacts:
        _follow_root(root, exp.artifact_location, artifacts)
    return exp.experiment_id


def _follow_root(root: Path, old: str, new: str) -> None:
    """Rewrite `old` (another folder's .../mlruns) to `new` (<root>/mlruns) in every artifact location of the
    study's own sqlite store: the study was moved or copied with its mlflow.db and mlruns/. MLflow has no API to
    change an artifact location, hence SQL on its tables (experiments, runs, MLflow 3's logged_models). A store
    given by MLFLOW_TRACKING_URI elsewhere, or a location not ending in /mlruns, is left as it is (a shared or
    deliberately configured store)."""
    db = Path(root).resolve() / "mlflow.db"
    uri = tracking_uri(root)
    if not (uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).resolve() == db):
        return
    if urlparse(old).scheme != "file" or not old.rstrip("/").endswith("/mlruns"):
        return
    old = old.rstrip("/")
    with sqlite3.connect(db, timeout=60) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                              ("logged_models", "artifact_location")):
            if table in tables:
                con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                            (new, len(old) + 1, old, len(old) + 1, old + "/"))
    print(f"MLflow: {db} kept artifacts under {unquote(urlparse(old).path)}; the study is now at {Path(root).resolve()}, "
          f"so its artifact locations now point to {unquote(urlparse(new).path)}", file=sys.stderr)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists become their string form (MLflow params are strings)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def git_commit(root: Path) -> str:
    """HEAD's sha, with '-dirty' when tracked files differ from it; 'unknown' outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_sha256(folder: Path) -> str:
    """The content hash of a folder (a Hugging Face checkpoint): sha256 over one line per file, in sorted order, of
    its path relative to the folder and its `file_sha256`; hidden files and folders (a download tool's `.cache`)
    are left out. Renaming, adding, removing or editing a file changes it; where the folder lies does not."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for f in files:
        h.update(f"{f.relative_to(folder).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def stage_name(stage: str, experiment: str | None = None, seed: int | None = None) -> str:
    """The DVC stage a run belongs to, e.g. 'finetune@clex-0' (DVC's matrix naming)."""
    return stage if experiment is None else f"{stage}@{experiment}-{seed}"


def run_status(c, run_id: str | None) -> str | None:
    """A run's status (RUNNING, FINISHED, FAILED, KILLED) read with MlflowClient `c`, or None when the store does
    not hold it (a deleted or replaced mlflow.db, a run deleted in the UI)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = c.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return None if run.info.lifecycle_stage == "deleted" else run.info.status


def close_stale_runs(root: Path, stage: str, keep: str | None = None) -> list[str]:
    """Mark runs of this stage left RUNNING by a killed process as KILLED (DVC never runs one stage twice at once)."""
    c = client(root)
    stale = c.search_runs(
        [experiment_id(root)],
        filter_string=f"tags.dvc_stage = '{stage}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    ids = [r.info.run_id for r in stale if r.info.run_id != keep]
    for run_id in ids:
        c.set_terminated(run_id, status="KILLED")
    return ids


def ablations_of(study, experiment: str) -> str:
    """Comma-separated ablations that use this experiment's runs (shared by several); every report shows
    the base model, so 'base' belongs to all of them."""
    return ",".join(sorted(a.name for a in study.ablations.values() if experiment in a.experiments + ["base"]))


def run_tags(root: Path, stage: str, role: str, parent: str | None = None, **tags) -> dict[str, str]:
    """The tags of a stage's run: `role`, `dvc_stage` = stage, `git_commit`, the given `tags` (None values left
    out, the others as strings: experiment, seed, ablations, data_hash, ...) and, with `parent`, the link that
    nests it under that run. The link is MLflow's `mlflow.parentRunId` tag: `MlflowClient.create_run` (MLflow
    3.17) takes no parent, Lightning's MLFlowLogger creates its run with that client, and the fluent
    `mlflow.start_run(parent_run_id=...)`, which keeps one active run per thread, writes this same tag."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    out = {"role": role, "dvc_stage": stage, "git_commit": git_commit(root),
           **{k: str(v) for k, v in tags.items() if v is not None}}
    if parent is not None:
        out[MLFLOW_PARENT_RUN_ID] = parent
    return out


def start_run(root: Path, name: str, tags: dict[str, str], params: dict | None = None,
              experiment: str = MLFLOW_EXPERIMENT) -> str:
    """A new RUNNING run `name` of MLflow experiment `experiment` (default: the study's) with `tags` and `params`
    (batched); returns its id. Like `mlflow.start_run` and Lightning's MLFlowLogger it adds MLflow's context tags
    (mlflow.user, mlflow.source.*)."""
    from mlflow.entities import Param
    from mlflow.tracking.context.registry import resolve_tags

    c = client(root)
    run_id = c.create_run(experiment_id(root, experiment), run_name=name, tags=resolve_tags(tags)).info.run_id
    items = [Param(k, str(v)) for k, v in (params or {}).items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit for params
        c.log_batch(run_id, params=items[i:i + 100])
    return run_id


@contextmanager
def open_run(root: Path, name: str, tags: dict[str, str], params: dict | None = None,
             experiment: str = MLFLOW_EXPERIMENT) -> Iterator[str]:
    """`start_run` for the length of a block: FINISHED when it ends, FAILED when it raises."""
    run_id = start_run(root, name, tags, params, experiment)
    try:
        yield run_id
    except BaseException:
        client(root).set_terminated(run_id, status="FAILED")
        raise
    client(root).set_terminated(run_id)


def log_metrics(c, run_id: str, metrics: dict[str, float] | Iterable[tuple[str, float, int]], step: int = 0) -> None:
    """Log {key: value} at `step`, or (key, value, step) triples, in batches (one store transaction per batch)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    triples = [(k, v, step) for k, v in metrics.items()] if isinstance(metrics, dict) else list(metrics)
    items = [Metric(k, float(v), now, s) for k, v, s in triples]
    for i in range(0, len(items), 1000):  # MLflow's batch limit for metrics
        c.log_batch(run_id, metrics=items[i:i + 1000])
