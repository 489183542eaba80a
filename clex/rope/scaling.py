"""Frequency-scaling baselines (docs/method.md §2, §8): fixed maps θ → θ' with no learned state.

They all have `t_max = None`: the trainer draws no t and trains on plain positions 0..N-1 with θ'.
Only Dynamic NTK depends on the input length, which reaches it as t = n/L through `inference_t`, so the
Decoder's call `rope(positions, rope.inference_t(n))` serves every encoding unchanged. Everything is
derived from the head dim d, the base b and the training length L (docs/method.md §8, small-scale note),
never from LLaMA's numbers. Parity with transformers' ROPE_INIT_FUNCTIONS: tests/test_scaling.py.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from clex.spec import Strict

from .base import PlainRope, PositionEncoding, ntk_base, ntk_inv_freq, rope_powers
from .registry import register

# CodeLLaMA's base change: LLaMA-2 (d = 128, L = 4096, b = 1e4) fine-tuned at 16k with b = 1e6.
CODELLAMA_BASE, CODELLAMA_HEAD_DIM, CODELLAMA_TRAIN_LEN, CODELLAMA_CONTEXT = 1e6, 128, 4096, 16384


def longest_wavelength(head_dim: int, base: float) -> float:
    """2π/θ_{d/2-1} = 2π·b^((d-2)/d): the wavelength of the slowest rotary pair."""
    return 2 * math.pi * base ** ((head_dim - 2) / head_dim)


def codellama_base(head_dim: int, train_len: int) -> float:
    """CodeLLaMA's base change scaled to head dim d and training length L.

    Keep CodeLLaMA's ratio of longest wavelength to target context, with the same 4x extension
    (target 4L, as 4096 -> 16384):  2π·b'^((d-2)/d) / (4L) = 2π·1e6^(126/128) / 16384, i.e.

        b' = (1e6^(126/128) · L / 4096)^(d/(d-2))

    which gives b' = 1e6 at d = 128, L = 4096 and b' ≈ 4.95e4 at d = 32, L = 128. Because the
    two contexts scale together, the same b' keeps the ratio to the pre-training context L.
    The result does not depend on the model's own base (CodeLLaMA's 1e6 did not either).
    """
    ratio = longest_wavelength(CODELLAMA_HEAD_DIM, CODELLAMA_BASE) / CODELLAMA_CONTEXT
    target = train_len * CODELLAMA_CONTEXT / CODELLAMA_TRAIN_LEN
    return (ratio * target / (2 * math.pi)) ** (head_dim / (head_dim - 2))


def yarn_mscale(scale: float, attn_factor: float = 1.0) -> float:
    """YaRN attention temperature 0.1·ln(s) + 1 (1 for s <= 1), times attn_factor (yarn repo semantics)."""
    return (0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0) * attn_factor


def find_correction_dim(rotations: float, head_dim: int, base: float, train_len: int) -> float:
    """The (fractional) pair index whose wavelength 2π/θ_i equals train_len / rotations."""
    return head_dim * math.log(train_len / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(head_dim: int, base: float, train_len: int, factor: float,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> Tensor:
    """YaRN's θ' in float32, with HF's exact arithmetic (docs/method.md §2, "YaRN, exact"):
    low = floor(dim(β_fast)), high = ceil(dim(β_slow)) clamped to [0, d-1] (high += 0.001 if equal),
    ramp_i = clamp((i - low)/(high - low), 0, 1), mask = 1 - ramp, θ' = θ/s·(1 - mask) + θ·mask."""
    low = max(math.floor(find_correction_dim(beta_fast, head_dim, base, train_len)), 0)
    high = min(math.ceil(find_correction_dim(beta_slow, head_dim, base, train_len)), head_dim - 1)
    if low == high:
        high += 0.001
    mask = 1 - ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    powers = rope_powers(head_dim, base)
    return 1.0 / (factor * powers) * (1 - mask) + 1.0 / powers * mask


class PiSpec(Strict):
    """PI / linear position interpolation (docs/method.md §2): θ'_i = θ_i / factor. No t is drawn in training."""

    type: Literal["pi"]
    factor: float = Field(ge=1, allow_inf_nan=False, description="s: positions m -> m/s")


@register(PiSpec)
class LinearScaling(PositionEncoding):
    """PI / linear interpolation: θ'_i = θ_i / s (the same as positions m -> m/s)."""

    def __init__(self, head_dim: int, base: float, train_len: int, factor: float):
        super().__init__(head_dim, base, train_len)
        self.factor = float(factor)

    def inv_freq(self, t: int = 1) -> Tensor:
        return self.base_inv_freq / self.factor

    @classmethod
    def from_spec(cls, spec: PiSpec, *, head_dim: int, base: float, train_len: int) -> LinearScaling:
        return cls(head_dim, base, train_len, spec.factor)


class NtkSpec(Strict):
    """Static NTK-aware scaling (docs/method.md §2): base b' = b·factor^(d/(d-2))."""

    type: Literal["ntk"]
    factor: float = Field(ge=1, allow_inf_nan=False, description="α of the new base b·α^(d/(d-2))")


@register(NtkSpec)
class NtkScaling(PlainRope):
    """Static NTK-aware: plain RoPE whose `base` is b' = b·α^(d/(d-2)); `orig_base` keeps b."""

    def __init__(self, head_dim: int, base: float, train_len: int, factor: float):
        super().__init__(head_dim, ntk_base(head_dim, base, factor), train_len)
        self.orig_base, self.factor = float(base), float(factor)

    @classmethod
    def from_spec(cls, spec: NtkSpec, *, head_dim: int, base: float, train_len: int) -> NtkScaling:
        return cls(head_dim, base, train_len, spec.factor)


