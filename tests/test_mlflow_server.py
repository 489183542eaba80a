"""A real `mlflow server` on the store of a tiny `dvc repro`, queried over plain HTTP the way the UI queries it.

The server runs from this venv's `mlflow` in its own process group and is stopped by its pid (SIGTERM to the
group) whatever the assertions do. Other tests may add runs to the shared store: runs are selected by tags and
by the run ids the pipeline's eval records point at, never by total counts.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import run, tiny_params

ABLATION = "discrete_vs_continuous"
EXPERIMENTS = ("naive_ft", "clex", "clex_discrete")
SEEDS = (0, 1)
LENGTHS = [32, 64, 128]
TRACE_TAGS = ("experiment", "seed", "ablations", "git_commit", "data_hash", "checkpoint_sha256", "eval_protocol",
              "dvc_stage", "mlflow.parentRunId")
READY_DEADLINE_S = 60  # about 7 s with one worker; generous for a loaded machine
STOP_DEADLINE_S = 30   # 3-5 s expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _bindable(port: int) -> bool:
    """What the next server on this port does (SO_REUSEADDR: our closed connections may sit in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Server:
    """`mlflow server` on a study's sqlite store, on a free localhost port, with one worker."""

    def __init__(self, study: Path, logs: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = logs / "mlflow-server.stderr"
        mlflow_exe = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_exe), "server", "--backend-store-uri", f"sqlite:///{study / 'mlflow.db'}",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(logs / "mlflow-server.stdout", "w") as out, open(self.stderr_path, "w") as err:
            # cwd = logs: nothing the server might create by default (./mlartifacts) lands in the repo
            self.proc = subprocess.Popen(cmd, cwd=logs, stdout=out, stderr=err, start_new_session=True)
        self.pgid = self.proc.pid  # start_new_session: the server leads its own process group

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-6000:]

    def wait_ready(self) -> float:
        start = time.monotonic()
        while time.monotonic() - start < READY_DEADLINE_S:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited {self.proc.returncode} before it was ready\n{self.stderr()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        pytest.fail(f"mlflow server not ready on {self.url}/health after {READY_DEADLINE_S} s\n{self.stderr()}")

    def stop(self) -> float:
        """SIGTERM to the whole group; SIGKILL only if it overstays (and then fail). Idempotent."""
        if self.proc.returncode is not None and not _group_alive(self.pgid):
            return 0.0
        start = time.monotonic()
        try:
            os.killpg(self.pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.pgid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"mlflow server ignored SIGTERM for {STOP_DEADLINE_S} s\n{self.stderr()}")
        while _group_alive(self.pgid) and time.monotonic() - start < STOP_DEADLINE_S:  # its workers too
            time.sleep(0.1)
        return time.monotonic() - start

    # ------------------------------------------------------------------ plain HTTP, as the UI sends it
    def _call(self, req: urllib.request.Request) -> dict:
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{req.get_method()} {req.full_url} -> {e.code}: {e.read().decode()[:2000]}") from None

    def get(self, endpoint: str, **query) -> dict:
        return self._call(urllib.request.Request(f"{self.url}{endpoint}?{urllib.parse.urlencode(query)}"))

    def post(self, endpoint: str, body: dict) -> dict:
        # the server answers 400 to any Content-Type but application/json (urllib's default is form-encoded)
        return self._call(urllib.request.Request(f"{self.url}{endpoint}", data=json.dumps(body).encode(), method="POST",
                                                 headers={"Content-Type": "application/json"}))

    def search_runs(self, experiment_id: str, filter_string: str) -> list[dict]:
        runs, token = [], None
        while True:
            body = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000}
            if token:
                body["page_token"] = token
            page = self.post("/api/2.0/mlflow/runs/search", body)
            runs += page.get("runs", [])
            token = page.get("next_page_token")
            if not token:
                return runs

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        metrics = self.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
        return sorted((int(m.get("step", 0)), m["value"]) for m in metrics)

    def artifacts(self, run_id: str, path: str | None = None) -> dict[str, dict]:
        query = {"run_id": run_id, **({"path": path} if path else {})}
        return {f["path"]: f for f in self.get("/api/2.0/mlflow/artifacts/list", **query).get("files", [])}

    def artifact_text(self, run_id: str, path: str) -> str:
        """What the UI's artifact viewer fetches (`get-artifact`)."""
        query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
        with urllib.request.urlopen(f"{self.url}/get-artifact?{query}", timeout=30) as r:
            return r.read().decode()


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.fixture
def mlflow_server(repro_study, tmp_path):
    study, _ = repro_study
    server = Server(study, tmp_path)
    try:
        server.startup_s = server.wait_ready()
        yield server
    finally:
        server.stop()


