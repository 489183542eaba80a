"""CLEX: learned log-frequencies z(t) = ln θ(t), continuous (ODE) or discrete (per-t embedding).

docs/method.md §3.1-3.3 (state, dynamics g, constant term ξ_t), §3.6 (inference cache), §3.8 and §8
(discrete baseline). With W_down = 0 at init, both variants start from a known prior: the
continuous one from NTK-aware scaling with α = 2t-1 (or plain RoPE without ξ), the discrete one
from plain RoPE.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from torch import Tensor, nn

from clex.spec import Strict

from .base import PositionEncoding, fp32
from .registry import register

ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh}
# torchdiffeq methods on a fixed grid: they take a grid (here: `grid_constructor`), not rtol/atol.
FIXED_GRID_METHODS = frozenset(
    {"euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams"}
)
VARIABLES = ("t", "log_t")
# The official solve (docs/method.md §3.1): fixed-step rk4 in t at dt = 0.01, back-propagated through every step.
REFERENCE_SOLVER = {"method": "rk4", "variable": "t", "step_size": 0.01}


class SolverSpec(Strict):
    """torchdiffeq solver for the CLEX ODE (docs/method.md §3.1, §8 `time_dt`).

    The default is rk4 with a fixed step of 0.25 in τ = ln t: the same ODE after a change of variables,
    whose frequencies stay within 1e-4 (relative) of the official solve and whose gradients within 1e-3
    (tests/test_solver.py, benchmarks/ode_solver.py) at a fraction of its cost. The official reference
    is `{method: rk4, variable: t, step_size: 0.01}`: 1,500 steps to t = 16, back-propagated through.
    That accuracy depends on the weights (larger ODE weights need finer steps), so every continuous
    fine-tune compares its trained θ(t) with the reference and fails above `max_rel_error`, naming a fix.
    """

    method: Literal["dopri5", "dopri8", "bosh3", "adaptive_heun", "rk4", "midpoint", "euler"] = "rk4"
    variable: Literal["t", "log_t"] = Field("log_t", description="solve in t (official) or in ln t (same ODE)")
    step_size: float = Field(0.25, gt=0, le=1, description="fixed-grid methods only, in units of `variable`")
    rtol: float = Field(1e-6, gt=0, lt=1, description="adaptive methods only")
    atol: float = Field(1e-8, gt=0, lt=1, description="adaptive methods only")
    max_rel_error: float = Field(
        1e-4, gt=0, allow_inf_nan=False,
        description="end-of-fine-tune check: max relative error of θ(t) against the reference solve, else the stage fails")

    def module_kwargs(self) -> dict:
        """The ContinuousClex keyword arguments (everything but the check's tolerance)."""
        return self.model_dump(exclude={"max_rel_error"})


class ClexSpec(Strict):
    """CLEX (docs/method.md §3): learned log-frequencies z(t), continuous (ODE) or discrete (per-t embedding)."""

    type: Literal["clex"]
    dynamics: Literal["continuous", "discrete"] = "continuous"
    t_max: int = Field(16, ge=1)
    ode_width: int = Field(1, ge=1, description="λ: hidden width of the dynamics FFN is λ·d")
    act: Literal["silu", "tanh"] = "silu"
    constant_term: bool = True
    t_scale: Literal["linear", "log"] = Field(
        "linear", description="the rate the ODE network learns: dz/dt (official) or dz/d(ln t)")
    solver: SolverSpec = SolverSpec()
    time_embedding_base: Literal["model"] | float = Field(
        10000.0, description="b of the ODE's NTK time embedding: 10000 (official, whatever the RoPE base) or "
                             "'model' (model.rope_base); continuous dynamics only")

    @field_validator("time_embedding_base", mode="before")
    @classmethod
    def _embedding_base(cls, v):
        if v == "model" or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 1):
            return v
        raise PydanticCustomError("time_embedding_base", "allowed: 'model' (model.rope_base) or a number > 1 "
                                                         "(official: 10000)")

    @model_validator(mode="after")
    def _continuous_only(self) -> "ClexSpec":
        if self.dynamics == "discrete" and self.t_scale != "linear":
            raise ValueError(f"rope.t_scale: {self.t_scale!r} needs an ODE; allowed with rope.dynamics "
                             f"'discrete': 'linear' (t_scale is a knob of the continuous dynamics)")
        return self


