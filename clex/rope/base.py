"""RoPE building blocks shared by every position encoding (docs/method.md §1).

HF layout: `inv_freq` holds d/2 frequencies θ_i, the angle table is `cat(m·θ, m·θ)` and pair
(j, j + d/2) is rotated together: `x·cos + rotate_half(x)·sin`. All frequency and angle math runs in
float32, also under autocast; callers cast cos/sin to their activation dtype.
"""
from __future__ import annotations

import abc
import math
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from clex.spec import Strict

from .registry import register


def fp32(device: torch.device):
    """A context that turns autocast off, so the math inside stays in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by tables of shape (T, D) or (B, T, D) (one head axis is added)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rotary_tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin of angles p·θ for positions (T,) or (B, T) -> (…, T, D), float32.

    Positions may be fractional (CLEX training positions, docs/method.md §3.5).
    """
    with fp32(inv_freq.device):
        angles = positions.to(inv_freq.device, torch.float32)[..., None] * inv_freq.float()
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()


def rope_powers(head_dim: int, base: float) -> Tensor:
    """base^(2i/d) = 1/θ_i, i = 0..d/2-1, float32 (HF's `pos_freqs`, which YaRN divides by s)."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim: {head_dim} must be a positive even integer for RoPE")
    return base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def default_inv_freq(head_dim: int, base: float) -> Tensor:
    """θ_i = base^(-2i/d), i = 0..d/2-1, float32 (computed exactly as HF transformers does)."""
    return 1.0 / rope_powers(head_dim, base)


def ntk_base(head_dim: int, base: float, alpha: float) -> float:
    """NTK-aware base b' = b·α^(d/(d-2)) (docs/method.md §2; the same float64 expression as HF)."""
    return base * alpha ** (head_dim / (head_dim - 2))


def ntk_inv_freq(head_dim: int, base: float, alpha: float) -> Tensor:
    """NTK-aware scaling (docs/method.md §2): base b' = b·α^(d/(d-2)), then the default frequencies."""
    return default_inv_freq(head_dim, ntk_base(head_dim, base, alpha))


class PositionEncoding(nn.Module, abc.ABC):
    """A RoPE variant: frequencies θ(t) for an integer scaling factor t, and cos/sin tables.

    `base_inv_freq` (the unscaled θ) is a non-persistent float32 buffer; it is rebuilt in float32
    after every `.to()`/`.half()`, so casting the model (e.g. bf16-true) never rounds it.
    Optional hooks (defaults: plain rotary behaviour): `attention_bias`, `sample_positions`.

    Traits, the one place they are stated (clex/config.py's Experiment checks read them through the registry):
    - `rotary`: False (ALiBi, Sandwich) means no rotation; the Decoder builds no cos/sin tables, and streaming
      evaluation, which re-assigns rotary positions inside its cache, refuses the encoding. Inherited.
    - `inference_only`: True when fine-tuning with the encoding is fine-tuning with plain RoPE (no weights, no
      training-time behaviour), so an experiment may evaluate it on another's plain-RoPE checkpoints (`reuse`).
      Not inherited: each class states it, so a subclass of PlainRope that changes training is never taken
      for plain RoPE.
    A registered class builds itself from its validated spec with `from_spec`.
    """

    rotary: ClassVar[bool] = True
    inference_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.inference_only = cls.__dict__.get("inference_only", False)

    @classmethod
    def from_spec(cls, spec, *, head_dim: int, base: float, train_len: int) -> PositionEncoding:
        """The module for a validated spec of the type this class is registered for (read by attribute);
        this default suits an encoding without keys of its own."""
        return cls(head_dim, base, train_len)

    def __init__(self, head_dim: int, base: float, train_len: int, t_max: int | None = None):
        super().__init__()
        if train_len < 1:
            raise ValueError(f"train_len: {train_len} must be >= 1")
        if t_max is not None and t_max < 1:
            raise ValueError(f"t_max: {t_max} must be >= 1")
        self.head_dim, self.base, self.train_len, self.t_max = head_dim, float(base), train_len, t_max
        self.register_buffer("base_inv_freq", default_inv_freq(head_dim, base), persistent=False)

    @abc.abstractmethod
    def inv_freq(self, t: int) -> Tensor:
        """θ(t), shape (head_dim//2,), float32; differentiable w.r.t. the module's weights in training."""

    def inference_t(self, seq_len: int) -> int:
        """Scaling factor for a length-n input (docs/method.md §3.6): ceil(n/L) in [1, t_max]; 1 for plain RoPE."""
        if self.t_max is None:
            return 1
        return min(max(1, math.ceil(seq_len / self.train_len)), self.t_max)

    def forward(self, positions: Tensor, t: int = 1) -> tuple[Tensor, Tensor]:
        return rotary_tables(positions, self.inv_freq(t))

    def attention_bias(self, n_heads: int, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """Float32 bias added to the attention logits, (H, Tq, Tk) or (B, H, Tq, Tk) for positions
        (T,) or (B, T); None (the default) for encodings that only rotate q and k."""
        return None

    def sample_positions(self, seq_len: int, generator: torch.Generator) -> Tensor | None:
        """Training positions of an encoding without a scale t (t_max None), drawn from the step's
        generator; None (the default) means plain positions 0..N-1."""
        return None

    @torch.no_grad()
    def frequency_table(self) -> Tensor:
        """θ(t) for t = 1..t_max (one row for plain RoPE), shape (rows, head_dim//2): a logging artifact."""
        return torch.stack([self.inv_freq(t) for t in range(1, (self.t_max or 1) + 1)])

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.base_inv_freq = default_inv_freq(self.head_dim, self.base).to(self.base_inv_freq.device)
        return self


class RopeSpec(Strict):
    """Plain RoPE: θ_i = base^(-2i/d), positions 0..n-1."""

    type: Literal["rope"]


@register(RopeSpec)
class PlainRope(PositionEncoding):
    """Plain RoPE: θ_i = base^(-2i/d) for every t (t is ignored)."""

    inference_only = True

    def inv_freq(self, t: int = 1) -> Tensor:
        return self.base_inv_freq
