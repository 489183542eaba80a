"""CLEX ODE solvers against the official reference solve: accuracy of θ(t) and of gradients, and cost.

For each solver and each integer t in 2..t_max: one training-mode solve of θ(t), a backward pass of a
fixed random probe Σ_i w_i·ln θ_i(t), and their wall time. Errors are relative to the reference
(fixed-step rk4 in t at dt = 0.01, docs/method.md §3.1): max_i |θ_i − θ_i^ref| / θ_i^ref, and per weight
tensor ‖∇ − ∇^ref‖ / ‖∇^ref‖. Time is averaged over t ~ U{1..t_max} as in training (t = 1 is free).
Weights: a fine-tuned checkpoint's (default build/finetune/clex/seed0/model.pt when it exists),
otherwise non-zero random ones.

    ./run python benchmarks/ode_solver.py [--checkpoint PATH] [--json build/benchmarks/ode_solver.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from clex.config import SolverSpec, load_study
from clex.rope import ContinuousClex
from clex.rope.ode import REFERENCE_SOLVER

CANDIDATES = [SolverSpec(**c) for c in (
    {"method": "dopri5", "variable": "t", "rtol": 1e-6, "atol": 1e-8},
    {"method": "dopri5", "variable": "log_t", "rtol": 1e-6, "atol": 1e-8},
    {"method": "rk4", "variable": "log_t", "step_size": 0.1},
    {"method": "rk4", "variable": "log_t", "step_size": 0.25},
    {"method": "rk4", "variable": "log_t", "step_size": 0.5},
    {"method": "rk4", "variable": "t", "step_size": 0.25},
)]


def label(spec: SolverSpec) -> str:
    keys = ("method", "variable", "step_size") if spec.method == "rk4" else ("method", "variable", "rtol", "atol")
    return ", ".join(f"{k}={getattr(spec, k)}" for k in keys)


def load_weights(clex: ContinuousClex, checkpoint: Path | None) -> str:
    if checkpoint and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        clex.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("rope.")}, strict=False)
        return str(checkpoint)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clex.dynamics.ffn.w_down.copy_(torch.randn(clex.dynamics.ffn.w_down.shape, generator=gen) * 0.05)
    return "random non-zero W_down ~ N(0, 0.05²)"


def measure(clex: ContinuousClex, probe: torch.Tensor, reps: int) -> dict[int, dict]:
    """Per t: θ(t), the gradient of the probe w.r.t. each weight, and the median fwd+bwd seconds."""
    out = {}
    params = dict(clex.dynamics.named_parameters())
    for t in range(2, clex.t_max + 1):
        times = []
        for _ in range(reps):
            for p in params.values():
                p.grad = None
            start = time.perf_counter()
            theta = clex.inv_freq(t)
            (probe * theta.log()).sum().backward()
            times.append(time.perf_counter() - start)
        out[t] = {"theta": theta.detach(), "grads": {k: p.grad.clone() for k, p in params.items()},
                  "seconds": statistics.median(times)}
    return out


def build(study, spec: SolverSpec, weights_from: Path | None) -> tuple[ContinuousClex, str]:
    exp = study.experiment("clex")
    m = study.params.model
    clex = ContinuousClex(m.head_dim, m.rope_base, m.train_len, exp.rope.t_max, width=exp.rope.ode_width,
                          act=exp.rope.act, constant_term=exp.rope.constant_term, **spec.module_kwargs())
    return clex.train(), load_weights(clex, weights_from)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".")
    ap.add_argument("--checkpoint", type=Path, default=Path("build/finetune/clex/seed0/model.pt"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("build/benchmarks/ode_solver.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the ODE is a 16-vector: threads only add overhead
    study = load_study(args.root)
    configured = study.experiment("clex").rope.solver
    probe = torch.randn(study.params.model.head_dim // 2, generator=torch.Generator().manual_seed(1))
    ref_clex, weights = build(study, SolverSpec(**REFERENCE_SOLVER), args.checkpoint)
    ref = measure(ref_clex, probe, reps=1)
    t_max = ref_clex.t_max
    mean_time = lambda res: sum(r["seconds"] for r in res.values()) / t_max  # noqa: E731  t=1 costs nothing
    ref_time = mean_time(ref)
    rows = []
    print(f"weights: {weights}; t = 2..{t_max}; reference {REFERENCE_SOLVER}: {1000 * ref_time:.1f} ms per step "
          "(fwd+bwd, mean over t ~ U{1..t_max})")
    print(f"{'solver':48s} {'ms/step':>8s} {'speedup':>8s} {'max θ err':>10s} {'max grad err':>12s}")
    for spec in [configured] + [c for c in CANDIDATES if c != configured]:
        res = measure(build(study, spec, args.checkpoint)[0], probe, args.reps)
        theta_err = max(((res[t]["theta"] - ref[t]["theta"]).abs() / ref[t]["theta"]).max().item() for t in res)
        grad_err = max(((res[t]["grads"][k] - g).norm() / g.norm()).item() for t in res for k, g in ref[t]["grads"].items())
        row = {"solver": label(spec), "configured": spec == configured, "ms_per_step": 1000 * mean_time(res),
               "speedup_vs_reference": ref_time / mean_time(res), "max_theta_rel_err": theta_err,
               "max_grad_rel_err": grad_err}
        rows.append(row)
        name = label(spec) + (" (configured)" if row["configured"] else "")
        print(f"{name:48s} {row['ms_per_step']:8.2f} {row['speedup_vs_reference']:7.1f}x {theta_err:10.2e} {grad_err:12.2e}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"weights": weights, "reference": REFERENCE_SOLVER,
                                     "reference_ms_per_step": 1000 * ref_time, "rows": rows}, indent=2))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
