"""Tiny random models of every registered encoding and two no-cache references for the KV cache
(tests/test_progressive.py, tests/test_generate.py).

- `prefix_reference`: the ordinary model, without a cache, on the whole prefix [0, e) of each chunk at the t
  of a context of e tokens; the logits of the chunk's positions. The cache must match it wherever the hidden
  states of earlier tokens do not depend on t: one layer, or an encoding whose θ ignores t.
- `written_out`: the official cache (docs/method.md §3.6) written out from the weights, with an explicit softmax per
  query: each layer keeps the raw keys and values of earlier chunks as they were computed (at that chunk's t),
  and every chunk rotates all of them with its own θ(t) at their positions. With more than one layer this
  differs from the prefix reference once t changes, because layer ℓ > 0's keys and values of earlier tokens
  come from hidden states computed at the earlier t: the official protocol re-rotates, it does not recompute.

Test modules import `one_thread` too (an autouse fixture).
"""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import TypeAdapter

from clex.attention import CausalAttention, StreamingAttention
from clex.config import ModelConfig, PositionSpec
from clex.model import Decoder
from clex.rope import apply_rotary, build_position_encoding

L = 8
T_MAX = 4
VOCAB = 40
SPECS = {  # one per registered encoding, with t-dependent θ wherever the encoding has one
    "rope": {"type": "rope"},
    "clex": {"type": "clex", "t_max": T_MAX},
    "clex_discrete": {"type": "clex", "dynamics": "discrete", "t_max": T_MAX},
    "pi": {"type": "pi", "factor": 4},
    "ntk": {"type": "ntk", "factor": 4},
    "dynamic_ntk": {"type": "dynamic_ntk", "factor": 2},
    "yarn": {"type": "yarn", "factor": 4},
    "base_change": {"type": "base_change"},
    "alibi": {"type": "alibi"},
    "sandwich": {"type": "sandwich", "d_bar": 16},
    "randompos": {"type": "randompos"},
}
T_DEPENDENT = {"clex", "clex_discrete", "dynamic_ntk"}


def model_for(name: str, n_layers: int = 2, seed: int = 0, attention: CausalAttention = CausalAttention()) -> Decoder:
    """A float64 random model (head dim 8, L = 8) whose θ(t) really depends on t: the CLEX networks' W_down
    (zero at init) and embeddings are random; q/k/v weights 15× the init, so attention is far from uniform."""
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, n_layers=n_layers, n_heads=2, d_ff=32, train_len=L)
    spec = TypeAdapter(PositionSpec).validate_python(SPECS[name])
    rope = build_position_encoding(spec, head_dim=cfg.head_dim, base=cfg.rope_base, train_len=L)
    model = Decoder(cfg, VOCAB, rope, attention).double()
    with torch.no_grad():
        for p in model.rope.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(15)
    return model.eval()


def tokens(n: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, n), generator=torch.Generator().manual_seed(seed))


def context_t(model: Decoder, n: int):
    """The protocol's t for a context of n tokens, written out: the encoding's rule at n (at the streaming
    cache length min(n, window + sinks) for the streaming window)."""
    a = model.attention
    return model.rope.inference_t(min(n, a.window + a.sinks) if isinstance(a, StreamingAttention) else n)


def bounds(total: int, chunk: int) -> list[int]:
    return list(range(0, total, chunk)) + [total]


@torch.no_grad()
def prefix_reference(model: Decoder, x: torch.Tensor, ends: list[int]) -> torch.Tensor:
    return torch.cat([model(x[:, :e], t=context_t(model, e))[:, s:] for s, e in zip(ends, ends[1:])], 1)


@torch.no_grad()
def written_out(model: Decoder, x: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """Logits of x fed in chunks [ends[i], ends[i+1]) through the official un-rotated KV cache, written out."""
    H, D = model.cfg.n_heads, model.cfg.head_dim
    raw = [([], []) for _ in model.blocks]
    out = []
    for s, e in zip(ends, ends[1:]):
        t = context_t(model, e)
        q_scale = max(1.0, math.log(e) / math.log(L)) if model.attention.log_scale_len else 1.0
        h = model.embed(x[:, s:e])
        for block, (ks, vs) in zip(model.blocks, raw):
            B, T = h.shape[:2]
            q, k, v = block.attn.qkv(block.attn_norm(h)).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
            ks.append(k), vs.append(v)
            K, V = torch.cat(ks, 2), torch.cat(vs, 2)
            att = torch.stack([_attend(model, q[:, :, r], K, V, s + r, t, q_scale) for r in range(T)], 2)
            h = h + block.attn.proj(att.transpose(1, 2).reshape(B, T, H * D))
            h = h + block.mlp(block.mlp_norm(h))
        out.append(model.norm(h) @ model.embed.weight.T)
    return torch.cat(out, 1)


def _attend(model: Decoder, q, K, V, i: int, t, q_scale: float):
    """Query at position i, (B, H, D), against the keys it sees: 0..i, or with the streaming window the sinks
    and the last `window` (positions inside that cache, the query at its last one, as StreamingLLM)."""
    keys = list(range(i + 1))
    if isinstance(model.attention, StreamingAttention):
        window, sinks = model.attention.window, model.attention.sinks
        keys = sorted(set(range(min(sinks, i + 1))) | set(range(max(0, i - window + 1), i + 1)))
    q, k = q[:, :, None], K[:, :, keys]
    if model.rope.rotary:
        cos, sin = (a.double() for a in model.rope(torch.arange(len(keys), dtype=torch.float32), t))
        q, k = apply_rotary(q, cos[-1:], sin[-1:]), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) * q_scale / math.sqrt(q.shape[-1])
    key_positions = torch.tensor(keys, dtype=torch.float32)
    bias = model.rope.attention_bias(model.cfg.n_heads, torch.tensor([float(i)]), key_positions)
    if bias is not None:
        scores = scores + bias.double()
    return (scores.softmax(-1) @ V[:, :, keys])[:, :, 0]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread: on a shared CPU, more threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
