"""StreamingLLM-style attention (clex.streaming) and the Decoder with the streaming variant, against a slow reference
that literally simulates the rolling KV cache (sinks + last `window` tokens, positions inside the cache)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import clex.attention
from clex.attention import CausalAttention, StreamingAttention
from clex.config import ModelConfig
from clex.model import Decoder
from clex.rope import Alibi, PlainRope, apply_rotary, default_inv_freq, rotary_tables
from clex.streaming import streaming_attention

D = 8
INV_FREQ = default_inv_freq(D, 10.0)  # a small base, so that positions matter within a few tokens


def qkv(T: int, seed: int = 0, B: int = 2, H: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, D, generator=g, dtype=dtype) * 2 for _ in range(3))


def reference(q, k, v, window: int, sinks: int, scale: float):
    """Per query i: cache = the first `sinks` tokens + the last `window` ones up to i (deduplicated, in order),
    at cache positions 0..len-1; q_i at the last cache position, each key at its own."""
    T = q.shape[-2]
    out = torch.empty_like(q)
    for i in range(T):
        cache = sorted(set(range(min(sinks, i + 1))) | set(range(max(0, i - window + 1), i + 1)))
        cos, sin = (x.to(q.dtype) for x in rotary_tables(torch.arange(len(cache)), INV_FREQ))
        qi = apply_rotary(q[..., i:i + 1, :], cos[-1:], sin[-1:])
        kc = apply_rotary(k[..., cache, :], cos, sin)
        weights = ((qi @ kc.transpose(-1, -2)) * scale).softmax(-1)
        out[..., i:i + 1, :] = weights @ v[..., cache, :]
    return out


@pytest.mark.parametrize("T,window,sinks,block", [
    (40, 8, 4, 1024),  # one block
    (40, 8, 4, 5),  # block smaller than window, blocks straddling c
    (37, 6, 0, 4),  # no sinks: a plain sliding window
    (33, 1, 2, 7),  # window 1: sinks + the query itself
    (30, 5, 3, 1),  # one query per block
    (20, 10, 12, 3),  # window + sinks >= T: ordinary causal attention
    (25, 4, 30, 6),  # more sinks than tokens
])
def test_matches_rolling_cache_reference(T, window, sinks, block):
    q, k, v = qkv(T, seed=T + window + sinks)
    cos, sin = rotary_tables(torch.arange(T), INV_FREQ)
    scale = 1.3 / math.sqrt(D)
    got = streaming_attention(q, k, v, cos, sin, window, sinks, scale, block=block)
    torch.testing.assert_close(got, reference(q, k, v, window, sinks, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,offset,window,sinks,block", [
    (40, 24, 8, 4, 5),  # queries past the cache size, several blocks
    (40, 39, 6, 2, 4),  # one new token (generation)
    (30, 5, 10, 3, 7),  # the window fills inside the queries
    (20, 8, 30, 2, 3),  # the cache never drops a token
])
def test_queries_at_an_offset_match_the_reference_rows(T, offset, window, sinks, block):
    """With a KV cache the queries are the last T - offset positions: the reference's last rows."""
    q, k, v = qkv(T, seed=T + offset)
    cos, sin = rotary_tables(torch.arange(T), INV_FREQ)
    got = streaming_attention(q[..., offset:, :], k, v, cos, sin, window, sinks, 0.7, block=block, offset=offset)
    torch.testing.assert_close(got, reference(q, k, v, window, sinks, 0.7)[..., offset:, :], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="offset"):
        streaming_attention(q[..., offset:, :], k, v, cos, sin, window, sinks, 0.7, offset=offset + 1)


def test_float32_and_batched_tables():
    """float32 activations (tables cast inside) and (B, T, D) tables give the same result."""
    T, window, sinks = 30, 6, 2
    q, k, v = qkv(T, seed=1, dtype=torch.float32)
    cos, sin = rotary_tables(torch.arange(T), INV_FREQ)
    want = reference(q.double(), k.double(), v.double(), window, sinks, 1 / math.sqrt(D)).float()
    got = streaming_attention(q, k, v, cos, sin, window, sinks, 1 / math.sqrt(D), block=7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    batched = streaming_attention(q, k, v, cos.expand(2, T, D), sin.expand(2, T, D), window, sinks,
                                  1 / math.sqrt(D), block=7)
    torch.testing.assert_close(batched, got)


@pytest.mark.parametrize("window,sinks", [(20, 0), (12, 8), (1, 19), (30, 4)])
def test_full_cache_is_causal_sdpa(window, sinks):
    T = 20
    q, k, v = qkv(T, seed=3)
    cos, sin = (x.double() for x in rotary_tables(torch.arange(T), INV_FREQ))
    want = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, is_causal=True)
    got = streaming_attention(q, k, v, cos, sin, window, sinks, 1 / math.sqrt(D), block=6)
    torch.testing.assert_close(got, want)