def test_mlflow_server_serves_the_pipeline_runs(repro_study, mlflow_server):
    study, _ = repro_study
    server = mlflow_server
    print(f"mlflow server ready in {server.startup_s:.1f} s")

    exp = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="clex-study")["experiment"]
    assert exp["artifact_location"] == (study / "mlruns").as_uri()
    exp_id = exp["experiment_id"]

    evaluations = {r["info"]["run_id"]: r for r in server.search_runs(exp_id, "tags.role = 'evaluate'")}
    finetune_steps = list(range(tiny_params()["finetune"]["steps"]))
    for name in EXPERIMENTS:
        for seed in SEEDS:
            record = json.loads((study / f"build/eval/{name}/seed{seed}.json").read_text())
            run = evaluations.get(record["run_id"])
            assert run is not None, f"{name} seed {seed}: eval run {record['run_id']} not found by tags.role = 'evaluate'"
            assert run["info"]["status"] == "FINISHED"
            tags = _tags(run)
            assert all(tags.get(k) for k in TRACE_TAGS), {k: tags.get(k) for k in TRACE_TAGS}
            assert (tags["experiment"], tags["seed"], tags["dvc_stage"]) == (name, str(seed), f"evaluate@{name}-{seed}")
            assert ABLATION in tags["ablations"].split(",")
            assert (tags["data_hash"], tags["checkpoint_sha256"], tags["eval_protocol"]) == \
                (record["data_hash"], record["checkpoint_sha256"], record["protocol"])

            # step = eval length: the compare view's PPL-vs-length curve, the very numbers of the eval record
            ppl = server.history(record["run_id"], "ppl")
            assert [s for s, _ in ppl] == LENGTHS
            assert [v for _, v in ppl] == pytest.approx([record["ppl"][str(n)] for n in LENGTHS], rel=1e-12)
            assert [s for s, _ in server.history(record["run_id"], "passkey_acc")] == LENGTHS

            # the run tree: the evaluation nests under the fine-tune run that made its checkpoint
            parent = server.get("/api/2.0/mlflow/runs/get", run_id=tags["mlflow.parentRunId"])["run"]
            assert parent["info"]["run_id"] == record["train_run_id"]
            assert parent["info"]["experiment_id"] == exp_id  # the UI nests children only within one experiment
            ptags = _tags(parent)
            assert (ptags["role"], ptags["dvc_stage"]) == ("finetune", f"finetune@{name}-{seed}")
            assert ptags["checkpoint_sha256"] == record["checkpoint_sha256"]
            assert [s for s, _ in server.history(parent["info"]["run_id"], "train_loss")] == finetune_steps
            listed = server.artifacts(parent["info"]["run_id"])
            assert not listed["frequencies.json"]["is_dir"] and int(listed["frequencies.json"]["file_size"]) > 0
            if name == "clex":  # the artifact viewer gets the θ(t) table itself, not only its name
                table = json.loads(server.artifact_text(parent["info"]["run_id"], "frequencies.json"))
                assert {"t", "inv_freq"} <= set(table) and len(table["inv_freq"]) == len(table["t"])

    # the README's search filter runs server-side and selects what the tags say
    t_max = server.search_runs(exp_id, "tags.role = 'evaluate' and tags.ablations LIKE '%t_max%'")
    expected = {i for i, r in evaluations.items() if "t_max" in _tags(r)["ablations"].split(",")}
    assert expected and {r["info"]["run_id"] for r in t_max} == expected

    reports = [r for r in server.search_runs(exp_id, f"tags.role = 'report' and tags.ablation = '{ABLATION}'")
               if r["info"]["status"] == "FINISHED"]
    assert reports, "no finished report run"
    report_id = reports[0]["info"]["run_id"]
    assert "report" in server.artifacts(report_id) and server.artifacts(report_id)["report"]["is_dir"]
    assert "report/table.md" in server.artifacts(report_id, "report")
    table = server.artifact_text(report_id, "report/table.md")
    assert table == (study / f"reports/{ABLATION}/table.md").read_text()

    # each evaluation run carries its record under eval/ (asserted after the stop checks: a naming slip hides nothing)
    eval_artifacts = {}
    for name in EXPERIMENTS:
        for seed in SEEDS:
            record = json.loads((study / f"build/eval/{name}/seed{seed}.json").read_text())
            eval_artifacts[f"{name}/seed{seed}"] = sorted(server.artifacts(record["run_id"], "eval"))

    # stopped by its pid: SIGTERM to the group, every process gone, the port free for the next server
    stop_s = server.stop()
    print(f"mlflow server stopped in {stop_s:.1f} s")
    assert server.proc.returncode is not None and not _group_alive(server.pgid)
    assert not _listening(server.port) and _bindable(server.port)

    misnamed = {key: names for key, names in eval_artifacts.items() if f"eval/{key.split('/')[1]}.json" not in names}
    assert not misnamed, f"evaluation runs lack their eval/seed<s>.json record (logged under another name?): {misnamed}"


