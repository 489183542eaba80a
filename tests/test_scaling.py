"""Frequency-scaling baselines (clex/rope/scaling.py) against transformers' own rope functions and closed forms.

transformers computes these in float32 with the same expressions, so frequencies, attention factors
and cos/sin tables agree to 1e-6 relative (most of them bit for bit).
"""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from clex.config import Experiment, ModelConfig, OptimConfig, ParamsError, load_study
from clex.lit import LitDecoder
from clex.model import Decoder
from clex.rope import (
    BaseChange, BaseChangeSpec, DynamicNtk, DynamicNtkSpec, LinearScaling, NtkScaling, NtkSpec, PiSpec, PlainRope,
    Yarn, YarnSpec, build_position_encoding, codellama_base, default_inv_freq, ntk_inv_freq, rotary_tables,
)
from clex.rope.scaling import longest_wavelength
from conftest import REPO, make_study
from test_rope import hf_config, rel_err

TOL = 1e-6
GRID = list(itertools.product((32, 64, 128), (10000.0, 500000.0), (2.0, 4.0, 16.0)))  # head_dim, base, factor
POSITIONS = torch.arange(0, 3000, 7)


def hf_tables(cfg, positions=POSITIONS):
    """cos/sin of transformers' LlamaRotaryEmbedding (attention scaling included)."""
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), positions[None])
    return cos[0], sin[0]


def assert_tables(enc, cfg):
    cos, sin = enc(POSITIONS.float())
    hf_cos, hf_sin = hf_tables(cfg)
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=TOL)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=TOL)


# ------------------------------------------------------------------ PI, NTK
@pytest.mark.parametrize("head_dim,base,factor", GRID)
def test_pi_matches_transformers_linear(head_dim, base, factor):
    cfg = hf_config(head_dim, base, 128, rope_type="linear", factor=factor)
    hf_inv, hf_att = ROPE_INIT_FUNCTIONS["linear"](cfg)
    enc = LinearScaling(head_dim, base, 128, factor)
    assert rel_err(enc.inv_freq(), hf_inv) < TOL and hf_att == 1.0
    assert rel_err(enc.inv_freq(), default_inv_freq(head_dim, base).double() / factor) < TOL
    assert_tables(enc, cfg)


@pytest.mark.parametrize("head_dim,base,factor", GRID)
def test_ntk_matches_closed_form_and_transformers(head_dim, base, factor):
    enc = NtkScaling(head_dim, base, 128, factor)
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    closed = (base * factor ** (head_dim / (head_dim - 2))) ** (-2 * i / head_dim)
    assert rel_err(enc.inv_freq(), closed) < TOL
    assert torch.equal(enc.inv_freq(), ntk_inv_freq(head_dim, base, factor))
    # HF 'dynamic' with f = 1 at n = α·L is static NTK with α (transformers 5 has no static 'ntk' entry).
    hf_inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config(head_dim, base, 128, rope_type="dynamic", factor=1.0),
                                               seq_len=int(factor * 128))
    assert rel_err(enc.inv_freq(), hf_inv) < TOL
    assert enc.orig_base == base and enc.t_max is None and enc.inference_t(10_000) == 1


