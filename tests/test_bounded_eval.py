"""Bounded-memory progressive evaluation (docs/protocols.md, "Memory"): chunk-by-chunk scoring, caches sized for the
window and written in place, re-rotation in blocks, and the lower-right causal mask, each against the computation it
replaced (full logits through a growing cache, an explicit mask), with exact equality on CPU float32.
"""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import clex.attention
from clex.attention import attention, future
from clex.config import EvalConfig
from clex.evaluate import logit_chunks, perplexity, progressive_logits, rows_of, token_nll
from clex.hf import from_decoder
from test_hf import L, SPECS, decoder, tokens

NAMES = ["rope", "clex", "dynamic_ntk", "yarn", "alibi", "sandwich"]  # CLEX, Dynamic NTK: re-rotations
N = 5 * L + 3  # t = 1..4 (CLEX t_max 4), then capped, and a partial last chunk


def model_for(name: str, hf: bool):
    ours = decoder(name)
    return from_decoder(ours, SPECS[name]).eval() if hf else ours


def old_perplexity(model, docs: torch.Tensor, length: int, protocol: str) -> tuple[float, int, float]:
    """The former scoring, kept as the reference: every logit of the window at once (progressive: through a cache
    grown as needed), one cross-entropy over them; (nll, tokens, boundary nll) as perplexity summed them."""
    nll, count, boundary = 0.0, 0, 0.0
    for d in range(docs.shape[0]):
        for s in range(0, docs.shape[1] - length + 1, length):
            batch = docs[d:d + 1, s:s + length]
            with torch.no_grad():
                full = progressive_logits(model, batch, cache=model.new_cache()) if protocol == "progressive" else model(batch)
            row = F.cross_entropy(full[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none")[0]
            nll, count = nll + row.double().sum().item(), count + row.shape[0]
            boundary += row[L - 1::L].double().sum().item()
    return nll, count, boundary


@pytest.mark.parametrize("hf", [False, True], ids=["decoder", "hf"])
@pytest.mark.parametrize("name", NAMES)
def test_chunked_scoring_equals_the_full_logit_computation(name, hf):
    model = model_for(name, hf)
    docs = tokens(2 * N, batch=2, seed=4)
    for protocol in ("progressive", "nonoverlapping"):
        got = perplexity(model, docs, N, EvalConfig(lengths=[N], batch_size=1), protocol)
        with torch.no_grad():
            nll, count, boundary = old_perplexity(model, docs, N, protocol)
        assert (got["nll"], got["tokens"]) == (nll, count), protocol
        if protocol == "progressive":
            assert got["official"]["nll"] == nll - boundary


@pytest.mark.parametrize("hf", [False, True], ids=["decoder", "hf"])
@pytest.mark.parametrize("name", ["clex", "dynamic_ntk", "alibi"])
def test_sized_cache_and_block_rotation_give_the_growing_cache_logits(name, hf, monkeypatch):
    """A cache sized for the window is allocated once (no growth, the same storage at every chunk); keys are
    re-rotated 3 rows at a time; the logits are those of a growing cache rotating all keys at once."""
    model, x = model_for(name, hf), tokens(N)
    with torch.no_grad():
        want = progressive_logits(model, x, cache=model.new_cache())
        monkeypatch.setattr(clex.attention, "ROTATE_BLOCK", 3)
        cache, got, storage = model.new_cache(N), [], set()
        for _, logits in logit_chunks(model, x, cache=cache):
            got.append(logits)
            storage.add(tuple(r.data.data_ptr() for r in _rows(cache)))
    assert torch.equal(torch.cat(got, 1), want)
    assert len(storage) == 1 and all(r.data.shape[-2] == N for r in _rows(cache))
    assert cache.rerotations == {"clex": 3, "dynamic_ntk": 5, "alibi": 0}[name]


def _rows(cache):
    """Every Rows buffer of a KVCache or RerotatingCache."""
    layers = cache.layers
    if hasattr(layers[0], "rows"):
        return [r for layer in layers for r in layer.rows.values()]
    return [r for layer in layers for r in (layer.keys, layer.values, layer.rotated) if r.data is not None]


@pytest.mark.parametrize("hf", [False, True], ids=["decoder", "hf"])
def test_passkey_rows_equal_the_full_logits(hf):
    model, x = model_for("clex", hf), tokens(N)
    rows = torch.tensor([[0, L - 1, N - 2], [L, 3 * L + 1, N - 1]])
    with torch.no_grad():
        want = progressive_logits(model, x)[torch.arange(2)[:, None], rows]
        assert torch.equal(rows_of(model, "progressive")(x, rows), want)
        assert torch.equal(rows_of(model, "nonoverlapping")(x, rows), model(x)[torch.arange(2)[:, None], rows])


def test_token_nll_holds_one_chunk_of_logits():
    """When chunk j's logits exist, no earlier chunk's are still held (by token_nll or the chunk generator)."""
    model, x = model_for("clex", False), tokens(N)
    refs, alive = [], []

    def watched():
        for piece in logit_chunks(model, x):
            alive.append(sum(r() is not None for r in refs))
            refs.append(weakref.ref(piece[1]))
            yield piece

    with torch.no_grad():
        token_nll(watched(), x)
    assert len(alive) == 6 and alive == [0] * 6


@pytest.mark.parametrize("Tq,Tk", [(1, 9), (5, 5), (5, 23), (16, 80)])
def test_lower_right_causal_attention_equals_the_explicit_mask(Tq, Tk):
    """SDPA with `causal_lower_right` (CUDA keeps its flash / memory-efficient kernels): on the CPU the same numbers
    as the explicit mask, query i seeing keys 0..Tk-Tq+i."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g) for T in (Tq, Tk, Tk))
    scale = 0.7 / 8 ** 0.5
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=~future(Tq, Tk, q.device), scale=scale)
    lower_right = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Tq, Tk), scale=scale)
    assert torch.equal(lower_right, want) and torch.equal(attention(q, k, v, q_scale=0.7), want)
    if Tq < Tk and Tq > 1:  # the mask really is lower-right: top-left would hide keys the last query sees
        assert not torch.equal(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), want)
