"""The decoder, the PPL protocols and the report statistics, against independent references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clex.config import EvalConfig, ModelConfig
from clex.evaluate import perplexity, windows
from clex.lit import lr_lambda, step_generator
from clex.config import OptimConfig
from clex.attention import CausalAttention, attention, causal_mask
from clex.model import Decoder
from clex.rope import PlainRope

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, train_len=16)


def tiny_model(seed: int = 0, attention: CausalAttention = CausalAttention()) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(CFG, 50, PlainRope(CFG.head_dim, CFG.rope_base, CFG.train_len), attention).eval()


def test_attention_matches_explicit_causal_softmax():
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.triu(torch.ones(7, 7, dtype=torch.bool), 1), float("-inf"))
    torch.testing.assert_close(attention(q, k, v), scores.softmax(-1) @ v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("Tq", [1, 3, 7])
def test_attention_of_the_last_queries_matches_explicit_causal_softmax(Tq):
    """Queries at the last Tq of 7 key positions (a KV cache): query i sees keys <= 7 - Tq + i."""
    q, k, v = torch.randn(2, 4, Tq, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) * 1.5
    i, j = torch.arange(7 - Tq, 7)[:, None], torch.arange(7)[None, :]
    want = scores.masked_fill(j > i, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(attention(q, k, v, q_scale=1.5), want, rtol=1e-5, atol=1e-6)
    bias = torch.randn(4, Tq, 7)
    want = (scores + bias).masked_fill(j > i, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(attention(q, k, v, causal_mask(bias, q.dtype), 1.5), want, rtol=1e-5, atol=1e-6)


def test_attn_log_scale_equals_scaled_query_projection():
    """ln(n)/ln(L) on the queries for n > L, nothing at n <= L; reference: q-rows of W_qkv scaled by hand."""
    def peaky(attention: CausalAttention = CausalAttention()) -> Decoder:  # larger q/k weights than at init,
        m = tiny_model(attention=attention)  # so attention is far from uniform
        with torch.no_grad():
            for block in m.blocks:
                block.attn.qkv.weight.mul_(20)
        return m

    scaled, plain = peaky(CausalAttention(log_scale_len=CFG.train_len)), peaky()
    short, long = torch.randint(0, 50, (2, CFG.train_len)), torch.randint(0, 50, (2, 4 * CFG.train_len))
    with torch.no_grad():
        assert torch.equal(scaled(short), plain(short))
        s = math.log(4 * CFG.train_len) / math.log(CFG.train_len)
        for block in plain.blocks:
            block.attn.qkv.weight[: CFG.d_model] *= s  # rotary is linear, so this scales the rotated queries
        torch.testing.assert_close(scaled(long), plain(long), rtol=1e-5, atol=1e-5)
        assert (scaled(long) - peaky()(long)).abs().max() > 1e-2


def test_decoder_is_causal_and_shift_invariant_under_rope():
    model = tiny_model()
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0, :8], model(y)[0, :8])  # the future does not leak
        # RoPE is relative: shifting every position by a constant leaves the logits unchanged
        pos = torch.arange(12, dtype=torch.float32)
        torch.testing.assert_close(model(x, positions=pos + 5.0, t=1), model(x, positions=pos, t=1),
                                   rtol=1e-4, atol=1e-4)


def test_gpt2_style_init():
    model = Decoder(ModelConfig(d_model=256, n_layers=4, n_heads=4, d_ff=512), 1000, PlainRope(64, 1e4, 128))
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    # tied head and near-uniform first prediction: loss ≈ ln(vocab), not the ~124 nats of default init
    x = torch.randint(0, 1000, (2, 64))
    loss = F.cross_entropy(model(x)[:, :-1].reshape(-1, 1000), x[:, 1:].reshape(-1))
    assert abs(loss.item() - math.log(1000)) < 0.2


def test_windows_cover_every_prediction_once():
    assert windows(12, 4, "nonoverlapping", None) == [(0, 0), (4, 0), (8, 0)]
    # sliding: first window scores all 3 predictions, the others their last `stride` = 2
    w = windows(12, 4, "sliding", 2)
    assert w == [(0, 0), (2, 1), (4, 1), (6, 1), (8, 1)]
    targets = [s + 1 + j for s, first in w for j in range(first, 3)]
    assert targets == list(range(1, 12))


def test_perplexity_equals_direct_computation():
    model = tiny_model()
    docs = torch.randint(0, 50, (2, 32))
    got = perplexity(model, docs, 16, EvalConfig(lengths=[16], batch_size=3), "nonoverlapping")
    nll, n = 0.0, 0
    with torch.no_grad():
        for d in range(2):
            for s in (0, 16):
                w = docs[d:d + 1, s:s + 16]
                nll += F.cross_entropy(model(w)[0, :-1], w[0, 1:], reduction="sum").item()
                n += 15
    assert got["tokens"] == n
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["t"] == 1


def test_schedule_and_step_generator():
    f = lr_lambda(OptimConfig(steps=100, batch_size=1, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    a, b = step_generator(3, 7), step_generator(3, 7)
    assert torch.equal(torch.randperm(20, generator=a), torch.randperm(20, generator=b))
    assert not np.array_equal(torch.randperm(20, generator=step_generator(3, 8)).numpy(),
                              torch.randperm(20, generator=step_generator(3, 7)).numpy())
