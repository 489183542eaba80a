"""The default CLEX solver against the official reference solve (fixed-step rk4 in t, dt = 0.01).

The accuracy contract of the fast default (rk4 in τ = ln t, step 0.25): for small non-zero ("trained")
ODE weights, θ(t) within 1e-4 relative and weight gradients within 1e-3 relative at every integer
t ≤ t_max. Larger weights can break it, so every continuous fine-tune ends with a check of its trained
table against the reference (`clex.train.solver_check`), tested here. Speed is measured by
benchmarks/ode_solver.py, never here.
"""
from __future__ import annotations

import math

import pytest
import torch

from clex.rope import ContinuousClex, SolverSpec, max_rel_error, ntk_inv_freq, reference_table, solver_fix
from clex.rope.ode import REFERENCE_SOLVER
from clex.train import solver_check

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
    default = SolverSpec().module_kwargs()
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
        lin = ContinuousClex(32, 10000.0, 128, T_MAX, t_scale="linear", **SolverSpec().module_kwargs())
        log = ContinuousClex(32, 10000.0, 128, T_MAX, t_scale="log", **SolverSpec().module_kwargs())
        assert torch.equal(lin.inv_freq(t), log.inv_freq(t))
        ntk = ntk_inv_freq(32, 10000.0, 2 * t - 1)
        assert ((log.inv_freq(t).detach() - ntk).abs() / ntk).max() < 5e-5


def test_log_t_scale_matches_an_independent_float64_solve():
    """dz/dτ = act((z + ln θ^NTK(t))·W_up)·W_down + t·ξ_t in τ = ln t, written out here in float64."""
    from torchdiffeq import odeint

    m = clex(32, SolverSpec().module_kwargs(), 0.02, act="tanh")
    m.dynamics.t_scale = "log"
    w_up, w_down = (p.detach().double() for p in (m.dynamics.ffn.w_up, m.dynamics.ffn.w_down))
    i = torch.arange(16, dtype=torch.float64)

    def rhs(tau, z):
        t = tau.exp()
        log_theta_ntk = -(2 * i / 32) * math.log(10000.0) - (2 * i / 30) * torch.log(2 * t - 1)
        xi = -(2 * i / 30) * 2 / (2 * t - 1)
        return torch.tanh((z + log_theta_ntk) @ w_up) @ w_down + t * xi

    z1 = m.base_inv_freq.double().log()
    linear = clex(32, SolverSpec().module_kwargs(), 0.02, act="tanh")
    for t in (2, 5, 16):
        exact = odeint(rhs, z1, torch.tensor([0.0, math.log(t)], dtype=torch.float64), rtol=1e-11, atol=1e-12)[-1].exp()
        ours = m.inv_freq(t).detach().double()
        assert ((ours - exact).abs() / exact).max() < 1e-4
        assert ((linear.inv_freq(t).detach().double() - exact).abs() / exact).max() > 1e-3  # a different model


