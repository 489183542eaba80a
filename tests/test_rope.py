"""Position-encoding math against independent references (transformers, closed forms, float64 solves).

Float32 note: the CLEX modules keep the ODE state in float32 like the official code; its rounding
and the solver tolerance bound their agreement with closed forms to ~2e-5 relative. Exact
identities are therefore checked by integrating the same dynamics with a float64 state, at 1e-6.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torchdiffeq import odeint
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from clex.rope import (
    ClexDynamics, ClexSpec, ContinuousClex, DiscreteClex, PlainRope, RopeSpec, build_position_encoding,
    default_inv_freq, ntk_inv_freq, rotary_tables, sample_scale, time_embedding, training_positions,
)
from clex.rope.base import apply_rotary

FP32_ODE_TOL = 5e-5  # float32 ODE state (see module docstring)


def hf_config(head_dim: int, base: float, train_len: int = 64, **rope) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, max_position_embeddings=train_len,
        rope_parameters={"rope_type": "default", "rope_theta": base, **rope},
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs() / b.double().abs()).max().item()


def randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """A non-zero W_down (and fresh W_up), so the learned part of the dynamics is active."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def exact_ntk_log(t: float, head_dim: int, base: float) -> torch.Tensor:
    """ln θ^NTK(t) in float64 from its definition (b·α^(d/(d-2)))^(-2i/d), α = 2t-1."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    b_ntk = base * (2 * t - 1) ** (head_dim / (head_dim - 2))
    return -(2 * i / head_dim) * math.log(b_ntk)


# ------------------------------------------------------------------ plain RoPE vs transformers
@pytest.mark.parametrize("head_dim,base", [(32, 10000.0), (128, 10000.0), (64, 500000.0)])
def test_default_inv_freq_and_tables_match_transformers(head_dim, base):
    cfg = hf_config(head_dim, base)
    hf_inv, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    torch.testing.assert_close(default_inv_freq(head_dim, base), hf_inv, rtol=0, atol=1e-6)

    positions = torch.arange(200)
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), positions[None])
    cos, sin = PlainRope(head_dim, base, 64)(positions.float(), t=7)
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=1e-6)


def test_apply_rotary_matches_transformers():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 32, generator=gen), torch.randn(2, 3, 10, 32, generator=gen)
    positions = torch.rand(2, 10, generator=gen) * 100
    cos, sin = rotary_tables(positions, default_inv_freq(32, 10000.0))  # (B, T, D)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), hf_q)
    torch.testing.assert_close(apply_rotary(k, cos, sin), hf_k)
    hf_q1, _ = apply_rotary_pos_emb(q, k, cos[:1], sin[:1])  # (T, D) tables broadcast over the batch
    torch.testing.assert_close(apply_rotary(q, cos[0], sin[0]), hf_q1)


# ------------------------------------------------------------------ time embedding and ξ_t
@pytest.mark.parametrize("head_dim", [32, 128])
def test_time_embedding_closed_form_and_derivative(head_dim):
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    for t in [1.0, 1.37, 2.0, 5.5, 16.0]:
        log_theta, xi = time_embedding(torch.tensor(t), head_dim, 10000.0)
        assert log_theta.dtype == xi.dtype == torch.float32
        torch.testing.assert_close(log_theta.double(), exact_ntk_log(t, head_dim, 10000.0), rtol=0, atol=1e-5)
        closed = -4 * i / ((head_dim - 2) * (2 * t - 1))
        torch.testing.assert_close(xi.double(), closed, rtol=1e-6, atol=1e-7)
        h = 1e-5  # central difference of the float64 definition: an independent d/dt
        fd = (exact_ntk_log(t + h, head_dim, 10000.0) - exact_ntk_log(t - h, head_dim, 10000.0)) / (2 * h)
        torch.testing.assert_close(xi.double(), fd, rtol=1e-5, atol=1e-6)
    log_theta, xi = time_embedding(0.5, head_dim, 10000.0)  # t < 1: α = 1, no constant term
    torch.testing.assert_close(log_theta.double(), exact_ntk_log(1.0, head_dim, 10000.0), rtol=0, atol=1e-5)
    assert torch.equal(xi, torch.zeros(head_dim // 2))


# ------------------------------------------------------------------ continuous CLEX
@pytest.mark.parametrize("head_dim", [32, 128])
def test_clex_at_init_is_ntk_scaling_with_alpha_2t_minus_1(head_dim):
    base, L = 10000.0, 64
    clex = ContinuousClex(head_dim, base, L, 16)  # default solver: dopri5, rtol 1e-6, atol 1e-8
    dyn, z1 = clex.dynamics, clex.base_inv_freq.double().log()
    hf_cfg = hf_config(head_dim, base, L, rope_type="dynamic", factor=2.0)
    for t in range(2, 17):
        ntk = ntk_inv_freq(head_dim, base, 2 * t - 1)
        hf_dyn, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, None, seq_len=t * L)  # b·(2·tL/L - 1)^(d/(d-2))
        assert rel_err(hf_dyn, ntk) < 1e-6
        # Exact identity: the same dynamics with a float64 state, official solver (rk4, dt = 0.01).
        z = odeint(dyn, z1, torch.tensor([1.0, t], dtype=torch.float64), method="rk4", options={"step_size": 0.01})
        assert rel_err(z[-1].exp(), exact_ntk_log(t, head_dim, base).exp()) < 1e-6
        assert rel_err(z[-1].exp(), hf_dyn) < 1e-6
        # The module's own float32 path.
        assert rel_err(clex.inv_freq(t).detach(), hf_dyn) < FP32_ODE_TOL


def test_t1_returns_base_frequencies_exactly():
    for enc in (ContinuousClex(32, 10000.0, 64, 8), DiscreteClex(32, 10000.0, 64, 8)):
        randomise(enc)
        for mode in (True, False):
            enc.train(mode)
            assert torch.equal(enc.inv_freq(1), default_inv_freq(32, 10000.0))
            assert torch.equal(enc.frequency_table()[0], default_inv_freq(32, 10000.0))


def test_nonzero_ode_dopri5_matches_rk4_reference():
    dyn = ClexDynamics(32, 10000.0, width=2, act="tanh")
    randomise(dyn, scale=0.1)  # moderate weights keep θ(t) finite over t = 1..16
    z1 = default_inv_freq(32, 10000.0).double().log()
    grid = torch.arange(1.0, 17.0, dtype=torch.float64)
    with torch.no_grad():
        ref = odeint(dyn, z1, grid, method="rk4", options={"step_size": 0.01}).exp()
        fast = odeint(dyn, z1, grid, method="dopri5", rtol=1e-9, atol=1e-11).exp()
    assert (ref[-1] - default_inv_freq(32, 10000.0).double()).abs().max() > 1e-3  # the net really acts
    assert rel_err(fast, ref) < 1e-5
    # Production float32 modules, same weights: adaptive vs the official fixed-step setting.
    a = ContinuousClex(32, 10000.0, 64, 16, width=2, act="tanh", method="dopri5", rtol=1e-7, atol=1e-9).eval()
    b = ContinuousClex(32, 10000.0, 64, 16, width=2, act="tanh", method="rk4", step_size=0.01).eval()
    a.dynamics.load_state_dict(dyn.state_dict())
    b.dynamics.load_state_dict(dyn.state_dict())
    assert rel_err(a.frequency_table(), ref.float()) < FP32_ODE_TOL
    assert rel_err(b.frequency_table(), ref.float()) < FP32_ODE_TOL


def test_eval_cache_equals_direct_solves_and_is_invalidated():
    clex = ContinuousClex(32, 10000.0, 64, 6, act="tanh", method="rk4", step_size=0.05)
    randomise(clex)
    direct = torch.stack([clex.inv_freq(t).detach() for t in range(1, 7)])  # training mode: per-t solves
    clex.eval()
    assert rel_err(clex.frequency_table(), direct) < 1e-5
    for t in range(1, 7):
        assert rel_err(clex.inv_freq(t), direct[t - 1]) < 1e-5
    cached = clex.frequency_table()

    clex.train()
    randomise(clex, seed=1)
    direct1 = torch.stack([clex.inv_freq(t).detach() for t in range(1, 7)])
    clex.eval()
    assert rel_err(cached, direct1) > 1e-3
    assert rel_err(clex.frequency_table(), direct1) < 1e-5

    other = ContinuousClex(32, 10000.0, 64, 6, act="tanh", method="rk4", step_size=0.05)
    randomise(other, seed=2)
    expected = torch.stack([other.inv_freq(t).detach() for t in range(1, 7)])
    clex.load_state_dict(other.state_dict())  # still in eval mode
    assert rel_err(clex.frequency_table(), expected) < 1e-5


def test_gradients_reach_the_dynamics_in_training():
    clex = ContinuousClex(32, 10000.0, 64, 8, method="rk4", step_size=0.1)
    with torch.no_grad():
        clex.dynamics.ffn.w_down.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    cos, sin = clex(torch.arange(100.0), t=5)
    (cos.sum() + sin.sum()).backward()
    for p in (clex.dynamics.ffn.w_up, clex.dynamics.ffn.w_down):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_constant_term_off_starts_at_plain_rope():
    clex = ContinuousClex(32, 10000.0, 64, 8, constant_term=False)
    torch.testing.assert_close(clex.inv_freq(5), default_inv_freq(32, 10000.0), rtol=1e-6, atol=0)


def test_float32_under_autocast_and_after_casts():
    clex = ContinuousClex(32, 10000.0, 64, 8, method="rk4", step_size=0.1)
    randomise(clex, scale=0.05)
    positions = torch.arange(300.0)
    cos, sin = clex(positions, t=4)
    assert torch.isfinite(cos).all() and rel_err(clex.inv_freq(4).detach(), clex.base_inv_freq) > 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos_ac, sin_ac = clex(positions, t=4)
    assert cos_ac.dtype == torch.float32
    torch.testing.assert_close(cos_ac, cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin_ac, sin, rtol=0, atol=1e-6)
    clex.to(torch.bfloat16)
    assert torch.equal(clex.base_inv_freq, default_inv_freq(32, 10000.0))


# ------------------------------------------------------------------ discrete CLEX
def test_discrete_shapes_init_and_per_t_independence():
    enc = DiscreteClex(32, 10000.0, 64, 6, width=2)
    assert enc.embedding.weight.shape == (6, 16) and enc.frequency_table().shape == (6, 16)
    assert all(torch.equal(enc.inv_freq(t), default_inv_freq(32, 10000.0)) for t in range(1, 7))  # W_down = 0

    randomise(enc)
    z3 = enc.inv_freq(3)
    assert z3.shape == (16,) and rel_err(z3.detach(), default_inv_freq(32, 10000.0)) > 1e-3
    z3.sum().backward()
    grad = enc.embedding.weight.grad
    assert grad[2].abs().sum() > 0
    assert torch.equal(grad[[0, 1, 3, 4, 5]], torch.zeros(5, 16))
    with torch.no_grad():
        enc.embedding.weight[4].add_(1.0)
    assert torch.equal(enc.inv_freq(3), z3)
    with pytest.raises(ValueError, match="1..6"):
        enc.inv_freq(7)


# ------------------------------------------------------------------ positions and t
@pytest.mark.parametrize("kind", ["random", "uniform"])
@pytest.mark.parametrize("seq_len,train_len,t", [(64, 64, 1), (64, 64, 5), (50, 64, 3), (256, 64, 1), (256, 64, 4)])
def test_training_positions(kind, seq_len, train_len, t):
    gen = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    p = training_positions(kind, seq_len, t, train_len, gen())
    s = max(1, seq_len // train_len)
    last = seq_len * t // s - 1
    assert p.dtype == torch.float32 and p.shape == (seq_len,)
    assert p[0] == 0 and p[-1] == last and p.max() < seq_len * t / s
    # The official random scheme (§3.5) lets p[N-2] reach (N·t-2)/s >= last when s >= 2.
    body = p if s == 1 or kind == "uniform" else p[:-1]
    assert (body.diff() > 0).all()
    assert torch.equal(p, training_positions(kind, seq_len, t, train_len, gen()))
    if t == 1 and s == 1:
        assert torch.equal(p, torch.arange(seq_len, dtype=torch.float32))
    if s > 1 and kind == "random":
        assert (p != p.round()).any()
        if t == 1:  # S is the whole set: positions k/s, i.e. PI with factor s
            torch.testing.assert_close(p[1:-1], torch.arange(1, seq_len - 1) / s)
    if kind == "random" and s == 1 and t > 1:
        assert not torch.equal(p, training_positions(kind, seq_len, t, train_len, torch.Generator().manual_seed(7)))


def test_training_positions_none_and_unknown():
    assert torch.equal(training_positions("none", 10, 4, 64, torch.Generator()), torch.arange(10.0))
    with pytest.raises(ValueError, match="random"):
        training_positions("sorted", 10, 4, 64, torch.Generator())


def test_sample_scale_covers_range_and_is_seeded():
    draws = [sample_scale(5, torch.Generator().manual_seed(0))]
    gen = torch.Generator().manual_seed(0)
    seq = [sample_scale(5, gen) for _ in range(500)]
    assert set(seq) == {1, 2, 3, 4, 5} and seq[0] == draws[0]
    gen = torch.Generator().manual_seed(0)
    assert [sample_scale(5, gen) for _ in range(500)] == seq
    assert {sample_scale(1, gen) for _ in range(20)} == {1}


def test_inference_t():
    clex = DiscreteClex(32, 10000.0, 64, 4)
    assert [clex.inference_t(n) for n in (1, 64, 65, 128, 129, 256, 257, 10_000)] == [1, 1, 2, 2, 3, 4, 4, 4]
    assert PlainRope(32, 10000.0, 64).inference_t(10_000) == 1


# ------------------------------------------------------------------ registry
def test_build_position_encoding():
    kw = dict(head_dim=32, base=10000.0, train_len=64)
    assert type(build_position_encoding(RopeSpec(type="rope"), **kw)) is PlainRope
    disc = build_position_encoding(ClexSpec(type="clex", dynamics="discrete", t_max=4, ode_width=2), **kw)
    assert type(disc) is DiscreteClex and disc.t_max == 4 and disc.ffn.w_up.shape == (16, 64)
    cont = build_position_encoding(
        ClexSpec(type="clex", t_max=8, act="tanh", constant_term=False, solver={"method": "rk4", "step_size": 0.1}), **kw
    )
    assert type(cont) is ContinuousClex and cont.solver == {"method": "rk4"}
    assert (cont.variable, cont.step_size) == ("log_t", 0.1)
    assert not cont.dynamics.constant_term and isinstance(cont.dynamics.ffn.act, torch.nn.Tanh)
    with pytest.raises(ValueError, match=r"'bogus'.*allowed: \[.*'clex'.*'rope'.*\]"):
        build_position_encoding(SimpleNamespace(type="bogus"), **kw)


def test_w_up_init_bound():
    w = ContinuousClex(32, 10000.0, 64, 4, width=3).dynamics.ffn.w_up
    bound = 1 / math.sqrt(3 * 32)
    assert w.shape == (16, 96) and w.abs().max() <= bound and w.abs().max() > 0.9 * bound