class DynamicNtkSpec(Strict):
    """Dynamic NTK (HF 'dynamic'; inference-time only): b' = b·(f·n/L - (f-1))^(d/(d-2)) for n > L."""

    type: Literal["dynamic_ntk"]
    factor: float = Field(1.0, ge=1, allow_inf_nan=False, description="f; f = 2 gives CLEX's α = 2t-1")


@register(DynamicNtkSpec)
class DynamicNtk(PositionEncoding):
    """Dynamic NTK (HF 'dynamic', inference-time only): for a length-n input with n > L,
    b' = b·(f·n/L - (f-1))^(d/(d-2)); plain RoPE for n <= L.

    `inference_t` returns t = n/L as a float and `inv_freq(t)` applies the rule at n = tL. Training
    passes t = 1, so fine-tuning sees plain RoPE. HF recomputes θ' only when n grows past its cache;
    here θ' is a function of the current n alone (the same whenever lengths are visited in increasing order).
    """

    inference_only = True  # training passes t = 1: plain RoPE
    table_rows = 16  # frequency_table: θ' at n = L, 2L, ..., 16L (row k is t = k, as train.py labels it)

    def __init__(self, head_dim: int, base: float, train_len: int, factor: float = 1.0):
        super().__init__(head_dim, base, train_len)
        self.factor = float(factor)

    @classmethod
    def from_spec(cls, spec: DynamicNtkSpec, *, head_dim: int, base: float, train_len: int) -> DynamicNtk:
        return cls(head_dim, base, train_len, spec.factor)

    def inference_t(self, seq_len: int) -> float:
        return max(1.0, seq_len / self.train_len)

    def inv_freq(self, t: float = 1) -> Tensor:
        if t <= 1:
            return self.base_inv_freq
        alpha = self.factor * t - (self.factor - 1)
        return ntk_inv_freq(self.head_dim, self.base, alpha).to(self.base_inv_freq.device)

    @torch.no_grad()
    def frequency_table(self) -> Tensor:
        return torch.stack([self.inv_freq(t) for t in range(1, self.table_rows + 1)])


class YarnSpec(Strict):
    """YaRN (docs/method.md §2, "YaRN, exact"), L_orig = model.train_len; ramp bounds derived from d, L, base."""

    type: Literal["yarn"]
    factor: float = Field(ge=1, allow_inf_nan=False, description="s: the interpolation factor")
    attn_factor: float = Field(1.0, gt=0, allow_inf_nan=False, description="multiplies mscale = 0.1·ln(s) + 1")
    beta_fast: float = Field(32.0, gt=0, allow_inf_nan=False, description="pairs turning more than this over L keep θ")
    beta_slow: float = Field(1.0, gt=0, allow_inf_nan=False, description="pairs turning less than this over L get θ/s")

    @model_validator(mode="after")
    def _betas(self) -> "YarnSpec":
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"rope.beta_fast: {self.beta_fast} is not above rope.beta_slow={self.beta_slow}; "
                f"allowed: beta_fast > beta_slow > 0 (defaults 32 and 1)"
            )
        return self


@register(YarnSpec)
class Yarn(PositionEncoding):
    """YaRN with s = factor and L_orig = train_len: θ' from `yarn_inv_freq`, cos and sin both times `mscale`.

    θ' is kept as a list of float32 values, so casting the model (e.g. bf16-true) never rounds it.
    """

    def __init__(self, head_dim: int, base: float, train_len: int, factor: float, *,
                 attn_factor: float = 1.0, beta_fast: float = 32.0, beta_slow: float = 1.0):
        super().__init__(head_dim, base, train_len)
        self.factor, self.mscale = float(factor), yarn_mscale(factor, attn_factor)
        self.scaled = yarn_inv_freq(head_dim, self.base, train_len, self.factor, beta_fast, beta_slow).tolist()

    @classmethod
    def from_spec(cls, spec: YarnSpec, *, head_dim: int, base: float, train_len: int) -> Yarn:
        return cls(head_dim, base, train_len, spec.factor, attn_factor=spec.attn_factor,
                   beta_fast=spec.beta_fast, beta_slow=spec.beta_slow)

    def inv_freq(self, t: int = 1) -> Tensor:
        return torch.tensor(self.scaled, dtype=torch.float32, device=self.base_inv_freq.device)

    def forward(self, positions: Tensor, t: int = 1) -> tuple[Tensor, Tensor]:
        cos, sin = super().forward(positions, t)
        return cos * self.mscale, sin * self.mscale


class BaseChangeSpec(Strict):
    """CodeLLaMA-style base change: plain RoPE with a new base (given, or derived from d and L)."""

    type: Literal["base_change"]
    base: float | None = Field(
        None, gt=1, allow_inf_nan=False,
        description="new RoPE base; null derives it from CodeLLaMA's 1e4 -> 1e6 (clex.rope.scaling.codellama_base)",
    )


@register(BaseChangeSpec)
class BaseChange(PlainRope):
    """CodeLLaMA-style base change: plain RoPE with a new base (given, or `codellama_base(d, L)`)."""

    def __init__(self, head_dim: int, base: float, train_len: int, new_base: float | None = None):
        super().__init__(head_dim, codellama_base(head_dim, train_len) if new_base is None else new_base, train_len)
        self.orig_base = float(base)

    @classmethod
    def from_spec(cls, spec: BaseChangeSpec, *, head_dim: int, base: float, train_len: int) -> BaseChange:
        return cls(head_dim, base, train_len, spec.base)
