"""Attention variants: how a layer's queries attend to the keys, plugged into the decoder (clex/model.py) the
way the position encoding is.

A variant is chosen once when the model is built (`Decoder(cfg, vocab, rope, attention=...)`; from an
Experiment's `attn_log_scale` and `streaming` by `attention_for`) and is shared by every layer. For a forward
over a context of n tokens (cached plus new) it says
- `query_scale(n)`: the factor on the queries, folded into the softmax scale;
- `context_len(n)`: the length the inference t is chosen for (`Decoder.context_t`);
- `reuses_rotated_keys(n)`: whether a KV cache's rotated keys serve this forward (the Decoder then rotates only
  keys from `KVCache.rotation_start` on, docs/method.md §3.6), or the variant rotates every key itself from the
  un-rotated ones (the Decoder then passes the tables of all n positions and keeps no rotated keys);
and `variant(q, k, v, ctx, kv)` computes the attention of un-rotated queries to un-rotated keys.

`CausalAttention` is plain causal attention and the base of every variant; `log_scale_len=L` gives CLEX's
attention log scaling (docs/method.md §3.7, §8), in any variant. `StreamingAttention` is StreamingLLM's window
plus sinks (`clex.streaming`). Variants are registered by name (`register`, `build_attention`), as the
position encodings are (clex/rope); a new one subclasses `CausalAttention` and overrides what differs (e.g.
`__call__` on top of `rotate`, which keeps the KV cache's rotated keys), with no change to the decoder.

Plain attention without a bias goes through `flash_attn` when it is installed and the tensors are on CUDA in
half precision, else through `torch.nn.functional.scaled_dot_product_attention` (itself a flash kernel on
CUDA); with a bias (ALiBi, Sandwich), through SDPA with the bias and the causal mask as one additive float mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from clex.rope import apply_rotary
from clex.streaming import check_streaming, streaming_attention

if TYPE_CHECKING:
    from clex.config import Experiment
    from clex.model import LayerCache

try:  # optional GPU extra
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - the CPU default
    flash_attn_func = None

ROTATE_BLOCK = 4096  # cached keys (re-)rotated per step: the transient memory of a re-rotation is this many rows


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              q_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of queries (B, H, Tq, D) at the last Tq of the Tk key positions of k, v (B, H, Tk, D);
    flash-attn where it can run, SDPA otherwise.

    `mask` (from `causal_mask`) is an additive float mask that already holds causality; it forces SDPA.
    `q_scale` multiplies the queries (CLEX's attention log scaling), folded into the softmax scale.
    SDPA's `is_causal` aligns the mask top-left, so Tq < Tk gets `causal_lower_right` (flash-attn >= 2.1 aligns it
    bottom-right, as needed): on CUDA SDPA then keeps its flash / memory-efficient kernels and builds no (Tq, Tk)
    mask; on the CPU torch builds that mask itself. The same numbers as an explicit mask (tests/test_bounded_eval.py).
    """
    scale = q_scale / math.sqrt(q.shape[-1])
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=scale)
        return out.transpose(1, 2)
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if Tq == 1:  # one new token: it sees every key
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Tq, Tk), scale=scale)


def future(Tq: int, Tk: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) bool, True where key j lies after query i; query i is position Tk - Tq + i."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).triu(1 + Tk - Tq)


