"""clex/tracking.py's run helpers on a real MLflow sqlite store: the common tags and the parent link, a run that ends
FINISHED or FAILED with its block, params and metrics in batches."""
from __future__ import annotations

import mlflow
import pytest

from clex import tracking


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_run_tags_and_nesting(root):
    parent = tracking.start_run(root, "sweeps/s", tracking.run_tags(root, "sweeps/s", "sweep", seed=3, experiment=None))
    tags = tracking.run_tags(root, "sweeps/s/trial0", "sweep_trial", parent=parent, seed=3, ablations="")
    assert tags == {"role": "sweep_trial", "dvc_stage": "sweeps/s/trial0", "git_commit": "unknown", "seed": "3",
                    "ablations": "", "mlflow.parentRunId": parent}  # root is no git checkout; None values left out
    child = tracking.start_run(root, "sweeps/s/trial0", tags, {f"p{i}": i for i in range(250)})  # 3 param batches
    run = tracking.client(root).get_run(child)
    assert run.info.run_name == "sweeps/s/trial0" and run.info.status == "RUNNING"
    assert len(run.data.params) == 250 and run.data.params["p249"] == "249"
    assert "mlflow.user" in run.data.tags  # MLflow's context tags, as mlflow.start_run adds them
    nested = mlflow.search_runs([tracking.experiment_id(root)], f"tags.mlflow.parentRunId = '{parent}'",
                                output_format="list")
    assert [r.info.run_id for r in nested] == [child]


def test_open_run_ends_finished_or_failed(root):
    with tracking.open_run(root, "a", tracking.run_tags(root, "a", "report")) as ok:
        pass
    with pytest.raises(KeyError), tracking.open_run(root, "b", tracking.run_tags(root, "b", "report")) as bad:
        raise KeyError("boom")
    c = tracking.client(root)
    assert (c.get_run(ok).info.status, c.get_run(bad).info.status) == ("FINISHED", "FAILED")


def test_log_metrics_by_step_and_in_batches(root):
    run_id = tracking.start_run(root, "m", tracking.run_tags(root, "m", "evaluate"))
    c = tracking.client(root)
    tracking.log_metrics(c, run_id, [("ppl", float(n), n) for n in range(1, 1502)])  # two batches
    tracking.log_metrics(c, run_id, {"best_value": 1.5, "trials_complete": 2})
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "ppl")][-2:] == [(1500, 1500.0), (1501, 1501.0)]
    assert len(c.get_metric_history(run_id, "ppl")) == 1501
    assert c.get_run(run_id).data.metrics == {"ppl": 1501.0, "best_value": 1.5, "trials_complete": 2.0}
