"""StreamingLLM-style attention (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
Sinks", arXiv 2309.17453) as an evaluation mode for the rotary decoder: the attention computation behind the
`StreamingAttention` variant (clex/attention.py), which plugs it into the decoder.

What: query i attends only to the `sinks` first tokens of the sequence (the attention sinks) and to the
`window` most recent tokens (itself included): key j is visible iff j <= i and (j < sinks or j > i - window).
As in StreamingLLM's rolling KV cache, rotary positions are those *within the cache*: the sinks sit at
0..sinks-1, the window right after them, and the query at q'_i = min(i, c) with c = sinks + window - 1, so no
relative distance ever exceeds c. For a window key this equals plain RoPE at the original positions (only
i - j matters, and it equals the cache distance); for a sink key the logit is rot(q_i, q'_i) · rot(k_j, j).
For i <= c the cache holds tokens 0..i at their own positions: ordinary causal attention.

Why: it separates "can the model use positions beyond L" (length extrapolation, what CLEX targets) from
"can the model keep a bounded context stable over long inputs" (what attention sinks give): every distance
the model sees stays within sinks + window, i.e. within the training range when sinks + window <= L.

How: query blocks of `block` rows, each against the sink keys plus the keys in [max(sinks, r0 - window + 1),
r1), so memory is linear in T (no T×T matrix). With a KV cache (`offset` > 0) the queries are the last Tq of
the Tk = offset + Tq key positions: query row r is position offset + r, and every key is still rotated here,
from the un-rotated cache, with the current tables (docs/method.md §3.6: a change of t re-encodes the prefix).
The two query rotations go through one SDPA call per block by concatenating along the feature dim: Q' = cat(rot(q, i), rot(q, q'_i)), K' = cat(rot(k, j), 0) for window
keys and cat(0, rot(k, j)) for sink keys, so Q'·K' picks the right product per key; `scale` is passed
explicitly because the feature dim is doubled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clex.rope import apply_rotary


def check_streaming(window: int, sinks: int) -> None:
    """ValueError unless window >= 1 and sinks >= 0 (both integers)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"streaming window: {window!r} must be an integer >= 1 (the query itself is in it)")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"streaming sinks: {sinks!r} must be an integer >= 0")


def streaming_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, window: int, sinks: int,
                        scale: float, block: int = 1024, offset: int = 0) -> Tensor:
    """StreamingLLM attention (module docstring) of unrotated q (B, H, Tq, D) against unrotated k and v
    (B, H, Tk, D) -> (B, H, Tq, D); the queries sit at positions offset..Tk-1, so Tk = offset + Tq.

    cos/sin: rotary tables (Tk, D) or (B, Tk, D) whose row p is position p (cast to q's dtype here).
    `scale` is the softmax scale (1/sqrt(D) times any query scale). `block`: query rows per SDPA call.
    """
    check_streaming(window, sinks)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block: {block!r} must be an integer >= 1")
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tk != offset + Tq:
        raise ValueError(f"keys: {Tk} positions; queries at offset {offset} need offset + {Tq} = {offset + Tq}")
    if cos.shape[-2] != Tk or sin.shape[-2] != Tk:
        raise ValueError(f"cos/sin: {tuple(cos.shape)}/{tuple(sin.shape)} must have {Tk} rows, one per position")
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    q_rot = apply_rotary(q, cos[..., offset:, :], sin[..., offset:, :])  # at the original positions
    k_rot = apply_rotary(k, cos, sin)
    zeros = torch.zeros_like(k_rot)
    k_window, k_sink = torch.cat((k_rot, zeros), -1), torch.cat((zeros, k_rot), -1)
    c = sinks + window - 1
    device = q.device
    out = []
    for r0 in range(0, Tq, block):
        r1 = min(r0 + block, Tq)
        a0, a1 = offset + r0, offset + r1  # the block's query positions
        rows = torch.arange(a0, a1, device=device)
        cache_rows = rows.clamp(max=c)  # q'_i: the query's position inside the cache
        q_cache = apply_rotary(q[..., r0:r1, :], cos[..., cache_rows, :], sin[..., cache_rows, :])
        q2 = torch.cat((q_rot[..., r0:r1, :], q_cache), -1)
        n_sink, w0 = min(sinks, a1), min(max(sinks, a0 - window + 1), a1)  # w0 = a1: no window keys
        k2 = torch.cat((k_sink[..., :n_sink, :], k_window[..., w0:a1, :]), -2)
        v2 = torch.cat((v[..., :n_sink, :], v[..., w0:a1, :]), -2)
        keys = torch.cat((torch.arange(n_sink, device=device), torch.arange(w0, a1, device=device)))
        i, j = rows[:, None], keys[None, :]
        mask = (j <= i) & ((j < sinks) | (j > i - window))  # every row keeps key i itself
        out.append(F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask, scale=scale))
    return torch.cat(out, -2)
