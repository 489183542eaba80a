"""A small LLaMA-style decoder (RMSNorm, SwiGLU, rotary attention) with a pluggable position encoding and
a pluggable attention variant.

The position encoding is a registered `clex.rope.PositionEncoding`: the model only asks it for the
cos/sin table of the positions and scaling factor t it is given (rotary encodings), and for an
attention bias (ALiBi, Sandwich), each built once per forward and shared by every layer. Training code
chooses (t, positions) (docs/method.md §3.4-3.5); at inference the encoding picks t from the sequence length (§3.6).
The attention variant is a registered `clex.attention.CausalAttention`: plain causal attention (the default),
optionally with log-scaled queries, or StreamingLLM's window + sinks; it computes the attention of every layer
and says which context length t is chosen for (clex/attention.py).

`Decoder(tokens, cache=KVCache(n_layers))` continues the tokens already in the cache (chunked evaluation,
generation). As in the official CLEX code (docs/method.md §3.6) the cache stores keys UN-rotated: t is chosen
from the context length n after the new tokens, and when t (or θ(t)) differs from the one the cached keys
were rotated with, every key is re-rotated with θ(t) at its own position; otherwise only the new keys are
rotated. What every layer needs besides its input travels in one `AttentionContext`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clex.attention import AttentionContext, CausalAttention, causal_mask
from clex.config import ModelConfig
from clex.rope import PositionEncoding


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype q and k will have: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _keep_fp32(encoding: PositionEncoding, fn) -> None:
    """Apply only the device part of a `Module._apply` function to `encoding`: it stays float32 under `.to(bf16)`,
    `.half()` or Lightning's bf16-true cast (CLEX's network and θ tables are float32, docs/method.md §3.2)."""
    tensor = next(itertools.chain(encoding.parameters(), encoding.buffers()), None)
    device = torch.device("cpu") if tensor is None else tensor.device
    encoding.to(fn(torch.empty(0, device=device)).device)


class _Fp32Child(nn.Module):
    """A module whose child `self._fp32` (the encoding) follows device moves but never dtype casts."""

    _fp32: PositionEncoding

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse=False)  # own parameters and buffers (none here)
        if recurse:
            for child in self.children():
                _keep_fp32(child, fn) if child is self._fp32 else child._apply(fn)
        return self


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """The q, k, v and output projections around the model's attention variant (`clex.attention`)."""

    def __init__(self, cfg: ModelConfig, variant: CausalAttention):
        super().__init__()
        self.n_heads, self.head_dim, self.variant = cfg.n_heads, cfg.head_dim, variant
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, kv: LayerCache | None = None) -> torch.Tensor:
        """Attention of x's tokens (positions ctx.offset..) to themselves and, with `kv`, the cached tokens."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv is not None:  # every key and value so far, un-rotated
            k, v = kv.keys.write(k, ctx.offset), kv.values.write(v, ctx.offset)
        out = self.variant(q, k, v, ctx, kv)
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
    def __init__(self, cfg: ModelConfig, attention: CausalAttention):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model), Attention(cfg, attention)
        self.mlp_norm, self.mlp = RMSNorm(cfg.d_model), SwiGLU(cfg)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, kv: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx, kv)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(_Fp32Child):
    """Token embedding (tied with the output head) → blocks → RMSNorm → logits.

    `attention`: the attention variant every layer uses (`clex.attention`; plain causal attention by default).
    With a `KVCache`, n (for t and the variant) is the context length: cached plus new tokens.
    The encoding stays float32 when the model is cast (`.to(bf16)`, Lightning's bf16-true), as in `HFDecoder`.
    `activation_checkpointing` (set by clex.distributed.apply_activation_checkpointing): in training with grad on,
    each block's activations are dropped after its forward and recomputed in backward (less memory, one more
    forward per block).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, rope: PositionEncoding,
                 attention: CausalAttention = CausalAttention()):
        super().__init__()
        if attention.needs_rotary and not rope.rotary:
            raise ValueError(f"{attention!r} needs a rotary position encoding; {type(rope).__name__} is not rotary "
                             "(ALiBi/Sandwich are not supported)")
        self.cfg, self.vocab_size, self.attention = cfg, vocab_size, attention
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, attention) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.rope = rope
        self.activation_checkpointing = False
        self._init_weights()

    @property
    def _fp32(self) -> PositionEncoding:
        return self.rope

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
        """The inference t for a context of n tokens: the encoding's rule at the variant's context length
        (n, or the streaming cache's length min(n, window + sinks))."""
        return self.rope.inference_t(self.attention.context_len(n))

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, t: float | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits for (B, T) tokens. positions/t default to 0..n-1 and `context_t(n)`, n = T without a cache.

        `cache`: the tokens follow the cache's `length` tokens (positions offset.. with offset = cache.length,
        n = offset + T); their keys and values are appended, and positions must be None (0..n-1).
        """
        T, rope = tokens.shape[1], self.rope
        offset = 0
        if cache is not None:
            if positions is not None:
                raise ValueError("positions: a cached forward uses positions 0..n-1; allowed: None")
            offset = cache.length
        n = offset + T
        if positions is None:
            positions = torch.arange(n, device=tokens.device, dtype=torch.float32)
        if t is None:
            t = self.context_t(n)
        q_positions = positions if offset == 0 else positions[..., offset:]
        start = 0
        if cache is not None and rope.rotary:
            if self.attention.reuses_rotated_keys(n):
                start = cache.rotation_start(rope, t)
            else:
                cache.rotated_with = None  # the variant rotates every key itself: no rotated keys are kept
        cos, sin = rope(positions if start == 0 else positions[..., start:], t) if rope.rotary else (None, None)
        x = self.embed(tokens)
        bias = rope.attention_bias(self.cfg.n_heads, q_positions, positions)
        mask = None if bias is None else causal_mask(bias, compute_dtype(x))
        ctx = AttentionContext(cos, sin, mask, offset, start)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, ctx, None if cache is None else cache.layers[i], use_reentrant=False)
            else:
                x = block(x, ctx, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length = n
        return self.norm(x) @ self.embed.weight.T


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
