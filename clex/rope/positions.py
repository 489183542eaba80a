"""Training-time scaling factor and position ids (docs/method.md §3.4, §3.5, §8 `position_sampling`),
and the RandomPos baseline (docs/method.md §2), which draws its positions with the same sampler.

All draw from an explicit torch.Generator (CPU), so one seeded generator gives the same t and
positions on every rank. Positions are returned on the CPU; the caller moves them.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from clex.spec import Strict

from .base import PlainRope
from .registry import register

POSITION_SAMPLING = ("none", "random", "uniform")


def sorted_subset(n: int, k: int, generator: torch.Generator) -> Tensor:
    """k distinct integers drawn uniformly from {0..n-1}, in increasing order (int64)."""
    return torch.randperm(n, generator=generator)[:k].sort().values


def sample_scale(t_max: int, generator: torch.Generator) -> int:
    """t uniform on {1, ..., t_max} (official code since commit 2e69966, docs/method.md §3.4)."""
    if t_max < 1:
        raise ValueError(f"t_max: {t_max} must be >= 1")
    return int(torch.randint(1, t_max + 1, (1,), generator=generator))


def training_positions(kind: str, seq_len: int, t: int, train_len: int, generator: torch.Generator) -> Tensor:
    """Float32 positions (seq_len,) that let N = seq_len tokens emulate a window of about t·L positions.

    With s = max(1, N // L) and last = (N·t // s) - 1:
    - "none": 0..N-1 (no position extrapolation).
    - "random" (official, §3.5): p_0 = 0, p_k = (S_k + 1)/s with S a sorted random (N-2)-subset of
      {0..N·t-3}, p_{N-1} = last. Fractional when s > 1. Faithful to the official code, including
      its quirk for s >= 2: p_{N-2} can reach (N·t-2)/s >= last, so only p_0..p_{N-2} are then
      guaranteed strictly increasing (s = 1, i.e. N < 2L, is always strictly increasing).
    - "uniform" (ablation, §7): N evenly spaced points from 0 to last, p_k = k·last/(N-1).
    t = 1 with s = 1 gives 0..N-1 for every kind.
    """
    if kind not in POSITION_SAMPLING:
        raise ValueError(f"position_sampling: {kind!r} is not one of {list(POSITION_SAMPLING)}")
    if kind == "none":
        return torch.arange(seq_len, dtype=torch.float32)
    if seq_len < 2 or t < 1 or train_len < 1:
        raise ValueError(f"need seq_len >= 2, t >= 1, train_len >= 1; got {seq_len}, {t}, {train_len}")
    s = max(1, seq_len // train_len)
    last = seq_len * t // s - 1
    if kind == "uniform":
        k = torch.arange(seq_len, dtype=torch.float64)
        return (k * last / (seq_len - 1)).float()
    inner = sorted_subset(seq_len * t - 2, seq_len - 2, generator)
    return torch.cat((torch.zeros(1), (inner + 1).float() / s, torch.tensor([float(last)])))


def random_positions(seq_len: int, max_position: int, generator: torch.Generator) -> Tensor:
    """RandomPos (Ruoss et al. 2023): a sorted, uniformly random seq_len-subset of {0..M-1}, float32.

    As in their code (`noisy_fixed_positional_encodings`: sorted `choice(arange(M), N, replace=False)`),
    no position is pinned: p_0 is 0 and p_{N-1} is M-1 only by chance, unlike CLEX's "random" kind.
    """
    if not 1 <= seq_len <= max_position:
        raise ValueError(f"need 1 <= seq_len <= max_position; got seq_len={seq_len}, max_position={max_position}")
    return sorted_subset(max_position, seq_len, generator).float()


class RandomPosSpec(Strict):
    """RandomPos (Ruoss et al. 2023): plain RoPE trained on a sorted random N-subset of positions [0, M)."""

    type: Literal["randompos"]
    max_position_factor: int = Field(
        16, ge=1, description="M = max_position_factor · model.train_len (16 matches CLEX's t_max); M >= N",
    )


@register(RandomPosSpec)
class RandomPos(PlainRope):
    """Plain RoPE trained on random sorted positions from [0, M), M = max_position_factor·L, and
    evaluated on plain positions 0..n-1 (t_max is None, so t is always 1)."""

    def __init__(self, head_dim: int, base: float, train_len: int, max_position_factor: int = 16):
        super().__init__(head_dim, base, train_len)
        if max_position_factor < 1:
            raise ValueError(f"max_position_factor: {max_position_factor} must be >= 1")
        self.max_position = max_position_factor * train_len

    @classmethod
    def from_spec(cls, spec: RandomPosSpec, *, head_dim: int, base: float, train_len: int) -> RandomPos:
        return cls(head_dim, base, train_len, spec.max_position_factor)

    def sample_positions(self, seq_len: int, generator: torch.Generator) -> Tensor:
        return random_positions(seq_len, self.max_position, generator)