def test_each_ablation_has_a_flat_comparison_experiment(repro_study, mlflow_server, tmp_path):
    """The everyday comparison is one click away: experiment `clex-study/<ablation>` holds one top-level run per
    compared experiment whose `ppl` history (step = length) is the mean over seeds of the eval records; a rerun
    of the report replaces those runs (on a copy of the study: the shared store keeps its one report run)."""
    study, _ = repro_study
    server = mlflow_server
    exp = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=f"clex-study/{ABLATION}")["experiment"]
    runs = server.search_runs(exp["experiment_id"], "")
    by_name = {_tags(r)["experiment"]: r for r in runs}
    assert sorted(by_name) == sorted(("base",) + EXPERIMENTS) and len(runs) == len(by_name)  # one each
    for name in EXPERIMENTS:
        run_ = by_name[name]
        tags = _tags(run_)
        assert "mlflow.parentRunId" not in tags and run_["info"]["run_name"] == name  # top level: no row to expand
        assert tags["role"] == "comparison" and tags["dvc_stage"] == f"ablations/{ABLATION}"
        records = [json.loads((study / f"build/eval/{name}/seed{s}.json").read_text()) for s in SEEDS]
        ppl = server.history(run_["info"]["run_id"], "ppl")
        assert [s for s, _ in ppl] == LENGTHS
        assert [v for _, v in ppl] == pytest.approx([sum(r["ppl"][str(n)] for r in records) / len(records)
                                                     for n in LENGTHS], rel=1e-12)
        for s, record in zip(SEEDS, records):
            assert [v for _, v in server.history(run_["info"]["run_id"], f"ppl_seed{s}")] == \
                pytest.approx([record["ppl"][str(n)] for n in LENGTHS], rel=1e-12)
        params = {p["key"]: p["value"] for p in run_["data"].get("params", [])}
        assert {params[f"source_run.{r['primary']}/seed{r['seed']}"] for r in records} == {r["run_id"] for r in records}

    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    copy = tmp_path / "copy"
    shutil.copytree(study, copy, symlinks=True)
    run(copy, "clex", "report", ABLATION)
    c = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    exp_id = c.get_experiment_by_name(f"clex-study/{ABLATION}").experiment_id
    active = c.search_runs([exp_id])
    assert sorted(r.data.tags["experiment"] for r in active) == sorted(("base",) + EXPERIMENTS)
    assert not {r.info.run_id for r in active} & set(by_name[n]["info"]["run_id"] for n in by_name)  # new runs
    assert len(c.search_runs([exp_id], run_view_type=ViewType.DELETED_ONLY)) == len(by_name)  # restorable
