"""The GPU check's scripts run end to end on CPU in their smoke mode and write every field the summary reads
(benchmarks/gpu_check.sh runs them on a GPU; timings are never asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def script(*args: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_gpu_throughput_smoke_and_summary(tmp_path):
    proc = script(sys.executable, "benchmarks/gpu_throughput.py", "--smoke", "--json", str(tmp_path / "gpu_throughput.json"))
    r = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert r["smoke"] is True and r["device"] == "cpu"
    for name in ("plain", "clex"):
        assert r[name]["train_tokens_per_s"] > 0 and r[name]["mfu"] > 0
        assert r[name]["longest_forward_fits"] == 256  # the smoke limit: 4·L fits on any CPU
    assert r["clex"]["params"] > r["plain"]["params"]  # CLEX's ODE network
    ratio = r["clex_over_plain_tokens_per_s"]
    assert ratio["ratio"] == r["clex"]["train_tokens_per_s"] / r["plain"]["train_tokens_per_s"]
    assert ratio["goal"] == 0.95 and ratio["pass"] == (ratio["ratio"] >= 0.95)
    assert ("PASS" if ratio["pass"] else "FAIL") in proc.stdout
    att = r["attention"]
    assert att["shape"] == [2, 2, 64, 32] and att["sdpa_default"]["fwd_bwd_ms"] > 0
    assert "fwd_bwd_ms" in att["sdpa_flash"] or "error" in att["sdpa_flash"]  # else the reason it cannot run
    assert ("flash_attn" in att) == att["flash_attn_installed"]

    # the summary (part e) over what exists: a part that timed out is named, missing parts are skipped
    (tmp_path / "gpu_check.status").write_text("throughput 0 5\nprofile 124 250\n")
    script(sys.executable, "benchmarks/gpu_summary.py", "--dir", str(tmp_path))
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert summary["throughput"] == r and summary["profile"] is None and summary["long_eval"] is None
    assert summary["parts"] == {"throughput": {"rc": 0, "seconds": 5}, "profile": {"rc": 124, "seconds": 250}}
    md = (tmp_path / "gpu.md").read_text()
    assert f"| CLEX / plain tokens/s | {ratio['ratio']:.3f} (goal ≥ 0.95: {'pass' if ratio['pass'] else 'FAIL'}) |" in md
    assert "| part profile did not finish | exit 124 after 250 s (its timeout) |" in md
    assert "| date |" in md and "| torch / CUDA |" in md


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    """`gpu_check.sh --smoke`: every part but the long evaluation on CPU, in a few minutes, through the real
    `clex profile`, `prepare`, `pretrain` and `evaluate base` in a copy of the repo."""
    script("bash", "benchmarks/gpu_check.sh", "--smoke", timeout=900, GPU_CHECK_OUT=str(tmp_path), PYTHON=sys.executable)
    s = json.loads((tmp_path / "gpu.json").read_text())
    assert {k: v["rc"] for k, v in s["parts"].items()} == {"throughput": 0, "profile": 0}
    p = s["profile"]
    assert all(stage["rc"] == 0 for stage in p["stages"].values())
    # the plan is the full profile's (1000 steps of the GPU profile, the smoke overlay's batch 4 and L = 32) ...
    assert p["plan"]["pretrain_tokens"] == 1000 * 4 * 32 and p["plan"]["evaluations"] == 10
    m = p["measured"]  # ... the run is the short one: 4 steps
    assert m["pretrain_tokens"] == 4 * 4 * 32 and m["train_loss_first"][0] < m["train_loss_last"][0] <= 4
    proj = p["projection"]
    assert proj["evaluations_included"] and set(proj["parts_s"]) == {"prepare", "pretrain", "finetunes", "evaluations"}
    assert proj["total_min"] == pytest.approx(sum(proj["parts_s"].values()) / 60, abs=0.1)
    assert "projected `dvc repro ablations/discrete_vs_continuous`" in (tmp_path / "gpu.md").read_text()
