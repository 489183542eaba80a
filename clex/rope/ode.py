"""CLEX: learned log-frequencies z(t) = ln θ(t), continuous (ODE) or discrete (per-t embedding).

method.md §3.1-3.3 (state, dynamics g, constant term ξ_t), §3.6 (inference cache), §3.8 and §8
(discrete baseline). With W_down = 0 at init, both variants start from a known prior: the
continuous one from NTK-aware scaling with α = 2t-1 (or plain RoPE without ξ), the discrete one
from plain RoPE.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from .base import PositionEncoding, fp32

ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh}
# torchdiffeq methods on a fixed grid: they take a grid (here: `grid_constructor`), not rtol/atol.
FIXED_GRID_METHODS = frozenset(
    {"euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams"}
)
VARIABLES = ("t", "log_t")
# The official solve (method.md §3.1): fixed-step rk4 in t at dt = 0.01, back-propagated through every step.
REFERENCE_SOLVER = {"method": "rk4", "variable": "t", "step_size": 0.01}


def time_embedding(t: Tensor | float, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """(ln θ^NTK(t), ξ_t), each (head_dim//2,) float32 (method.md §3.3); see `NtkTimeEmbedding`."""
    return NtkTimeEmbedding(head_dim, base)(torch.as_tensor(t, dtype=torch.float32))


class NtkTimeEmbedding(nn.Module):
    """t -> (ln θ^NTK(t), ξ_t) with the t-independent parts precomputed (one ODE evaluation stays cheap).

    α = 2t-1 for t >= 1, else 1; ln θ^NTK_i = -(2i/d)·ln b - (2i/(d-2))·ln α, and
    ξ_t,i = d ln θ^NTK_i / dt = -(2i/(d-2))·2/α (0 for t < 1, where α is constant).
    The constants are float32 buffers, rebuilt in float32 after any cast of the model.
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
        t = t.to(self.slope.device, torch.float32)
        alpha = (2 * t - 1).clamp_min(1.0)
        xi = self.slope * (-2 / alpha)
        return self.log_theta_1 - self.slope * alpha.log(), torch.where(t >= 1, xi, torch.zeros_like(xi))


class UpDownFFN(nn.Module):
    """x -> act(x·W_up)·W_down, no biases (the official `ODELinear` net, method.md §3.2).

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
    """g(t, z) = act((z + ln θ^NTK(t))·W_up)·W_down + ξ_t, the right-hand side dz/dt (method.md §3.2).

    `t_scale` (method.md §8) says which rate the network learns. 'linear' (official): the network
    output is dz/dt. 'log': it is dz/dτ with τ = ln t, i.e. dz/dt = NN/t + ξ_t, so its influence per
    unit of t decays like 1/t; the constant term stays dz/dt of the NTK prior in both, and with a
    zero network both give NTK scaling with α = 2t-1. The time embedding uses `base`, the model's
    RoPE base; the official code at HEAD always uses 10000 there (method.md §3.3), the same for our
    default. `nfe` counts evaluations; whoever wants per-solve counts resets it.
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


class ContinuousClex(PositionEncoding):
    """CLEX with continuous dynamics: z(1) = ln θ, dz/dt = g(t, z), θ(t) = exp(z(t)) (method.md §3.1).

    Each θ(t) is one torchdiffeq solve from 1 to t, in the variable `variable` ('t' as the official
    code, or 'log_t': the same ODE in τ = ln t, see `LogTime`). Fixed-grid methods split [start, end]
    into ceil(Δ/step_size) equal steps (the official grid when Δ/step_size is whole); adaptive methods
    use rtol/atol. t = 1 returns the base frequencies exactly (the official code skips the ODE there).
    In training mode every call solves and back-propagates through the solver steps (no adjoint). In
    eval mode integer t in 1..t_max read a table filled once by the same per-t solves, so inference
    uses exactly the θ(t) of training (method.md §3.6). The official code never invalidates its cache;
    here `train()`/`eval()`, `load_state_dict` and `.to()` clear it. Editing the weights in place while
    in eval mode needs an explicit `clear_cache()`.
    """

    def __init__(
        self, head_dim: int, base: float, train_len: int, t_max: int, *, width: int = 1, act: str = "silu",
        constant_term: bool = True, t_scale: str = "linear", method: str = "dopri5", variable: str = "t",
        step_size: float = 0.01, rtol: float = 1e-6, atol: float = 1e-8,
    ):
        _check_clex_dims(head_dim)
        if variable not in VARIABLES:
            raise ValueError(f"variable: {variable!r} is not one of {list(VARIABLES)}")
        super().__init__(head_dim, base, train_len, t_max)
        self.dynamics = ClexDynamics(head_dim, base, width, act, constant_term, t_scale)
        self.variable, self.method, self.step_size = variable, method, step_size
        self.solver = {"method": method} if method in FIXED_GRID_METHODS else {"method": method, "rtol": rtol, "atol": atol}
        self._cache: Tensor | None = None

    def _solve(self, t: float) -> Tensor:
        """exp(z(t)) from one solve over [1, t] (in t or in ln t)."""
        z1 = self.base_inv_freq.log()
        func, end = (self.dynamics, float(t)) if self.variable == "t" else (LogTime(self.dynamics), math.log(t))
        start = 1.0 if self.variable == "t" else 0.0
        span = torch.tensor([start, end], dtype=torch.float32, device=z1.device)
        kwargs = dict(self.solver)
        if self.method in FIXED_GRID_METHODS:
            steps = max(1, math.ceil((end - start) / self.step_size - 1e-9))
            grid = torch.linspace(start, end, steps + 1, dtype=torch.float32, device=z1.device)
            kwargs["options"] = {"grid_constructor": lambda *_: grid}
        with fp32(z1.device):
            z = odeint(func, z1, span, **kwargs)
        return z[-1].exp()

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

    def _table(self) -> Tensor:
        return torch.stack([self.base_inv_freq] + [self._solve(t) for t in range(2, self.t_max + 1)])

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


class DiscreteClex(PositionEncoding):
    """Discrete-dynamics baseline (method.md §3.8, §8): z(t) = z(1) + FFN(e_t), t in 1..t_max.

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
