"""Attention-bias baselines (docs/method.md §2, §8): no rotation, a fixed relative bias on the logits.

Both are functions of the distance q_i - k_j only and are built in float32 (autocast off) once per
forward by the Decoder, which adds the causal mask and hands the result to SDPA. `inv_freq` is all
zeros (θ = 0 is "no rotation"), so the frequency table logged by training says exactly that.
"""
from __future__ import annotations

import abc
import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from clex.spec import Strict

from .base import PositionEncoding, fp32
from .registry import register

SINUSOID_BASE = 10000.0  # Vaswani et al.'s sinusoid timescale, which Sandwich's embeddings use


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's head slopes (Press et al., `get_slopes` of ofirpress/attention_with_linear_biases), float32.

    H a power of two: m_h = 2^(-8h/H), h = 1..H. Otherwise, with P the largest power of two below H:
    the P slopes for P heads, then every other slope for 2P heads (the 1st, 3rd, ...), H - P of them.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads: {n_heads} must be >= 1")

    def geometric(n: int) -> list[float]:
        return [2 ** (-8 * h / n) for h in range(1, n + 1)]

    p = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(geometric(p) + geometric(2 * p)[0::2][: n_heads - p], dtype=torch.float32)


def sandwich_profile(distance: Tensor, d_bar: int) -> Tensor:
    """p_m·p_n - d̄/2 = Σ_{k=1..d̄/2} cos(δ·ω_k) - d̄/2, ω_k = 10000^(-2k/d̄), for distances δ = m - n."""
    k = torch.arange(1, d_bar // 2 + 1, dtype=torch.float32, device=distance.device)
    omega = SINUSOID_BASE ** (-2 * k / d_bar)
    return torch.cos(distance[..., None] * omega).sum(-1) - d_bar / 2


class BiasEncoding(PositionEncoding):
    """A position encoding that rotates nothing and biases the attention logits by f_h(q_i - k_j)."""

    rotary = False

    def inv_freq(self, t: int = 1) -> Tensor:
        return torch.zeros_like(self.base_inv_freq)

    def attention_bias(self, n_heads: int, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        with fp32(q_positions.device):
            distance = q_positions.float()[..., :, None] - k_positions.float()[..., None, :]
            return self.head_bias(n_heads, distance.unsqueeze(-3))

    @abc.abstractmethod
    def head_bias(self, n_heads: int, distance: Tensor) -> Tensor:
        """(…, 1, Tq, Tk) float32 distances q_i - k_j -> (…, H, Tq, Tk) bias."""


class AlibiSpec(Strict):
    """ALiBi (docs/method.md §2): no rotation; bias -m_h·(i-j) on the logits, slopes from the head count."""

    type: Literal["alibi"]


@register(AlibiSpec)
class Alibi(BiasEncoding):
    """ALiBi (Press et al. 2022): bias -m_h·(i - j) with the slopes of `alibi_slopes` (no 1/√d on it)."""

    def head_bias(self, n_heads: int, distance: Tensor) -> Tensor:
        return -alibi_slopes(n_heads).to(distance.device)[:, None, None] * distance


class SandwichSpec(Strict):
    """Sandwich (Chi et al. 2023): no rotation; bias from inner products of d̄-dim sinusoidal embeddings."""

    type: Literal["sandwich"]
    d_bar: int = Field(
        128, ge=2, multiple_of=2,
        description="d̄: dimension of the sinusoidal embeddings whose inner product is the bias (even; paper 128)",
    )


@register(SandwichSpec)
class Sandwich(BiasEncoding):
    """Sandwich (Chi et al. 2023, arXiv 2212.10356): the inner product of d̄-dim sinusoidal embeddings
    of positions i and j, Σ_{k=1..d̄/2} cos((i - j)/10000^(2k/d̄)), minus d̄/2, divided by the ALiBi-style
    compression ratio r_h = 8h/H of head h = 1..H.

    Source of the exact form: NVIDIA NeMo's `SandwichRelativePositionEmbedding` (k = 1..d̄/2, minus
    d̄/2, divided by 8h/H) and meta-pytorch/attention-gym's `generate_sandwich_bias` (same ratios,
    d̄ = 128 "as the paper"); the paper's own text was not at hand. Subtracting d̄/2 adds a constant
    per head, which softmax ignores; it makes the bias 0 at distance 0, like ALiBi's.
    The profile is computed once per distinct distance and gathered, so its cost is O(#distances · d̄).
    """

    def __init__(self, head_dim: int, base: float, train_len: int, d_bar: int = 128):
        super().__init__(head_dim, base, train_len)
        if d_bar < 2 or d_bar % 2:
            raise ValueError(f"d_bar: {d_bar} must be a positive even integer")
        self.d_bar = d_bar

    @classmethod
    def from_spec(cls, spec: SandwichSpec, *, head_dim: int, base: float, train_len: int) -> Sandwich:
        return cls(head_dim, base, train_len, spec.d_bar)

    def head_bias(self, n_heads: int, distance: Tensor) -> Tensor:
        values, inverse = distance.unique(return_inverse=True)
        ratio = 8 * torch.arange(1, n_heads + 1, dtype=torch.float32, device=distance.device) / n_heads
        return sandwich_profile(values, self.d_bar)[inverse] / ratio[:, None, None]
