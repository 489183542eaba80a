"""`clex profile`: a params overlay (profiles/gpu.yaml) applied to a study validates first, changes exactly the
overlay's keys, keeps dvc.yaml current, and a bad overlay writes nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clex.profile import n_params, plan
from conftest import REPO, make_study, run

GPU = REPO / "profiles" / "gpu.yaml"


def leaves(d: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested mapping's non-mapping values."""
    out = {}
    for k, v in d.items():
        out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.fixture()
def study(tmp_path) -> Path:
    """A study with the repo's own params.yaml (the CPU default), not the tiny profile."""
    return make_study(tmp_path / "study", yaml.safe_load((REPO / "params.yaml").read_text()))


def test_gpu_profile_changes_exactly_its_keys(study):
    before = leaves(yaml.safe_load((study / "params.yaml").read_text()))
    overlay = leaves(yaml.safe_load(GPU.read_text()))
    out = run(study, "clex", "profile", str(GPU)).stdout
    after_text = (study / "params.yaml").read_text()
    after = leaves(yaml.safe_load(after_text))
    assert set(after) == set(before)  # no key added or lost
    assert {k for k in after if after[k] != before[k]} == {k for k in overlay if overlay[k] != before[k]}
    assert all(after[k] == v for k, v in overlay.items())
    assert "git checkout params.yaml dvc.yaml" in out and "dvc repro ablations/discrete_vs_continuous" in out
    assert after_text.startswith(f"# clex profile: {GPU}")
    run(study, "clex", "pipeline", "--check")  # dvc.yaml's generated part matches the new params
    run(study, "clex", "validate")
    # a second profile on top: both named in the header, its key changed, the GPU profile's kept
    (study / "short.yaml").write_text("pretrain: {steps: 300}\n")
    run(study, "clex", "profile", "short.yaml")
    text = (study / "params.yaml").read_text()
    assert text.splitlines()[:2] == [f"# clex profile: {GPU} (over the params.yaml before it)",
                                     "# clex profile: short.yaml (over the params.yaml before it)"]
    again = leaves(yaml.safe_load(text))
    assert again == {**after, "pretrain.steps": 300}


@pytest.mark.parametrize("overlay, named", [
    ("model: {d_modle: 256}\n", ["model.d_modle: 256", "not in params.yaml", "'d_model'"]),  # a typo
    ("model: {n_heads: 5}\n", ["model.n_heads: 5", "must divide model.d_model=128"]),  # a bad value
    ("pretrain: {steps: many}\n", ["pretrain.steps: got 'many'"]),  # a bad type
    ("eval: {lengths: [100, 200]}\n", ["eval.lengths: [100, 200]", "multiples of model.train_len=128"]),
])
def test_bad_overlay_writes_nothing(study, overlay, named):
    (study / "bad.yaml").write_text(overlay)
    files = {name: (study / name).read_bytes() for name in ("params.yaml", "dvc.yaml")}
    proc = run(study, "clex", "profile", "bad.yaml", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "bad.yaml" in proc.stderr and all(n in proc.stderr for n in named), proc.stderr
    assert "Traceback" not in proc.stderr
    assert {name: (study / name).read_bytes() for name in files} == files


def test_plan_counts_the_flagship(study):
    """The estimate behind the profile's sizing, against counts written out by hand for the CPU default."""
    from clex.config import RopeSpec, load_study
    from clex.model import Decoder, parameter_count
    from clex.rope import build_position_encoding

    s = load_study(study)
    m = s.params.model
    rope = build_position_encoding(RopeSpec(type="rope"), head_dim=m.head_dim, base=m.rope_base, train_len=m.train_len)
    assert n_params(m, 4096) == parameter_count(Decoder(m, 4096, rope))  # the built decoder's own count
    p = plan(s, "discrete_vs_continuous")
    # 4 layers x (4·128² + 3·128·384 + 2·128) + 4096·128 + 128: the decoder without the encoding's parameters
    assert p["n_params"] == n_params(s.params.model, 4096) == 4 * (65536 + 147456 + 256) + 524288 + 128
    assert p["pretrain_tokens"] == 1000 * 32 * 128
    assert p["finetunes"] == 9 and p["evaluations"] == 10
    assert p["finetune_tokens"] == 3 * 3 * 200 * 32 * 128
    per_token = 6 * p["n_params"] + 12 * 4 * 128 * 128
    assert p["train_flops"] == (p["pretrain_tokens"] + p["finetune_tokens"]) * per_token