def time_embedding(t: Tensor | float, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """(ln θ^NTK(t), ξ_t), each (head_dim//2,) float32 (docs/method.md §3.3); see `NtkTimeEmbedding`."""
    return NtkTimeEmbedding(head_dim, base)(torch.as_tensor(t, dtype=torch.float32))


class NtkTimeEmbedding(nn.Module):
    """t -> (ln θ^NTK(t), ξ_t) with the t-independent parts precomputed (one ODE evaluation stays cheap).

    α = 2t-1 for t >= 1, else 1; ln θ^NTK_i = -(2i/d)·ln b - (2i/(d-2))·ln α, and
    ξ_t,i = d ln θ^NTK_i / dt = -(2i/(d-2))·2/α (0 for t < 1, where α is constant).
    The constants are float32 buffers, rebuilt in float32 after any cast of the model; a float64 t
    (the reference solve, `reference_table`) computes in float64 from those constants.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, float(base)
        self._constants(torch.device("cpu"))

    def _constants(self, device: torch.device) -> None:
        i = torch.arange(self.head_dim // 2, dtype=torch.float32, device=device)
        self.register_buffer("log_theta_1", -(2 * i / self.head_dim) * math.log(self.base), persistent=False)
        self.register_buffer("slope", 2 * i / (self.head_dim - 2), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._constants(self.slope.device)
        return self

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        t = t.to(self.slope.device, dtype)
        slope, log_theta_1 = self.slope.to(dtype), self.log_theta_1.to(dtype)
        alpha = (2 * t - 1).clamp_min(1.0)
        xi = slope * (-2 / alpha)
        return log_theta_1 - slope * alpha.log(), torch.where(t >= 1, xi, torch.zeros_like(xi))


class UpDownFFN(nn.Module):
    """x -> act(x·W_up)·W_down, no biases (the official `ODELinear` net, docs/method.md §3.2).

    W_up (d/2, λd) gets kaiming_uniform_(a=√5), i.e. U(±1/√(λd)) since PyTorch's fan_in is size(1);
    W_down (λd, d/2) starts at zero, so the net's output is 0 at init. Computed in the input's
    dtype promoted to at least float32 (the CLEX modules feed float32, as the official code does).
    """

    def __init__(self, head_dim: int, width: int, act: str):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act: {act!r} is not one of {sorted(ACTIVATIONS)}")
        self.w_up = nn.Parameter(torch.empty(head_dim // 2, width * head_dim))
        self.w_down = nn.Parameter(torch.zeros(width * head_dim, head_dim // 2))
        nn.init.kaiming_uniform_(self.w_up, a=math.sqrt(5))
        self.act = ACTIVATIONS[act]()

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return self.act(x.to(dtype) @ self.w_up.to(dtype)) @ self.w_down.to(dtype)


T_SCALES = ("linear", "log")


class ClexDynamics(nn.Module):
    """g(t, z) = act((z + ln θ^NTK(t))·W_up)·W_down + ξ_t, the right-hand side dz/dt (docs/method.md §3.2).

    `t_scale` (docs/method.md §8) says which rate the network learns. 'linear' (official): the network
    output is dz/dt. 'log': it is dz/dτ with τ = ln t, i.e. dz/dt = NN/t + ξ_t, so its influence per
    unit of t decays like 1/t; the constant term stays dz/dt of the NTK prior in both, and with a
    zero network both give NTK scaling with α = 2t-1. `base` is the time embedding's base: the official
    code always uses 10000 there, whatever the RoPE base (docs/method.md §3.3; `rope.time_embedding_base`).
    It does not enter ξ_t. `nfe` counts evaluations; whoever wants per-solve counts resets it.
    """

    def __init__(self, head_dim: int, base: float, width: int = 1, act: str = "silu", constant_term: bool = True,
                 t_scale: str = "linear"):
        super().__init__()
        if t_scale not in T_SCALES:
            raise ValueError(f"t_scale: {t_scale!r} is not one of {list(T_SCALES)}")
        self.head_dim, self.base, self.constant_term, self.t_scale = head_dim, float(base), constant_term, t_scale
        self.ffn = UpDownFFN(head_dim, width, act)
        self.embed = NtkTimeEmbedding(head_dim, base)
        self.nfe = 0

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        self.nfe += 1
        log_theta_ntk, xi = self.embed(t)
        dz = self.ffn(z + log_theta_ntk)
        if self.t_scale == "log":
            dz = dz / t
        return dz + xi if self.constant_term else dz


class LogTime(nn.Module):
    """The same ODE in τ = ln t: dz/dτ = t·g(t, z). Under the NTK prior z(t) ≈ z(1) - c·ln(2t-1) is
    nearly linear in τ, so a few fixed steps in τ reach the accuracy of 1,500 steps in t."""

    def __init__(self, dynamics: ClexDynamics):
        super().__init__()
        self.dynamics = dynamics

    def forward(self, tau: Tensor, z: Tensor) -> Tensor:
        t = tau.exp()
        return t * self.dynamics(t, z)


def _check_clex_dims(head_dim: int) -> None:
    if head_dim < 4:
        raise ValueError(f"head_dim: {head_dim} must be >= 4 for CLEX (the NTK exponent divides by d-2)")


@register(ClexSpec)
class Clex(PositionEncoding):
    """CLEX, rope.type 'clex': `from_spec` builds the continuous (`ContinuousClex`) or discrete (`DiscreteClex`)
    variant; both share these traits (learned weights, rotary)."""

    @classmethod
    def from_spec(cls, spec: ClexSpec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
        common = dict(width=spec.ode_width, act=spec.act)
        if spec.dynamics == "discrete":
            return DiscreteClex(head_dim, base, train_len, spec.t_max, **common)
        if spec.dynamics == "continuous":
            embedding_base = base if spec.time_embedding_base == "model" else spec.time_embedding_base
            return ContinuousClex(
                head_dim, base, train_len, spec.t_max, constant_term=spec.constant_term, t_scale=spec.t_scale,
                time_embedding_base=embedding_base, **spec.solver.module_kwargs(), **common,
            )
        raise ValueError(f"rope.dynamics: {spec.dynamics!r} is unknown; allowed: ['continuous', 'discrete']")


class ContinuousClex(Clex):
    """CLEX with continuous dynamics: z(1) = ln θ, dz/dt = g(t, z), θ(t) = exp(z(t)) (docs/method.md §3.1).

    Each θ(t) is one torchdiffeq solve from 1 to t, in the variable `variable` ('t' as the official
    code, or 'log_t': the same ODE in τ = ln t, see `LogTime`). Fixed-grid methods split [start, end]
    into ceil(Δ/step_size) equal steps (the official grid when Δ/step_size is whole); adaptive methods
    use rtol/atol. t = 1 returns the base frequencies exactly (the official code skips the ODE there).
    In training mode every call solves and back-propagates through the solver steps (no adjoint). In
    eval mode integer t in 1..t_max read a table filled once by the same per-t solves, so inference
    uses exactly the θ(t) of training (docs/method.md §3.6). The official code never invalidates its cache;
    here `train()`/`eval()`, `load_state_dict` and `.to()` clear it. Editing the weights in place while
    in eval mode needs an explicit `clear_cache()`. `time_embedding_base` is the ODE's time-embedding
    base (None: `base`).
    """

    def __init__(
        self, head_dim: int, base: float, train_len: int, t_max: int, *, width: int = 1, act: str = "silu",
        constant_term: bool = True, t_scale: str = "linear", method: str = "dopri5", variable: str = "t",
        step_size: float = 0.01, rtol: float = 1e-6, atol: float = 1e-8, time_embedding_base: float | None = None,
    ):
        _check_clex_dims(head_dim)
        if variable not in VARIABLES:
            raise ValueError(f"variable: {variable!r} is not one of {list(VARIABLES)}")
        super().__init__(head_dim, base, train_len, t_max)
        self.dynamics = ClexDynamics(head_dim, time_embedding_base or base, width, act, constant_term, t_scale)
        self.variable, self.method, self.step_size = variable, method, step_size
        self.solver = {"method": method} if method in FIXED_GRID_METHODS else {"method": method, "rtol": rtol, "atol": atol}
        self.settings = {"method": method, "variable": variable, "step_size": step_size, "rtol": rtol, "atol": atol}
        self._cache: Tensor | None = None

    def _solve(self, t: float, settings: dict | None = None) -> Tensor:
        """exp(z(t)) from one float32 solve over [1, t] with this module's solver (or `settings`)."""
        return self.integrate([1.0, float(t)], settings or self.settings)[-1].exp()

    def integrate(self, times: list[float], settings: dict, dtype: torch.dtype = torch.float32) -> Tensor:
        """z at `times` (increasing, from 1) from ONE solve with `settings` ({method, variable, step_size,
        rtol, atol}; in t or in ln t), in `dtype`; fixed-grid methods split [1, times[-1]] into
        ceil(Δ/step_size) equal steps and read the other times off that grid."""
        z1 = self.base_inv_freq.to(dtype).log()
        log = settings["variable"] == "log_t"
        func = LogTime(self.dynamics) if log else self.dynamics
        points = [math.log(t) if log else float(t) for t in times]
        span = torch.tensor(points, dtype=dtype, device=z1.device)
        kwargs: dict = {"method": settings["method"]}
        if settings["method"] in FIXED_GRID_METHODS:
            start, end = points[0], points[-1]
            steps = max(1, math.ceil((end - start) / settings["step_size"] - 1e-9))
            grid = torch.linspace(start, end, steps + 1, dtype=dtype, device=z1.device)
            kwargs["options"] = {"grid_constructor": lambda *_: grid}
        else:
            kwargs.update(rtol=settings["rtol"], atol=settings["atol"])
        from torchdiffeq import odeint  # imported on the first solve: config and validation need no solver

        with fp32(z1.device):
            return odeint(func, z1, span, **kwargs)

    def inv_freq(self, t: int) -> Tensor:
        if t < 1:
            raise ValueError(f"t: {t} must be >= 1")
        if t == 1:
            return self.base_inv_freq
        if not self.training and float(t).is_integer() and t <= self.t_max:
            return self.frequency_table()[int(t) - 1]
        return self._solve(t)

    @torch.no_grad()
    def frequency_table(self) -> Tensor:
        """θ(t) for t = 1..t_max, the same per-t solves as training; cached in eval mode."""
        if self.training:
            return self._table()
        if self._cache is None:
            self._cache = self._table()
        return self._cache

    def _table(self, settings: dict | None = None) -> Tensor:
        return torch.stack([self.base_inv_freq] + [self._solve(t, settings) for t in range(2, self.t_max + 1)])

    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)


