"""Attention variants (clex/attention.py): the registry, the Experiment's mapping, and a variant defined here
that plugs into the Decoder (with and without the KV cache) without any change to the model."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import clex.attention
from clex.attention import CausalAttention, StreamingAttention, attention_for, build_attention, register
from clex.config import Experiment, ModelConfig, RopeSpec, StreamingSpec
from clex.evaluate import progressive_logits
from clex.model import Decoder
from clex.rope import DynamicNtk, PlainRope

CFG = ModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, train_len=8)


@dataclass(frozen=True)
class LocalAttention(CausalAttention):
    """A sliding window without sinks: query i sees keys i - window < j <= i at their own positions; t is chosen
    for the window's length. Rotation (and the cache's rotated keys) as in plain attention."""

    window: int

    def context_len(self, n: int) -> int:
        return min(n, self.window)

    def __call__(self, q, k, v, ctx, kv=None):
        q, k = self.rotate(q, k, ctx, kv)
        Tq, Tk = q.shape[-2], k.shape[-2]
        i, j = torch.arange(Tk - Tq, Tk)[:, None], torch.arange(Tk)[None, :]
        visible = (j <= i) & (j > i - self.window)
        scale = self.query_scale(Tk) / math.sqrt(q.shape[-1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for this test, so that registering here leaves the real one as it was."""
    monkeypatch.setattr(clex.attention, "VARIANTS", dict(clex.attention.VARIANTS))


def model(attention: CausalAttention, rope=None, seed: int = 0) -> Decoder:
    """A float64 one-layer model with q/k weights 10× the init, so that attention is far from uniform."""
    torch.manual_seed(seed)
    m = Decoder(CFG, 50, rope or PlainRope(CFG.head_dim, CFG.rope_base, CFG.train_len), attention).double()
    with torch.no_grad():
        m.blocks[0].attn.qkv.weight.mul_(10)
    return m.eval()


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (2, n), generator=torch.Generator().manual_seed(seed))


def test_registry_builds_variants_by_name(registry):
    assert build_attention("causal") == CausalAttention()
    assert build_attention("streaming", window=6, sinks=2, log_scale_len=8) == StreamingAttention(6, 2, log_scale_len=8)
    with pytest.raises(ValueError, match=r"attention: 'nope' is unknown; allowed: \['causal', 'streaming'\]"):
        build_attention("nope")
    with pytest.raises(ValueError, match="'causal' is already registered"):
        register("causal")(LocalAttention)


def test_attention_for_maps_the_experiment_settings():
    exp = Experiment(name="x", rope=RopeSpec(type="rope"))
    L, spec = 64, StreamingSpec(window_ratio=0.5, sink_ratio=0.1)
    assert attention_for(exp, L) == CausalAttention()
    assert attention_for(exp.model_copy(update={"attn_log_scale": True}), L) == CausalAttention(log_scale_len=L)
    streaming = exp.model_copy(update={"streaming": spec})
    assert attention_for(streaming, L) == StreamingAttention(32, 6)
    both = streaming.model_copy(update={"attn_log_scale": True})
    assert attention_for(both, L) == StreamingAttention(32, 6, log_scale_len=L)


def test_log_scale_is_one_up_to_L_then_ln_n_over_ln_L():
    a = CausalAttention(log_scale_len=8)
    assert [a.query_scale(n) for n in (1, 8)] == [1.0, 1.0] and a.query_scale(64) == pytest.approx(2.0)
    assert CausalAttention().query_scale(64) == 1.0 == StreamingAttention(4, 1).query_scale(64)


def test_a_variant_defined_outside_the_model_plugs_into_the_decoder(registry):
    """Registered here and built by name: the Decoder runs it, picks t by its context length, and the KV cache
    (chunks and single tokens) gives the logits of one full forward."""
    register("local")(LocalAttention)
    window, x = 3, tokens(20)
    local, plain = model(build_attention("local", window=window)), model(CausalAttention())
    with torch.no_grad():
        got = local(x)
        torch.testing.assert_close(got[:, :window], plain(x)[:, :window])  # the window holds every key
        assert (got[:, window:] - plain(x)[:, window:]).abs().max() > 1e-3
        y = x.clone()
        y[:, :10] = (y[:, :10] + 1) % 50  # one layer: position i reads tokens i - 2..i only
        torch.testing.assert_close(local(y)[:, 10 + window - 1:], got[:, 10 + window - 1:])
        cache = local.new_cache()
        chunked = [local(x[:, :7], cache=cache), local(x[:, 7:12], cache=cache)]
        chunked += [local(x[:, i:i + 1], cache=cache) for i in range(12, 20)]
        torch.testing.assert_close(torch.cat(chunked, 1), got, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(progressive_logits(local, x), got, rtol=1e-10, atol=1e-10)
    ntk = model(LocalAttention(window=12), rope=DynamicNtk(CFG.head_dim, CFG.rope_base, CFG.train_len, 2))
    assert ntk.context_t(100) == ntk.rope.inference_t(12) != ntk.rope.inference_t(100)
