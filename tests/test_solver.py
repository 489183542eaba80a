"""The default CLEX solver against the official reference solve (fixed-step rk4 in t, dt = 0.01).

The accuracy contract of the fast default (rk4 in τ = ln t, step 0.25): for non-zero ("trained")
ODE weights, θ(t) within 1e-4 relative and weight gradients within 1e-3 relative at every integer
t ≤ t_max. Speed is measured by benchmarks/ode_solver.py, never here.
"""
from __future__ import annotations

import math

import pytest
import torch

from clex.config import SolverSpec
from clex.rope import ContinuousClex, ntk_inv_freq
from clex.rope.ode import REFERENCE_SOLVER

T_MAX = 16


def clex(head_dim: int, spec: dict, w_down_std: float, act: str = "silu") -> ContinuousClex:
    """A continuous CLEX with non-zero W_down, of the size fine-tuning gives (max |w| ≈ 0.03 after 200 steps)."""
    torch.manual_seed(0)
    m = ContinuousClex(head_dim, 10000.0, 128, T_MAX, act=act, **spec)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.dynamics.ffn.w_down.copy_(torch.randn(m.dynamics.ffn.w_down.shape, generator=gen) * w_down_std)
    return m.train()


def solve_with_grads(m: ContinuousClex, t: int, probe: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in m.parameters():
        p.grad = None
    theta = m.inv_freq(t)
    (probe * theta.log()).sum().backward()
    return theta.detach(), [p.grad.clone() for p in m.dynamics.parameters()]


@pytest.mark.parametrize("head_dim,w_down_std,act", [(32, 0.01, "silu"), (32, 0.02, "tanh"), (128, 0.01, "silu")])
def test_default_solver_matches_reference(head_dim, w_down_std, act):
    default = SolverSpec().model_dump()
    fast, ref = clex(head_dim, default, w_down_std, act), clex(head_dim, REFERENCE_SOLVER, w_down_std, act)
    probe = torch.randn(head_dim // 2, generator=torch.Generator().manual_seed(2))
    moved = 0.0
    for t in range(2, T_MAX + 1):
        theta, grads = solve_with_grads(fast, t, probe)
        theta_ref, grads_ref = solve_with_grads(ref, t, probe)
        assert ((theta - theta_ref).abs() / theta_ref).max() < 1e-4, t
        for g, g_ref in zip(grads, grads_ref):
            assert (g - g_ref).norm() / g_ref.norm() < 1e-3, t
        moved = max(moved, ((theta_ref - ntk_inv_freq(head_dim, 10000.0, 2 * t - 1)).abs() / theta_ref).max().item())
    assert moved > 1e-2  # the weights really move θ(t) away from the NTK prior


def test_log_t_steps_and_eval_table_equal_training_solves():
    m = clex(32, {"method": "rk4", "variable": "log_t", "step_size": 0.25}, 0.05)
    for t in (2, 5, 16):
        m.dynamics.nfe = 0
        m.inv_freq(t)
        assert m.dynamics.nfe == 4 * math.ceil(math.log(t) / 0.25)  # rk4: 4 evaluations per step
    training = torch.stack([m.inv_freq(t).detach() for t in range(1, T_MAX + 1)])
    m.eval()
    assert torch.equal(m.frequency_table(), training)  # inference uses exactly the θ(t) of training


def test_reference_grid_is_the_official_one():
    m = clex(32, REFERENCE_SOLVER, 0.05)
    m.dynamics.nfe = 0
    m.inv_freq(3)
    assert m.dynamics.nfe == 4 * 200  # [1, 3] at dt = 0.01


# ------------------------------------------------------------------ t_scale: the rate the network learns
def test_log_t_scale_with_zero_network_is_linear_and_ntk():
    for t in (2, 7, 16):
        lin = ContinuousClex(32, 10000.0, 128, T_MAX, t_scale="linear", **SolverSpec().model_dump())
        log = ContinuousClex(32, 10000.0, 128, T_MAX, t_scale="log", **SolverSpec().model_dump())
        assert torch.equal(lin.inv_freq(t), log.inv_freq(t))
        ntk = ntk_inv_freq(32, 10000.0, 2 * t - 1)
        assert ((log.inv_freq(t).detach() - ntk).abs() / ntk).max() < 5e-5


def test_log_t_scale_matches_an_independent_float64_solve():
    """dz/dτ = act((z + ln θ^NTK(t))·W_up)·W_down + t·ξ_t in τ = ln t, written out here in float64."""
    from torchdiffeq import odeint

    m = clex(32, SolverSpec().model_dump(), 0.02, act="tanh")
    m.dynamics.t_scale = "log"
    w_up, w_down = (p.detach().double() for p in (m.dynamics.ffn.w_up, m.dynamics.ffn.w_down))
    i = torch.arange(16, dtype=torch.float64)

    def rhs(tau, z):
        t = tau.exp()
        log_theta_ntk = -(2 * i / 32) * math.log(10000.0) - (2 * i / 30) * torch.log(2 * t - 1)
        xi = -(2 * i / 30) * 2 / (2 * t - 1)
        return torch.tanh((z + log_theta_ntk) @ w_up) @ w_down + t * xi

    z1 = m.base_inv_freq.double().log()
    linear = clex(32, SolverSpec().model_dump(), 0.02, act="tanh")
    for t in (2, 5, 16):
        exact = odeint(rhs, z1, torch.tensor([0.0, math.log(t)], dtype=torch.float64), rtol=1e-11, atol=1e-12)[-1].exp()
        ours = m.inv_freq(t).detach().double()
        assert ((ours - exact).abs() / exact).max() < 1e-4
        assert ((linear.inv_freq(t).detach().double() - exact).abs() / exact).max() > 1e-3  # a different model
