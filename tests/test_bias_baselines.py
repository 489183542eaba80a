"""ALiBi, Sandwich and RandomPos (clex/rope/bias.py, clex/rope/positions.py) against transformers'
BLOOM ALiBi, float64 closed forms and an explicit softmax attention; their specs and experiment files."""
from __future__ import annotations

import math
import re

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

from clex.config import Experiment, ModelConfig, OptimConfig, ParamsError, load_study
from clex.lit import LitDecoder, step_generator
from clex.model import Decoder, compute_dtype
from clex.rope import (
    Alibi, AlibiSpec, ClexSpec, PiSpec, PlainRope, RandomPos, RandomPosSpec, RopeSpec, Sandwich, SandwichSpec,
    alibi_slopes, build_position_encoding, random_positions, training_positions,
)
from conftest import REPO, make_study, tiny_params

HEADS = [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 24, 32]


def distances(n: int) -> torch.Tensor:
    """i - j for i, j in 0..n-1, float64."""
    i = torch.arange(n, dtype=torch.float64)
    return i[:, None] - i[None, :]


def alibi_closed_form(n_heads: int, n: int) -> torch.Tensor:
    """-m_h·(i-j), m_h = 2^(-8h/H), H a power of two (Press et al.), float64 (H, n, n)."""
    m = 2.0 ** (-8.0 * torch.arange(1, n_heads + 1, dtype=torch.float64) / n_heads)
    return -m[:, None, None] * distances(n)


def sandwich_closed_form(n_heads: int, n: int, d_bar: int) -> torch.Tensor:
    """(Σ_{k=1..d̄/2} cos((i-j)/10000^(2k/d̄)) - d̄/2) / (8h/H), float64 (H, n, n), summed term by term."""
    total = torch.zeros(n, n, dtype=torch.float64)
    for k in range(1, d_bar // 2 + 1):
        total += torch.cos(distances(n) / 10000 ** (2 * k / d_bar))
    ratio = 8 * torch.arange(1, n_heads + 1, dtype=torch.float64) / n_heads
    return (total - d_bar / 2) / ratio[:, None, None]


# ------------------------------------------------------------------ ALiBi
@pytest.mark.parametrize("n_heads", HEADS)
def test_alibi_slopes_match_bloom(n_heads):
    ours = alibi_slopes(n_heads)
    assert ours.dtype == torch.float32 and ours.shape == (n_heads,)
    torch.testing.assert_close(ours, _get_alibi_slopes(n_heads, torch.device("cpu")), rtol=1e-6, atol=0)


def test_alibi_slopes_closed_form():
    for n_heads in (1, 2, 4, 8, 16, 32):
        want = 2.0 ** (-8.0 * torch.arange(1, n_heads + 1, dtype=torch.float64) / n_heads)
        torch.testing.assert_close(alibi_slopes(n_heads).double(), want, rtol=1e-7, atol=0)
    # H = 12: the 8 slopes of 8 heads, then the 1st, 3rd, 5th, 7th of 16 heads (ALiBi's get_slopes)
    want = [2.0 ** -h for h in range(1, 9)] + [2.0 ** -(h / 2) for h in (1, 3, 5, 7)]
    torch.testing.assert_close(alibi_slopes(12).double(), torch.tensor(want, dtype=torch.float64), rtol=1e-7, atol=0)


@pytest.mark.parametrize("n_heads", [4, 6, 12])
def test_alibi_bias_matches_bloom_and_closed_form(n_heads):
    n = 11
    bias = Alibi(16, 1e4, 8).attention_bias(n_heads, torch.arange(n, dtype=torch.float32), torch.arange(n) * 1.0)
    assert bias.shape == (n_heads, n, n) and bias.dtype == torch.float32
    # BLOOM's tensor is m_h·j (shape (H, 1, n)); it differs from -m_h·(i-j) by the row constant m_h·i,
    # which softmax ignores.
    bloom = build_alibi_tensor(torch.ones(1, n), n_heads, torch.float32)
    slopes = _get_alibi_slopes(n_heads, torch.device("cpu"))
    row = slopes[:, None, None] * torch.arange(n, dtype=torch.float32)[None, :, None]
    torch.testing.assert_close(bias, bloom - row, rtol=1e-6, atol=1e-6)
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    torch.testing.assert_close(bias.masked_fill(future, -math.inf).softmax(-1),
                               bloom.expand(-1, n, -1).masked_fill(future, -math.inf).softmax(-1))
    if n_heads == 4:
        torch.testing.assert_close(bias.double(), alibi_closed_form(4, n), rtol=1e-7, atol=0)


def test_alibi_bias_per_sequence_positions():
    pos = torch.tensor([[0.0, 1, 2, 3], [5, 9, 10, 30]])
    bias = Alibi(16, 1e4, 8).attention_bias(4, pos, pos)
    assert bias.shape == (2, 4, 4, 4)
    m = alibi_slopes(4)
    torch.testing.assert_close(bias[1, 2, 3, 1], -m[2] * (30 - 9))
    torch.testing.assert_close(bias[0], Alibi(16, 1e4, 8).attention_bias(4, pos[0], pos[0]))


# ------------------------------------------------------------------ Sandwich
@pytest.mark.parametrize("n_heads,d_bar", [(4, 128), (3, 32), (12, 64)])
def test_sandwich_bias_closed_form(n_heads, d_bar):
    n = 300
    pos = torch.arange(n, dtype=torch.float32)
    bias = Sandwich(32, 1e4, 64, d_bar).attention_bias(n_heads, pos, pos)
    assert bias.shape == (n_heads, n, n) and bias.dtype == torch.float32
    torch.testing.assert_close(bias.double(), sandwich_closed_form(n_heads, n, d_bar), rtol=0, atol=1e-4)
    assert torch.all(bias.diagonal(dim1=-2, dim2=-1) == 0)  # minus d̄/2: zero at distance 0
    torch.testing.assert_close(bias, bias.transpose(-1, -2))  # a function of |i - j|
    # the paper's decaying temporal bias over short distances, and 1/(8h/H) head compression
    assert bias[0, 100, 99] > bias[0, 100, 90] > bias[0, 100, 0]
    torch.testing.assert_close(bias[-1], bias[0] / n_heads, rtol=1e-6, atol=1e-6)


def test_sandwich_bias_at_fractional_and_long_distances():
    pos = torch.tensor([0.0, 0.5, 3.25, 700.0, 2047.0])
    bias = Sandwich(32, 1e4, 64).attention_bias(2, pos, pos).double()
    i = pos.double()
    dist = i[:, None] - i[None, :]
    k = torch.arange(1, 65, dtype=torch.float64)
    want = torch.cos(dist[..., None] / 10000 ** (2 * k / 128)).sum(-1) - 64
    torch.testing.assert_close(bias[0], want / 4, rtol=0, atol=1e-4)  # ratios 8h/H = 4 and 8 (float32 cos)
    torch.testing.assert_close(bias[1], want / 8, rtol=0, atol=5e-5)


# ------------------------------------------------------------------ the Decoder with a bias
CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, train_len=16)


