"""Training-time scaling factor and position ids (method.md §3.4, §3.5, §8 `position_sampling`).

Both draw from an explicit torch.Generator (CPU), so one seeded generator gives the same t and
positions on every rank. Positions are returned on the CPU; the caller moves them.
"""
from __future__ import annotations

import torch
from torch import Tensor

POSITION_SAMPLING = ("none", "random", "uniform")


def sample_scale(t_max: int, generator: torch.Generator) -> int:
    """t uniform on {1, ..., t_max} (official code since commit 2e69966, method.md §3.4)."""
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
    inner = torch.randperm(seq_len * t - 2, generator=generator)[: seq_len - 2].sort().values
    return torch.cat((torch.zeros(1), (inner + 1).float() / s, torch.tensor([float(last)])))