# ------------------------------------------------------------------ the end-of-fine-tune solver check
def independent_float64_table(m: ContinuousClex, act) -> torch.Tensor:
    """θ(t), t = 1..T_MAX, of the official ODE (dz/dt = act((z + ln θ^NTK(t))·W_up)·W_down + ξ_t) written out
    here in float64 and solved adaptively to 1e-12."""
    from torchdiffeq import odeint

    d = m.head_dim
    w_up, w_down = (p.detach().double() for p in (m.dynamics.ffn.w_up, m.dynamics.ffn.w_down))
    i = torch.arange(d // 2, dtype=torch.float64)

    def rhs(t, z):
        log_theta_ntk = -(2 * i / d) * math.log(10000.0) - (2 * i / (d - 2)) * torch.log(2 * t - 1)
        return act((z + log_theta_ntk) @ w_up) @ w_down - (2 * i / (d - 2)) * 2 / (2 * t - 1)

    times = torch.arange(1, T_MAX + 1, dtype=torch.float64)
    return odeint(rhs, m.base_inv_freq.double().log(), times, rtol=1e-12, atol=1e-12).exp()


def test_reference_table_is_the_exact_solve():
    m = clex(32, SolverSpec().module_kwargs(), 0.05)
    exact = independent_float64_table(m, torch.nn.functional.silu)
    ref = reference_table(m)
    assert ref.dtype == torch.float64 and ref.shape == (T_MAX, 16)
    assert ((ref - exact).abs() / exact).max() < 1e-5  # 10× below the check's default tolerance (float32 constants)
    err, at = max_rel_error(m, ref)
    table = m.frequency_table().double()  # the table training and inference use
    assert err == pytest.approx((((table - exact).abs() / exact)[1:]).max().item(), rel=1e-3)
    assert ((table - exact).abs() / exact)[at - 1].max().item() == pytest.approx(err, rel=1e-3)


def test_check_fires_where_a_quarter_step_in_ln_t_is_not_enough():
    """Issue 10: W_down ~ N(0, 0.05), silu, head dim 32: rk4 at h = 0.25 in ln t is ~1e-3 off the official
    solve at large t; h = 0.05 is within 1e-5. The check fails and names the first finer step that passes."""
    m = clex(32, SolverSpec().module_kwargs(), 0.05)
    err, message = solver_check(m, 1e-4, "finetune@clex-0 (MLflow run abc)")
    assert err > 5e-4 and message is not None
    for words in ("finetune@clex-0 (MLflow run abc)", f"{err:.2e}", "rope.solver.max_rel_error = 0.0001",
                  "{method: rk4, variable: log_t, step_size: 0.25}", "rope.solver.step_size: 0.1",
                  "{method: rk4, variable: t, step_size: 0.01}"):
        assert words in message, words
    ref = reference_table(m)
    assert max_rel_error(m, ref, {**m.settings, "step_size": 0.1})[0] <= 1e-4 < max_rel_error(m, ref)[0]
    assert max_rel_error(m, ref, {**m.settings, "step_size": 0.05})[0] < 1e-5


def test_check_passes_on_small_weights_and_names_the_reference_when_nothing_else_passes():
    small = clex(32, SolverSpec().module_kwargs(), 0.01)
    err, message = solver_check(small, 1e-4, "run")
    assert message is None and 0 < err < 1e-4
    err, message = solver_check(small, 1e-12, "run")  # float32 solves can never be that close
    assert "no finer step" in message and "{method: rk4, variable: t, step_size: 0.01}" in message
    adaptive = clex(32, {"method": "dopri5", "variable": "t", "rtol": 1e-3, "atol": 1e-3}, 0.01)  # 4e-3 off
    fix = solver_fix(adaptive, reference_table(adaptive), 1e-4)  # 10× and 100× tighter are not enough here
    assert fix == {"rtol": pytest.approx(1e-6), "atol": pytest.approx(1e-6)}


def test_failing_check_fails_the_stage_cleanly(trained_study):
    """A check that cannot pass (max_rel_error below float32 rounding): exit 2 with the message, no outputs,
    the MLflow run FAILED with its solver_max_rel_error."""
    import mlflow

    from conftest import run

    exp = trained_study / "experiments" / "clex_solver_test.yaml"
    exp.write_text("extends: clex\nrope: {solver: {max_rel_error: 1.0e-9}}\n")
    try:
        proc = run(trained_study, "clex", "finetune", "clex_solver_test", "--seed", "0", check=False)
    finally:
        exp.unlink()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "rope.solver.max_rel_error = 1e-09" in proc.stderr and "finetune@clex_solver_test-0" in proc.stderr
    assert not (trained_study / "build/finetune/clex_solver_test").exists()
    assert not (trained_study / "build/resume/finetune@clex_solver_test-0").exists()
    client = mlflow.MlflowClient(f"sqlite:///{trained_study / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("clex-study").experiment_id],
                              "tags.dvc_stage = 'finetune@clex_solver_test-0'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED" and runs[0].info.run_id in proc.stderr
    assert 0 < runs[0].data.metrics["solver_max_rel_error"] < 1e-4