def causal_mask(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bias (…, Tq, Tk) with -inf where key j lies after query i (the queries are the last Tq positions),
    cast once to the attention dtype.

    The bias itself is float32 (the encoding builds it so); like cos/sin, it is rounded only here.
    """
    return bias.masked_fill(future(*bias.shape[-2:], bias.device), float("-inf")).to(dtype)


@dataclass
class AttentionContext:
    """What every layer's attention needs besides its input, built once per forward by the Decoder.

    The queries are positions offset..n-1 of the n keys. cos/sin: rotary tables of positions start..n-1
    (None for bias encodings): the queries use their last rows, the keys from `start` on are rotated with
    them (start = offset when the cached keys keep their rotation; 0 and all n rows when the variant does not
    reuse rotated keys). mask: the bias encoding's bias with the causal mask (`causal_mask`), else None.
    """

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    mask: torch.Tensor | None = None
    offset: int = 0
    start: int = 0


@dataclass(frozen=True, kw_only=True)
class CausalAttention:
    """Plain causal attention, and the base of every variant (module docstring).

    `log_scale_len` L: queries times ln(n)/ln(L) for a context of n > L tokens, 1 otherwise (the official code's
    "log scaling", clipped at 1 as docs/method.md §8 defines the knob); None: no scaling.
    """

    needs_rotary: ClassVar[bool] = False  # True: refused with a bias encoding (ALiBi, Sandwich)
    log_scale_len: int | None = None

    def query_scale(self, n: int) -> float:
        """The factor on the queries for a context of n tokens, folded into the softmax scale."""
        if self.log_scale_len is None:
            return 1.0
        return max(1.0, math.log(n) / math.log(self.log_scale_len))

    def context_len(self, n: int) -> int:
        """The context length the inference t is chosen for (`Decoder.context_t`)."""
        return n

    def reuses_rotated_keys(self, n: int) -> bool:
        """True: a KV cache's rotated keys serve a forward over n tokens (only keys from ctx.start on are rotated);
        False: the variant rotates all n keys itself, from tables of all n positions (ctx.start = 0)."""
        return True

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                 kv: LayerCache | None = None) -> torch.Tensor:
        """Attention (B, H, Tq, D) of un-rotated queries at positions ctx.offset.. to the un-rotated keys and
        values (B, H, n, D) of positions 0..n-1; `kv`: the layer's cache, which holds k and v already."""
        q, k = self.rotate(q, k, ctx, kv)
        return attention(q, k, v, ctx.mask, self.query_scale(ctx.offset + q.shape[-2]))

    @staticmethod
    def rotate(q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext,
               kv: LayerCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated at their positions (unchanged without rotary tables): the queries with the tables'
        last rows, the keys from ctx.start on; with `kv`, those keys are written after the rotated keys the
        cache keeps (`ROTATE_BLOCK` rows at a time, in place), and all n rotated keys are returned."""
        if ctx.cos is None:
            return q, k
        T = q.shape[-2]
        cos, sin = ctx.cos.to(q.dtype), ctx.sin.to(q.dtype)
        q = apply_rotary(q, cos[..., -T:, :], sin[..., -T:, :])
        if kv is None:
            return q, apply_rotary(k[..., ctx.start:, :], cos, sin)
        start = ctx.start  # written into the cache's rotated keys in blocks: a re-rotation holds no second copy

        def rotated(a: int, b: int) -> torch.Tensor:
            return apply_rotary(k[..., a:b, :], cos[..., a - start:b - start, :], sin[..., a - start:b - start, :])

        return q, kv.rotated.fill(start, k.shape[-2], k, rotated, ROTATE_BLOCK)


@dataclass(frozen=True)
class StreamingAttention(CausalAttention):
    """StreamingLLM's `window` most recent tokens plus `sinks` first ones, rotary positions inside that cache
    (`clex.streaming`); rotary encodings only. t is chosen for the cache length min(n, window + sinks); a context
    of at most window + sinks tokens drops nothing, so it takes the plain path (identical there)."""

    needs_rotary: ClassVar[bool] = True
    window: int
    sinks: int

    def __post_init__(self):
        check_streaming(self.window, self.sinks)

    def context_len(self, n: int) -> int:
        return min(n, self.window + self.sinks)

    def reuses_rotated_keys(self, n: int) -> bool:
        return n <= self.window + self.sinks

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                 kv: LayerCache | None = None) -> torch.Tensor:
        """The plain path while the cache drops nothing, else `streaming_attention` of every key, rotated here."""
        n = ctx.offset + q.shape[-2]
        if self.reuses_rotated_keys(n):
            return super().__call__(q, k, v, ctx, kv)
        scale = self.query_scale(n) / math.sqrt(q.shape[-1])
        return streaming_attention(q, k, v, ctx.cos, ctx.sin, self.window, self.sinks, scale=scale, offset=ctx.offset)


VARIANTS: dict[str, type[CausalAttention]] = {}


def register(name: str) -> Callable[[type[CausalAttention]], type[CausalAttention]]:
    """Decorator: register a variant class under a name (each name once)."""

    def deco(cls: type[CausalAttention]) -> type[CausalAttention]:
        if name in VARIANTS:
            raise ValueError(f"attention variant {name!r} is already registered")
        VARIANTS[name] = cls
        return cls

    return deco


register("causal")(CausalAttention)
register("streaming")(StreamingAttention)


def build_attention(name: str, **settings) -> CausalAttention:
    """The variant registered as `name`, built with `settings`; an unknown name raises ValueError naming the
    allowed ones."""
    if name not in VARIANTS:
        raise ValueError(f"attention: {name!r} is unknown; allowed: {sorted(VARIANTS)}")
    return VARIANTS[name](**settings)


def attention_for(experiment: Experiment, train_len: int) -> CausalAttention:
    """The attention an Experiment evaluates with: its `streaming` window (sizes from L) or plain causal
    attention, queries log-scaled from L when `attn_log_scale`."""
    log_scale_len = train_len if experiment.attn_log_scale else None
    if experiment.streaming is None:
        return build_attention("causal", log_scale_len=log_scale_len)
    window, sinks = experiment.streaming.sizes(train_len)
    return build_attention("streaming", window=window, sinks=sinks, log_scale_len=log_scale_len)