# ------------------------------------------------------------------ Dynamic NTK
@pytest.mark.parametrize("head_dim,base,factor", GRID)
def test_dynamic_ntk_matches_transformers(head_dim, base, factor):
    L = 128
    cfg = hf_config(head_dim, base, L, rope_type="dynamic", factor=factor)
    enc = DynamicNtk(head_dim, base, L, factor)
    for n in (1, L // 2, L, L + 1, 3 * L, 7 * L + 5, 16 * L):
        hf_inv, hf_att = ROPE_INIT_FUNCTIONS["dynamic"](cfg, seq_len=n)
        ours = enc.inv_freq(enc.inference_t(n))
        assert rel_err(ours, hf_inv) < TOL and hf_att == 1.0
        if n <= L:
            assert torch.equal(ours, default_inv_freq(head_dim, base))
    table = enc.frequency_table()
    assert table.shape == (16, head_dim // 2) and torch.equal(table[0], default_inv_freq(head_dim, base))
    assert rel_err(table[3], ROPE_INIT_FUNCTIONS["dynamic"](cfg, seq_len=4 * L)[0]) < TOL


def test_dynamic_ntk_through_the_decoder_path():
    cfg = ModelConfig(d_model=64, n_layers=1, n_heads=2, d_ff=64, train_len=32)
    L, d, b = cfg.train_len, cfg.head_dim, cfg.rope_base
    rope = build_position_encoding(DynamicNtkSpec(type="dynamic_ntk", factor=2.0), head_dim=d, base=b, train_len=L)
    model = Decoder(cfg, 50, rope).eval()
    seen = []
    rope.register_forward_hook(lambda module, args, out: seen.append(out))
    hf_cfg = hf_config(d, b, L, rope_type="dynamic", factor=2.0)
    with torch.no_grad():
        for n in (5, L, L + 1, 3 * L, 5 * L):
            model(torch.zeros(1, n, dtype=torch.long))  # inference: t = rope.inference_t(n)
            positions = torch.arange(n)
            want = rotary_tables(positions, ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, seq_len=n)[0])
            for ours, ref in zip(seen[-1], want):
                torch.testing.assert_close(ours, ref, rtol=0, atol=TOL)
            if n <= L:
                for ours, ref in zip(seen[-1], PlainRope(d, b, L)(positions.float())):
                    assert torch.equal(ours, ref)
        # Training: no t_max, so the trainer passes t = 1 and default positions: plain RoPE at any N.
        lit = LitDecoder(model, OptimConfig(steps=1, batch_size=1, lr=1e-3), seed=0)
        t, positions = lit.scale_and_positions(3 * L)
        assert (t, positions) == (1, None)
        model(torch.zeros(1, 3 * L, dtype=torch.long), positions=positions, t=t)
        for ours, ref in zip(seen[-1], PlainRope(d, b, L)(torch.arange(3 * L).float())):
            assert torch.equal(ours, ref)


# ------------------------------------------------------------------ YaRN
@pytest.mark.parametrize("train_len", [64, 4096])
@pytest.mark.parametrize("head_dim,base,factor", GRID)
def test_yarn_matches_transformers(head_dim, base, factor, train_len):
    cfg = hf_config(head_dim, base, train_len, rope_type="yarn", factor=factor,
                    original_max_position_embeddings=train_len)
    hf_inv, hf_att = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    enc = Yarn(head_dim, base, train_len, factor)
    assert rel_err(enc.inv_freq(), hf_inv) < TOL
    assert abs(enc.mscale - hf_att) < TOL and abs(enc.mscale - (0.1 * math.log(factor) + 1)) < 1e-12
    assert_tables(enc, cfg)
    cos, sin = enc(torch.arange(3.0))
    assert torch.all(cos[0] == enc.mscale) and torch.all(sin[0] == 0)  # position 0: cos = mscale
    plain_cos, plain_sin = rotary_tables(torch.arange(3.0), enc.inv_freq())
    torch.testing.assert_close(cos, plain_cos * enc.mscale, rtol=0, atol=0)
    torch.testing.assert_close(sin, plain_sin * enc.mscale, rtol=0, atol=0)


@pytest.mark.parametrize("head_dim,base,train_len", [(32, 10000.0, 64), (128, 10000.0, 4096), (64, 500000.0, 256)])
def test_yarn_ramp_follows_method_md(head_dim, base, train_len):
    """Independent float64 check: pairs making > β_fast turns over L keep θ, pairs making < β_slow get θ/s."""
    s = 8.0
    ratio = Yarn(head_dim, base, train_len, s).inv_freq().double() / default_inv_freq(head_dim, base).double()
    turns = train_len / (2 * math.pi * base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    fast, slow = turns > 32, turns < 1  # (at d = 32, L = 64 no pair turns 32 times: `fast` is empty)
    assert slow.any() and not (fast & slow).any()
    torch.testing.assert_close(ratio[fast], torch.ones_like(ratio[fast]), rtol=TOL, atol=0)
    torch.testing.assert_close(ratio[slow], torch.full_like(ratio[slow], 1 / s), rtol=TOL, atol=0)
    assert ((ratio >= 1 / s - TOL) & (ratio <= 1 + TOL)).all()


def test_yarn_optional_fields_match_transformers():
    d, b, L, s = 64, 10000.0, 256, 16.0
    enc = build_position_encoding(YarnSpec(type="yarn", factor=s, attn_factor=0.8, beta_fast=16, beta_slow=2),
                                  head_dim=d, base=b, train_len=L)
    # yarn-repo semantics: mscale = (0.1·ln s + 1)·attn_factor; HF's attention_factor replaces that whole product.
    cfg = hf_config(d, b, L, rope_type="yarn", factor=s, original_max_position_embeddings=L,
                    attention_factor=(0.1 * math.log(s) + 1) * 0.8, beta_fast=16.0, beta_slow=2.0)
    hf_inv, hf_att = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    assert rel_err(enc.inv_freq(), hf_inv) < TOL and abs(enc.mscale - hf_att) < TOL
    assert rel_err(enc.inv_freq(), Yarn(d, b, L, s).inv_freq()) > 1e-3  # the betas really move the ramp
    assert_tables(enc, cfg)


# ------------------------------------------------------------------ base change
def test_base_change_closed_form():
    assert abs(codellama_base(128, 4096) / 1e6 - 1) < 1e-12  # CodeLLaMA itself
    code_ratio = longest_wavelength(128, 1e6) / 16384
    for d, L in [(32, 128), (64, 128), (64, 512), (128, 1024)]:
        b_new = codellama_base(d, L)
        assert abs(b_new / (1e6 ** (126 / 128) * L / 4096) ** (d / (d - 2)) - 1) < 1e-12
        assert abs(longest_wavelength(d, b_new) / (4 * L) / code_ratio - 1) < 1e-12
    assert abs(codellama_base(32, 128) - 49488.77) < 0.01  # the default profile's base
    enc = BaseChange(32, 10000.0, 128)
    assert enc.base == codellama_base(32, 128) and enc.orig_base == 10000.0
    assert torch.equal(enc.inv_freq(), default_inv_freq(32, codellama_base(32, 128)))
    assert torch.equal(BaseChange(32, 10000.0, 128, 5e5).inv_freq(), default_inv_freq(32, 5e5))


# ------------------------------------------------------------------ registry, specs, experiment files
SPECS = [
    (PiSpec(type="pi", factor=4), LinearScaling, 1),
    (NtkSpec(type="ntk", factor=4), NtkScaling, 1),
    (DynamicNtkSpec(type="dynamic_ntk"), DynamicNtk, 16),
    (YarnSpec(type="yarn", factor=16), Yarn, 1),
    (BaseChangeSpec(type="base_change"), BaseChange, 1),
    (BaseChangeSpec(type="base_change", base=1e6), BaseChange, 1),
]


@pytest.mark.parametrize("spec,cls,rows", SPECS, ids=[f"{s.type}{i}" for i, (s, _, _) in enumerate(SPECS)])
def test_registry_builds_each_type(spec, cls, rows):
    enc = build_position_encoding(spec, head_dim=32, base=10000.0, train_len=64)
    assert type(enc) is cls and enc.t_max is None and not list(enc.parameters())
    table = enc.frequency_table()
    assert table.shape == (rows, 16) and table.dtype == torch.float32 and torch.isfinite(table).all()
    assert Experiment(name="x", rope=spec).t_max is None
    before = enc.inv_freq(enc.inference_t(200))
    enc.to(torch.bfloat16)  # a bf16-true cast must not round the frequencies
    after = enc.inv_freq(enc.inference_t(200))
    assert after.dtype == torch.float32 and torch.equal(after, before)


BAD = [  # (rope mapping, what the message must name)
    ({"type": "pi", "factor": 0.5}, "rope.pi.factor"),
    ({"type": "pi"}, "rope.pi.factor"),
    ({"type": "ntk", "factor": 0.99}, "rope.ntk.factor"),
    ({"type": "ntk", "factor": float("inf")}, "rope.ntk.factor"),
    ({"type": "dynamic_ntk", "factor": 0}, "rope.dynamic_ntk.factor"),
    ({"type": "yarn", "factor": 16, "mscale": 2.0}, "rope.yarn.mscale"),
    ({"type": "yarn", "factor": 16, "beta_fast": 1, "beta_slow": 2}, "rope.beta_fast: 1.0 is not above rope.beta_slow"),
    ({"type": "yarn", "factor": 16, "attn_factor": 0}, "rope.yarn.attn_factor"),
    ({"type": "base_change", "base": 1.0}, "rope.base_change.base"),
]


@pytest.mark.parametrize("rope,key", BAD, ids=[f"{r['type']}-{k.split('.')[-1][:12]}" for r, k in BAD])
def test_invalid_specs_raise_naming_the_key(rope, key):
    with pytest.raises(ValidationError, match=re.escape(key)):
        Experiment.model_validate({"name": "x", "rope": rope})


def test_bad_experiment_file_message_and_sampling_rule(tmp_path):
    study = make_study(tmp_path / "study")
    bad = study / "experiments" / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rope": {"type": "yarn", "factor": 0.5}}))
    with pytest.raises(ParamsError, match=r"experiments/bad.yaml: rope.factor: got 0.5; .*greater than or equal to 1"):
        load_study(study)
    bad.write_text(yaml.safe_dump({"rope": {"type": "pi", "factor": 4}, "position_sampling": "random"}))
    with pytest.raises(ParamsError, match=r"position_sampling: 'random'.*rope.type 'pi': 'none'"):
        load_study(study)


def test_repo_baseline_experiments():
    study = load_study(REPO)
    t_max, model = study.experiment("clex").t_max, study.params.model
    types = {name: study.experiment(name).rope.type for name in
             ("pi", "ntk", "dynamic_ntk", "yarn_s16", "yarn_s32", "base_change")}
    assert types == {"pi": "pi", "ntk": "ntk", "dynamic_ntk": "dynamic_ntk", "yarn_s16": "yarn",
                     "yarn_s32": "yarn", "base_change": "base_change"}
    assert study.experiment("yarn_s16").rope.factor == t_max and study.experiment("yarn_s32").rope.factor == 2 * t_max
    for name in types:
        exp = study.experiment(name)
        assert exp.description and exp.position_sampling == "none"
        build_position_encoding(exp.rope, head_dim=model.head_dim, base=model.rope_base, train_len=model.train_len)