def tiny(rope, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(CFG, 50, rope).eval()


def reference_logits(model: Decoder, tokens: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The Decoder written out with an explicit causal softmax(q·k/√d + bias) and no rotation."""
    B, T = tokens.shape
    H, D = CFG.n_heads, CFG.head_dim
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    x = model.embed(tokens)
    for block in model.blocks:
        q, k, v = block.attn.qkv(block.attn_norm(x)).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D) + (0 if bias is None else bias.float())
        out = scores.masked_fill(future, -math.inf).softmax(-1) @ v
        x = x + block.attn.proj(out.transpose(1, 2).reshape(B, T, CFG.d_model))
        x = x + block.mlp(block.mlp_norm(x))
    return model.norm(x) @ model.embed.weight.T


@pytest.mark.parametrize("kind", ["alibi", "sandwich"])
def test_decoder_with_bias_matches_explicit_softmax_attention(kind):
    rope = Alibi(CFG.head_dim, CFG.rope_base, CFG.train_len) if kind == "alibi" else \
        Sandwich(CFG.head_dim, CFG.rope_base, CFG.train_len, 32)
    model = tiny(rope)
    tokens = torch.randint(0, 50, (3, 20))
    bias = alibi_closed_form(4, 20) if kind == "alibi" else sandwich_closed_form(4, 20, 32)
    calls = {"bias": 0, "rotary": 0}
    real = rope.attention_bias

    def counted(*args):
        calls["bias"] += 1
        return real(*args)

    rope.attention_bias = counted
    rope.register_forward_hook(lambda *_: calls.__setitem__("rotary", calls["rotary"] + 1))
    with torch.no_grad():
        got = model(tokens)
        torch.testing.assert_close(got, reference_logits(model, tokens, bias), rtol=1e-5, atol=1e-5)
        assert (got - reference_logits(model, tokens, None)).abs().max() > 1e-3  # the bias matters
    assert calls == {"bias": 1, "rotary": 0}  # one bias for both layers, no cos/sin tables


@pytest.mark.parametrize("kind", ["alibi", "sandwich"])
def test_decoder_with_bias_is_causal_and_shift_invariant(kind):
    model = tiny(build_position_encoding(AlibiSpec(type="alibi") if kind == "alibi" else SandwichSpec(type="sandwich"),
                                         head_dim=CFG.head_dim, base=CFG.rope_base, train_len=CFG.train_len))
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])  # the future does not leak
        assert (model(x)[:, 8:] - model(y)[:, 8:]).abs().max() > 1e-4
        pos = torch.arange(12, dtype=torch.float32)
        torch.testing.assert_close(model(x, positions=pos + 7.0), model(x, positions=pos), rtol=1e-5, atol=1e-5)
        # a batch is the same as its rows one by one (the (H, T, T) bias broadcasts over the batch)
        torch.testing.assert_close(model(x), torch.cat([model(x[:1]), model(x[1:])]), rtol=1e-5, atol=1e-5)


def test_bias_under_bf16_autocast():
    model = tiny(Alibi(CFG.head_dim, CFG.rope_base, CFG.train_len))
    x = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert compute_dtype(model.embed(x)) == torch.bfloat16
            got = model(x).float()
    assert torch.isfinite(got).all() and (got - want).abs().max() < 0.05


def test_non_rotary_frequency_table_and_casts():
    for rope in (Alibi(32, 1e4, 64), Sandwich(32, 1e4, 64)):
        assert not rope.rotary and rope.t_max is None and rope.inference_t(1000) == 1
        table = rope.to(torch.bfloat16).frequency_table()
        assert table.shape == (1, 16) and table.dtype == torch.float32 and not table.any()  # θ = 0: no rotation


# ------------------------------------------------------------------ RandomPos
def test_random_positions_rule():
    """Sorted, distinct integers in [0, M), N of them; neither end pinned; deterministic per (seed, step)."""
    N, M = 32, 512
    draws = [random_positions(N, M, step_generator(3, step)) for step in range(200)]
    for p in draws:
        assert p.dtype == torch.float32 and p.shape == (N,)
        assert torch.equal(p, p.round()) and (p[1:] > p[:-1]).all() and p[0] >= 0 and p[-1] <= M - 1
    assert torch.equal(draws[7], random_positions(N, M, step_generator(3, 7)))
    assert not torch.equal(draws[7], draws[8])
    assert not torch.equal(draws[7], random_positions(N, M, step_generator(4, 7)))
    firsts, lasts = torch.stack([p[0] for p in draws]), torch.stack([p[-1] for p in draws])
    assert (firsts > 0).any() and (lasts < M - 1).any()  # not pinned to 0 and M-1 (unlike CLEX's "random")
    assert torch.stack(draws).max() >= M - 8 and torch.stack(draws).min() == 0  # the whole range is used
    assert torch.equal(random_positions(N, N, step_generator(0, 0)), torch.arange(N, dtype=torch.float32))
    with pytest.raises(ValueError, match="seq_len <= max_position"):
        random_positions(N + 1, N, step_generator(0, 0))


def test_clex_random_positions_stream_unchanged():
    """The shared sampler draws exactly what CLEX's inline randperm did (the same stream, the same t)."""
    for N, t, L in [(16, 4, 16), (32, 3, 16), (20, 1, 8)]:
        s, gen = max(1, N // L), step_generator(1, 5)
        inner = torch.randperm(N * t - 2, generator=gen)[: N - 2].sort().values
        want = torch.cat((torch.zeros(1), (inner + 1).float() / s, torch.tensor([float(N * t // s - 1)])))
        assert torch.equal(training_positions("random", N, t, L, step_generator(1, 5)), want)


def test_randompos_in_training_and_evaluation():
    rope = build_position_encoding(RandomPosSpec(type="randompos", max_position_factor=4),
                                   head_dim=CFG.head_dim, base=CFG.rope_base, train_len=CFG.train_len)
    assert type(rope) is RandomPos and rope.max_position == 4 * CFG.train_len and rope.t_max is None
    model = tiny(rope)
    seen = []
    rope.register_forward_hook(lambda module, args, out: seen.append(args))
    lit = LitDecoder(model, OptimConfig(steps=1, batch_size=1, lr=1e-3), seed=5)
    t, positions = lit.scale_and_positions(CFG.train_len)  # step 0 of seed 5
    assert t == 1 and torch.equal(positions, random_positions(CFG.train_len, 4 * CFG.train_len, step_generator(5, 0)))
    with torch.no_grad():
        model(torch.zeros(1, 3 * CFG.train_len, dtype=torch.long))  # evaluation: plain positions, t = 1
    assert torch.equal(seen[-1][0], torch.arange(3 * CFG.train_len, dtype=torch.float32)) and seen[-1][1] == 1
    for ours, ref in zip(rope(positions), PlainRope(CFG.head_dim, CFG.rope_base, CFG.train_len)(positions)):
        assert torch.equal(ours, ref)  # plain RoPE at the drawn positions


# ------------------------------------------------------------------ specs, registry, experiment files
@pytest.mark.parametrize("spec", [RopeSpec(type="rope"), PiSpec(type="pi", factor=4), ClexSpec(type="clex")],
                         ids=lambda s: s.type)
def test_existing_encodings_keep_the_rotary_path(spec):
    enc = build_position_encoding(spec, head_dim=32, base=1e4, train_len=64)
    pos = torch.arange(8.0)
    assert enc.rotary and enc.attention_bias(4, pos, pos) is None
    assert enc.sample_positions(64, step_generator(0, 0)) is None


BAD = [  # (rope mapping, what the message must name)
    ({"type": "sandwich", "d_bar": 3}, "rope.sandwich.d_bar"),
    ({"type": "sandwich", "d_bar": 0}, "rope.sandwich.d_bar"),
    ({"type": "randompos", "max_position_factor": 0}, "rope.randompos.max_position_factor"),
    ({"type": "randompos", "max_position_factor": 2.5}, "rope.randompos.max_position_factor"),
    ({"type": "alibi", "slopes": [0.5]}, "rope.alibi.slopes"),
]


@pytest.mark.parametrize("rope,key", BAD, ids=[f"{r['type']}-{k.split('.')[-1]}" for r, k in BAD])
def test_invalid_specs_raise_naming_the_key(rope, key):
    with pytest.raises(ValidationError, match=re.escape(key)):
        Experiment.model_validate({"name": "x", "rope": rope})


def test_bad_files_give_clear_messages(tmp_path):
    params = tiny_params()
    params["finetune"]["seq_len_factor"] = 2
    study = make_study(tmp_path / "study", params)
    bad = study / "experiments" / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rope": {"type": "sandwich", "d_bar": 7}}))
    with pytest.raises(ParamsError, match=r"experiments/bad.yaml: rope.d_bar: got 7; .*multiple of 2"):
        load_study(study)
    bad.write_text(yaml.safe_dump({"rope": {"type": "randompos", "max_position_factor": 1}}))
    with pytest.raises(ParamsError, match=r"bad.yaml: rope.max_position_factor: 1 is below finetune.seq_len_factor=2"):
        load_study(study)
    bad.write_text(yaml.safe_dump({"rope": {"type": "randompos"}, "position_sampling": "random"}))
    with pytest.raises(ParamsError, match=r"position_sampling: 'random'.*rope.type 'randompos': 'none'"):
        load_study(study)


def test_repo_experiment_files():
    study = load_study(REPO)
    model = study.params.model
    want = {"alibi": Alibi, "sandwich": Sandwich, "randompos": RandomPos}
    for name, cls in want.items():
        exp = study.experiment(name)
        assert exp.rope.type == name and exp.description and exp.position_sampling == "none" and exp.t_max is None
        enc = build_position_encoding(exp.rope, head_dim=model.head_dim, base=model.rope_base,
                                      train_len=model.train_len)
        assert type(enc) is cls and not list(enc.parameters())
    assert study.experiment("sandwich").rope.d_bar == 128
    assert study.experiment("randompos").rope.max_position_factor == study.experiment("clex").t_max