def test_distances_beyond_the_cache_do_not_matter():
    """Rotary positions live in the cache: shifting the whole sequence leaves the output unchanged, and a
    query's output depends only on its sinks and window (changing dropped tokens changes nothing)."""
    T, window, sinks = 40, 6, 2
    q, k, v = qkv(T, seed=4)
    cos, sin = rotary_tables(torch.arange(T), INV_FREQ)
    cos5, sin5 = rotary_tables(torch.arange(T) + 5.0, INV_FREQ)
    base = streaming_attention(q, k, v, cos, sin, window, sinks, 0.4, block=9)
    torch.testing.assert_close(streaming_attention(q, k, v, cos5, sin5, window, sinks, 0.4, block=9), base,
                               rtol=1e-5, atol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[..., sinks:30, :] += 1.0  # tokens 2..29 are outside every window of queries >= 35
    v2[..., sinks:30, :] -= 1.0
    torch.testing.assert_close(streaming_attention(q, k2, v2, cos, sin, window, sinks, 0.4, block=9)[..., 35:, :],
                               base[..., 35:, :])


@pytest.mark.parametrize("window,sinks", [(0, 2), (-1, 0), (4, -1), (2.5, 1), (4, None)])
def test_bad_window_or_sinks(window, sinks):
    q, k, v = qkv(10)
    cos, sin = rotary_tables(torch.arange(10), INV_FREQ)
    with pytest.raises(ValueError, match="streaming (window|sinks)"):
        streaming_attention(q, k, v, cos, sin, window, sinks, 1.0)
    with pytest.raises(ValueError, match="streaming (window|sinks)"):
        StreamingAttention(window, sinks)


def test_bad_block_and_tables():
    q, k, v = qkv(10)
    cos, sin = rotary_tables(torch.arange(10), INV_FREQ)
    with pytest.raises(ValueError, match="block"):
        streaming_attention(q, k, v, cos, sin, 4, 1, 1.0, block=0)
    with pytest.raises(ValueError, match="rows"):
        streaming_attention(q, k, v, cos[:9], sin[:9], 4, 1, 1.0)


# ---------------------------------------------------------------------------- the Decoder with the streaming variant
CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, train_len=16)


def tiny(streaming=None, rope=None, seed: int = 0, log_scale: bool = False) -> Decoder:
    """streaming: (window, sinks), or None for plain causal attention."""
    torch.manual_seed(seed)
    rope = rope or PlainRope(CFG.head_dim, CFG.rope_base, CFG.train_len)
    log_scale_len = CFG.train_len if log_scale else None
    attention = (StreamingAttention(*streaming, log_scale_len=log_scale_len) if streaming
                 else CausalAttention(log_scale_len=log_scale_len))
    model = Decoder(CFG, 50, rope, attention).eval()
    with torch.no_grad():  # peakier attention than at init, so that dropping tokens shows
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10)
    return model


def test_decoder_streaming_differs_only_after_the_cache_fills():
    window, sinks, T = 6, 2, 40
    tokens = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(0))
    full, stream = tiny(), tiny(streaming=(window, sinks))
    assert stream.attention == StreamingAttention(window, sinks)
    with torch.no_grad():
        a, b = full(tokens), stream(tokens)
    c = window + sinks - 1
    torch.testing.assert_close(b[:, :c + 1], a[:, :c + 1])  # query i <= c: the cache holds everything
    assert (b[:, c + 1:] - a[:, c + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("window,sinks", [(12, 4), (20, 0), (30, 3)])
def test_decoder_streaming_is_the_full_model_when_the_cache_holds_everything(window, sinks):
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(tiny(streaming=(window, sinks))(tokens), tiny()(tokens))


def test_decoder_streaming_uses_the_attention_with_folded_q_scale_and_cache_t(monkeypatch):
    """Every block calls streaming_attention with scale = q_scale/√d; t comes from the cache length."""
    window, sinks, T = 6, 2, 40
    calls, ts = [], []
    real = clex.attention.streaming_attention

    def spy(q, k, v, cos, sin, w, s, scale, *args, **kwargs):
        calls.append((w, s, scale, q.shape))
        return real(q, k, v, cos, sin, w, s, scale, *args, **kwargs)

    monkeypatch.setattr(clex.attention, "streaming_attention", spy)
    model = tiny(streaming=(window, sinks), log_scale=True)
    inference_t = model.rope.inference_t
    monkeypatch.setattr(model.rope, "inference_t", lambda n: ts.append(n) or inference_t(n))
    with torch.no_grad():
        model(torch.randint(0, 50, (1, T)))
    q_scale = math.log(T) / math.log(CFG.train_len)
    assert [c[:3] for c in calls] == [(window, sinks, pytest.approx(q_scale / math.sqrt(CFG.head_dim)))] * 2
    assert ts == [window + sinks]
    calls.clear()
    with torch.no_grad():
        model(torch.randint(0, 50, (1, window + sinks)))
    assert calls == []  # ordinary path when the cache never drops a token


def test_decoder_streaming_rejects_bias_encodings():
    with pytest.raises(ValueError, match="StreamingAttention.*Alibi.*rotary"):
        tiny(streaming=(6, 2), rope=Alibi(CFG.head_dim, CFG.rope_base, CFG.train_len))