class DiscreteClex(Clex):
    """Discrete-dynamics baseline (docs/method.md §3.8, §8): z(t) = z(1) + FFN(e_t), t in 1..t_max.

    e_t is a learnable embedding per integer t (nn.Embedding(t_max, d/2), N(0, 1) init); FFN is the
    same up/down net as the ODE's, without time embedding or ξ. Rows are independent: z(t) depends
    on e_t only. Choice: t = 1 returns the base frequencies exactly (e_1 is unused), mirroring the
    continuous variant where t = 1 skips the ODE. Cheap, so no cache.
    """

    def __init__(self, head_dim: int, base: float, train_len: int, t_max: int, *, width: int = 1, act: str = "silu"):
        _check_clex_dims(head_dim)
        super().__init__(head_dim, base, train_len, t_max)
        self.embedding = nn.Embedding(t_max, head_dim // 2)
        self.ffn = UpDownFFN(head_dim, width, act)

    def inv_freq(self, t: int) -> Tensor:
        if not (float(t).is_integer() and 1 <= t <= self.t_max):
            raise ValueError(f"t: {t} must be an integer in 1..{self.t_max} for discrete CLEX")
        if t == 1:
            return self.base_inv_freq
        e_t = self.embedding.weight[int(t) - 1]
        with fp32(e_t.device):  # θ·exp(NN(e_t)) = exp(z(1) + NN(e_t)), exactly θ while W_down = 0
            return self.base_inv_freq * self.ffn(e_t).exp()


# ------------------------------------------------------------------ effective step size and solver accuracy
def effective_step_scale(rope: PositionEncoding, t: int | None = None) -> float:
    """S = max_j Σ_p |∂z_j(t)/∂p| over the encoding's trainable parameters, z = ln θ, t defaulting to t_max.

    One sign-coherent Adam update of size lr moves z_j(t) by about lr·S (the first update, every |Δp| ≈ lr),
    so lr = step / S makes z move about `step` per update whatever the encoding. By autograd through the
    training-mode computation (the configured solver for the ODE). At W_down = 0 this is Σ_k |∫₁ᵗ h_k ds|
    for the continuous variant (h = the up-projection's activations along the prior) and Σ_k |act(e_t·W_up)_k|
    for the discrete one. 0 for an encoding without parameters or without a scale t.
    """
    params = [p for p in rope.parameters() if p.requires_grad]
    if not params or rope.t_max is None:
        return 0.0
    was_training = rope.training
    rope.train()
    try:
        with torch.enable_grad():
            z = rope.inv_freq(t or rope.t_max).log()
            if not z.requires_grad:  # t = 1: the base frequencies, no parameter involved
                return 0.0
            sums = [sum(g.abs().sum().item() for g in torch.autograd.grad(z_j, params, retain_graph=True,
                                                                           allow_unused=True) if g is not None)
                    for z_j in z]
    finally:
        rope.train(was_training)
    return max(sums)


@torch.no_grad()
def reference_table(rope: ContinuousClex) -> Tensor:
    """θ(t) for t = 1..t_max, float64, from one REFERENCE_SOLVER solve (rk4 in t, dt = 0.01, the official
    setting) over [1, t_max] read at the integers, which lie on its grid (the official cache does the same)."""
    return rope.integrate([float(t) for t in range(1, rope.t_max + 1)], REFERENCE_SOLVER, torch.float64).exp()


@torch.no_grad()
def max_rel_error(rope: ContinuousClex, reference: Tensor, settings: dict | None = None) -> tuple[float, int]:
    """(max relative error of θ(t), the t where it is) over t = 2..t_max and all pairs, of the table the module
    computes (per-t float32 solves, as in training and inference) with its solver or `settings`."""
    if rope.t_max < 2:
        return 0.0, 1
    err = ((rope._table(settings).double() - reference).abs() / reference)[1:].amax(dim=1)
    err = torch.nan_to_num(err, nan=math.inf)  # a solve that overflowed fails the check
    return err.max().item(), int(err.argmax().item()) + 2


FINER_STEPS = (0.1, 0.05, 0.025, 0.01)


def solver_fix(rope: ContinuousClex, reference: Tensor, tolerance: float) -> dict | None:
    """The first `rope.solver` change that brings this module's θ(t) within `tolerance` of the reference:
    a finer step of the same method and variable (FINER_STEPS below the current one), or for adaptive
    methods rtol/atol 10, 100, 1000× smaller; None when none does (then only the reference solver is left)."""
    s = rope.settings
    if s["method"] in FIXED_GRID_METHODS:
        candidates = [{"step_size": h} for h in FINER_STEPS if h < s["step_size"]]
    else:
        candidates = [{"rtol": s["rtol"] / f, "atol": s["atol"] / f} for f in (10, 100, 1000)]
    for change in candidates:
        if max_rel_error(rope, reference, {**s, **change})[0] <= tolerance:
            return change
    return None
