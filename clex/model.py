"""A small LLaMA-style decoder (RMSNorm, SwiGLU, rotary attention) with a pluggable position encoding.

The position encoding is a registered `clex.rope.PositionEncoding`: the model only asks it for the
cos/sin table of the positions and scaling factor t it is given (rotary encodings), and for an
attention bias (ALiBi, Sandwich), each built once per forward and shared by every layer. Training code
chooses (t, positions) (method.md §3.4-3.5); at inference the encoding picks t from the sequence length (§3.6).
Attention without a bias goes through `flash_attn` when it is installed and the tensors are on CUDA in half
precision, else through `torch.nn.functional.scaled_dot_product_attention` (which itself uses a flash kernel
on CUDA); with a bias, through SDPA with the bias and the causal mask as one additive float mask.
`Decoder(streaming=(window, sinks))` is a StreamingLLM-style evaluation mode (`clex.streaming`): each query
sees the `sinks` first tokens plus the `window` most recent ones, with rotary positions inside that cache,
so t is chosen for the cache length; rotary encodings only.
"""
from __future__ import annotations

import math

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
    """Causal attention on (B, H, T, D) tensors; flash-attn where it can run, SDPA otherwise.

    `mask` (from `causal_mask`) is an additive float mask that already holds causality; it forces SDPA.
    `q_scale` multiplies the queries (CLEX's attention log scaling), folded into the softmax scale.
    """
    scale = q_scale / math.sqrt(q.shape[-1])
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def causal_mask(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bias (…, Tq, Tk) with -inf where key j > query i, cast once to the attention dtype.

    The bias itself is float32 (the encoding builds it so); like cos/sin, it is rounded only here.
    """
    future = torch.ones(bias.shape[-2:], dtype=torch.bool, device=bias.device).triu(1)
    return bias.masked_fill(future, float("-inf")).to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype q and k will have: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None = None, q_scale: float = 1.0,
                streaming: tuple[int, int] | None = None) -> torch.Tensor:
        """`streaming` (window, sinks): `streaming_attention` on the raw q/k and the tables (cos required)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if streaming is not None:
            window, sinks = streaming
            out = streaming_attention(q, k, v, cos, sin, window, sinks, scale=q_scale / math.sqrt(self.head_dim))
        else:
            if cos is not None:
                cos, sin = cos.to(q.dtype), sin.to(q.dtype)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            out = attention(q, k, v, mask, q_scale)
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

    def forward(self, x, cos, sin, mask=None, q_scale=1.0, streaming=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, q_scale, streaming)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Token embedding (tied with the output head) → blocks → RMSNorm → logits.

    `attn_log_scale` (method.md §3.7, §8): queries times ln(n)/ln(L) for inputs of n > L tokens
    (1 otherwise), the official code's "log scaling", here clipped at 1 as method.md §8 defines the knob.
    `streaming` (window, sinks): StreamingLLM-style evaluation (`clex.streaming`), rotary encodings only;
    t defaults to the inference rule at the cache length min(T, window + sinks), and inputs of at most
    window + sinks tokens take the ordinary path (identical there). q_scale is computed from T as usual.
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

        The pilot (pilot.md) showed PyTorch's unit-variance embedding init starts at ~124 nats of loss.
        """
        std = self.cfg.init_std
        for module_name, module in self.named_modules():
            if module_name.startswith("rope"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if module_name.endswith(("proj", "down")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, t: int | None = None):
        """Logits for (B, T) tokens. positions/t default to 0..T-1 and the inference rule for t."""
        T, rope, streaming = tokens.shape[1], self.rope, self.streaming
        if streaming is not None:
            if not rope.rotary:
                raise ValueError(f"streaming evaluation needs a rotary position encoding; {type(rope).__name__} "
                                 "is not rotary (ALiBi/Sandwich are not supported)")
            window, sinks = streaming
            if t is None:
                t = rope.inference_t(min(T, window + sinks))  # cache positions never exceed window + sinks - 1
            if T <= window + sinks:
                streaming = None  # the cache never drops a token: ordinary causal attention
        if positions is None:
            positions = torch.arange(T, device=tokens.device, dtype=torch.float32)
        if t is None:
            t = rope.inference_t(T)
        cos, sin = rope(positions, t) if rope.rotary else (None, None)
        x = self.embed(tokens)
        bias = rope.attention_bias(self.cfg.n_heads, positions, positions)
        mask = None if bias is None else causal_mask(bias, compute_dtype(x))
        q_scale = max(1.0, math.log(T) / math.log(self.cfg.train_len)) if self.attn_log_scale else 1.0
        for block in self.blocks:
            x = block(x, cos, sin, mask, q_scale, streaming)
        return self.norm(x) @ self.embed.weight.T


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
