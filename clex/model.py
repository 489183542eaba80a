"""A small LLaMA-style decoder (RMSNorm, SwiGLU, rotary attention) with a pluggable position encoding.

The position encoding is a registered `clex.rope.PositionEncoding`: the model only asks it for the
cos/sin table of the positions and scaling factor t it is given (rotary encodings), and for an
attention bias (ALiBi, Sandwich), each built once per forward and shared by every layer. Training code
chooses (t, positions) (docs/method.md §3.4-3.5); at inference the encoding picks t from the sequence length (§3.6).
Attention without a bias goes through `flash_attn` when it is installed and the tensors are on CUDA in half
precision, else through `torch.nn.functional.scaled_dot_product_attention` (which itself uses a flash kernel
on CUDA); with a bias, through SDPA with the bias and the causal mask as one additive float mask.
`Decoder(streaming=(window, sinks))` is a StreamingLLM-style evaluation mode (`clex.streaming`): each query
sees the `sinks` first tokens plus the `window` most recent ones, with rotary positions inside that cache,
so t is chosen for the cache length; rotary encodings only.

`Decoder(tokens, cache=KVCache(n_layers))` continues the tokens already in the cache (chunked evaluation,
generation). As in the official CLEX code (docs/method.md §3.6) the cache stores keys UN-rotated: t is chosen
from the context length n after the new tokens, and when t (or θ(t)) differs from the one the cached keys
were rotated with, every key is re-rotated with θ(t) at its own position; otherwise only the new keys are
rotated. What every layer needs besides its input travels in one `AttentionContext`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clex.config import ModelConfig
from clex.rope import PositionEncoding, apply_rotary
from clex.streaming import check_streaming, streaming_attention

try:  # optional GPU extra
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - the CPU default
    flash_attn_func = None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              q_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of queries (B, H, Tq, D) at the last Tq of the Tk key positions of k, v (B, H, Tk, D);
    flash-attn where it can run, SDPA otherwise.

    `mask` (from `causal_mask`) is an additive float mask that already holds causality; it forces SDPA.
    `q_scale` multiplies the queries (CLEX's attention log scaling), folded into the softmax scale.
    SDPA's `is_causal` aligns the mask top-left, so Tq < Tk gets an explicit one (flash-attn >= 2.1 aligns it
    bottom-right, as needed).
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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~future(Tq, Tk, q.device), scale=scale)


def future(Tq: int, Tk: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) bool, True where key j lies after query i; query i is position Tk - Tq + i."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).triu(1 + Tk - Tq)


def causal_mask(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bias (…, Tq, Tk) with -inf where key j lies after query i (the queries are the last Tq positions),
    cast once to the attention dtype.

    The bias itself is float32 (the encoding builds it so); like cos/sin, it is rounded only here.
    """
    return bias.masked_fill(future(*bias.shape[-2:], bias.device), float("-inf")).to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype q and k will have: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Rows:
    """A growing (B, H, n, D) tensor: rows are written at any start <= n, capacity doubles as needed."""

    def __init__(self):
        self.data: torch.Tensor | None = None
        self.length = 0

    def write(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Store x as rows start.. (dropping rows after them) and return rows 0..end-1 (a view)."""
        if not 0 <= start <= self.length:
            raise ValueError(f"start: {start}; allowed: 0..{self.length} (rows are written in order)")
        end = start + x.shape[-2]
        if self.data is None or end > self.data.shape[-2]:
            grown = x.new_empty(*x.shape[:-2], max(end, 2 * self.length), x.shape[-1])
            if self.data is not None:
                grown[..., :start, :] = self.data[..., :start, :]
            self.data = grown
        self.data[..., start:end, :] = x
        self.length = end
        return self.data[..., :end, :]

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[..., :self.length, :]


@dataclass
class LayerCache:
    """One layer's keys and values, un-rotated as computed, and its keys rotated with `KVCache.rotated_with`."""

    keys: Rows = field(default_factory=Rows)
    values: Rows = field(default_factory=Rows)
    rotated: Rows = field(default_factory=Rows)


class KVCache:
    """The decoder's KV cache (docs/method.md §3.6): un-rotated keys and values per layer, `length` tokens so far.

    `rotated_with` is the (t, θ(t)) the layers' rotated keys were rotated with; a forward whose (t, θ(t))
    differs re-rotates every cached key (counted in `rerotations`), else rotates only its new keys.
    """

    def __init__(self, n_layers: int):
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.length = 0
        self.rotated_with: tuple[float, torch.Tensor] | None = None
        self.rerotations = 0

    def rotation_start(self, rope: PositionEncoding, t: float) -> int:
        """The first position whose key must be rotated for this forward: 0 when (t, θ(t)) changed, else length."""
        inv_freq, last = rope.inv_freq(t), self.rotated_with
        if last is not None and last[0] == t and (last[1] is inv_freq or torch.equal(last[1], inv_freq)):
            return self.length
        self.rotated_with = (t, inv_freq)
        if self.length:
            self.rerotations += 1
        return 0


@dataclass
class AttentionContext:
    """What every layer's attention needs besides its input, built once per forward by the Decoder.

    The queries are positions offset..n-1 of the n keys. cos/sin: rotary tables of positions start..n-1
    (None for bias encodings): the queries use their last rows, the keys from `start` on are rotated with
    them (start = offset when the cached keys keep their rotation). Streaming: tables of all n positions.
    """

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    mask: torch.Tensor | None = None
    q_scale: float = 1.0
    streaming: tuple[int, int] | None = None
    offset: int = 0
    start: int = 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, kv: LayerCache | None = None) -> torch.Tensor:
        """Attention of x's tokens (positions ctx.offset..) to themselves and, with `kv`, the cached tokens."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv is not None:  # every key and value so far, un-rotated
            k, v = kv.keys.write(k, ctx.offset), kv.values.write(v, ctx.offset)
        if ctx.streaming is not None:
            window, sinks = ctx.streaming
            out = streaming_attention(q, k, v, ctx.cos, ctx.sin, window, sinks,
                                      scale=ctx.q_scale / math.sqrt(self.head_dim), offset=ctx.offset)
        else:
            if ctx.cos is not None:
                cos, sin = ctx.cos.to(q.dtype), ctx.sin.to(q.dtype)
                q = apply_rotary(q, cos[..., -T:, :], sin[..., -T:, :])
                k = apply_rotary(k[..., ctx.start:, :], cos, sin)
                if kv is not None:
                    k = kv.rotated.write(k, ctx.start)
            out = attention(q, k, v, ctx.mask, ctx.q_scale)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.d_model), SwiGLU(cfg)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, kv: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx, kv)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Token embedding (tied with the output head) → blocks → RMSNorm → logits.

    `attn_log_scale` (docs/method.md §3.7, §8): queries times ln(n)/ln(L) for inputs of n > L tokens
    (1 otherwise), the official code's "log scaling", here clipped at 1 as docs/method.md §8 defines the knob.
    `streaming` (window, sinks): StreamingLLM-style evaluation (`clex.streaming`), rotary encodings only;
    t defaults to the inference rule at the cache length min(T, window + sinks), and inputs of at most
    window + sinks tokens take the ordinary path (identical there). q_scale is computed from T as usual.
    With a `KVCache`, n (for t, q_scale and the streaming rule) is the context length: cached plus new tokens.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, rope: PositionEncoding, attn_log_scale: bool = False,
                 streaming: tuple[int, int] | None = None):
        super().__init__()
        if streaming is not None:
            check_streaming(*streaming)
        self.cfg, self.vocab_size, self.attn_log_scale, self.streaming = cfg, vocab_size, attn_log_scale, streaming
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.rope = rope
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, std) everywhere, residual projections scaled by 1/sqrt(2·layers).

        A sizing pilot on this profile showed PyTorch's unit-variance embedding init starts at ~124 nats of loss.
        """
        std = self.cfg.init_std
        for module_name, module in self.named_modules():
            if module_name.startswith("rope"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if module_name.endswith(("proj", "down")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)

    def context_t(self, n: int) -> float:
        """The inference t for a context of n tokens: the encoding's rule at n, or at the streaming cache's
        length min(n, window + sinks) (its positions never exceed window + sinks - 1)."""
        if self.streaming is not None:
            n = min(n, sum(self.streaming))
        return self.rope.inference_t(n)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, t: float | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits for (B, T) tokens. positions/t default to 0..n-1 and `context_t(n)`, n = T without a cache.

        `cache`: the tokens follow the cache's `length` tokens (positions offset.. with offset = cache.length,
        n = offset + T); their keys and values are appended, and positions must be None (0..n-1).
        """
        T, rope, streaming = tokens.shape[1], self.rope, self.streaming
        offset = 0
        if cache is not None:
            if positions is not None:
                raise ValueError("positions: a cached forward uses positions 0..n-1; allowed: None")
            offset = cache.length
        n = offset + T
        if streaming is not None:
            if not rope.rotary:
                raise ValueError(f"streaming evaluation needs a rotary position encoding; {type(rope).__name__} "
                                 "is not rotary (ALiBi/Sandwich are not supported)")
            if n <= sum(streaming):
                streaming = None  # the cache never drops a token: ordinary causal attention
        if positions is None:
            positions = torch.arange(n, device=tokens.device, dtype=torch.float32)
        if t is None:
            t = self.context_t(n)
        q_positions = positions if offset == 0 else positions[..., offset:]
        start = 0 if cache is None or streaming is not None or not rope.rotary else cache.rotation_start(rope, t)
        if cache is not None and streaming is not None:
            cache.rotated_with = None  # streaming rotates every key itself: no rotated keys are kept
        cos, sin = rope(positions if start == 0 else positions[..., start:], t) if rope.rotary else (None, None)
        x = self.embed(tokens)
        bias = rope.attention_bias(self.cfg.n_heads, q_positions, positions)
        mask = None if bias is None else causal_mask(bias, compute_dtype(x))
        q_scale = max(1.0, math.log(n) / math.log(self.cfg.train_len)) if self.attn_log_scale else 1.0
        ctx = AttentionContext(cos, sin, mask, q_scale, streaming, offset, start)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length = n
        return self.norm(x) @ self.embed.weight.T


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
