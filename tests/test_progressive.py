"""The progressive protocol (the official CLEX evaluation) and the KV cache behind it, against no-cache
references (tests/cache_reference.py): the prefix reference the design names (exact for one layer, or when θ
ignores t) and the official cache written out from the weights (any depth). Every registered encoding, the
streaming window and the attention log scale.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import clex.attention
from cache_reference import (  # noqa: F401 (one_thread: an autouse fixture)
    L, SPECS, T_DEPENDENT, T_MAX, bounds, model_for, one_thread, prefix_reference, tokens, written_out,
)
from clex.attention import CausalAttention, StreamingAttention
from clex.config import EvalConfig
from clex.evaluate import perplexity, progressive_logits
from clex.model import Decoder
from clex.rope import REGISTRY, apply_rotary
from conftest import run

VARIANTS = [(name, CausalAttention()) for name in SPECS] + [
    ("rope", StreamingAttention(5, 2)),  # the window fills inside chunk 0
    ("clex", StreamingAttention(13, 3)),  # t from the cache length 16 = 2L, reached inside chunk 1
    ("clex", CausalAttention(log_scale_len=L)),
    ("dynamic_ntk", StreamingAttention(20, 1, log_scale_len=L)),
]
IDS = [f"{n}-{type(a).__name__}{'-log_scale' if a.log_scale_len else ''}" for n, a in VARIANTS]
N = (T_MAX + 2) * L  # chunks at t = 1..t_max, then two beyond it


def test_every_registered_encoding_is_covered():
    assert set(SPECS) - {"clex_discrete"} == set(REGISTRY)


@pytest.mark.parametrize("name,attention", VARIANTS, ids=IDS)
def test_one_layer_progressive_equals_the_prefix_reference(name, attention):
    """Chunk j = the no-cache model on [0, (j+1)L) at t((j+1)L), its last L logits."""
    model, x = model_for(name, n_layers=1, attention=attention), tokens(N)
    with torch.no_grad():
        got = progressive_logits(model, x)
    want = prefix_reference(model, x, bounds(N, L))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if name in T_DEPENDENT:  # the test can fail: a cache that kept its t = 1 keys would be measurably off
        with torch.no_grad():
            stale = model(x[:, :2 * L], t=1)[:, L:]
        assert (stale - want[:, L:2 * L]).abs().max() > 1e-3


@pytest.mark.parametrize("name,attention", VARIANTS, ids=IDS)
def test_progressive_equals_the_official_cache_written_out(name, attention):
    model, x = model_for(name, attention=attention), tokens(N)
    with torch.no_grad():
        got = progressive_logits(model, x)
    # streaming: float32 angles at cache positions, not the originals
    tol = 1e-5 if isinstance(attention, StreamingAttention) else 1e-8
    torch.testing.assert_close(got, written_out(model, x, bounds(N, L)), rtol=tol, atol=tol)


def test_official_cache_re_rotates_deeper_layers_it_does_not_recompute_them():
    """With two layers, layer 1's keys and values of chunk 0 come from hidden states computed at t = 1: the
    official protocol keeps them (re-rotated), so it is not the prefix recomputed at t = 2."""
    model, x = model_for("clex"), tokens(2 * L)
    with torch.no_grad():
        got = progressive_logits(model, x)
    torch.testing.assert_close(got[:, :L], prefix_reference(model, x, [0, L]))
    assert (got[:, L:] - prefix_reference(model, x, [0, L, 2 * L])[:, L:]).abs().max() > 1e-3
    plain = model_for("rope")  # θ ignores t: the two agree at any depth
    with torch.no_grad():
        torch.testing.assert_close(progressive_logits(plain, x), prefix_reference(plain, x, [0, L, 2 * L]))


def test_progressive_with_chunks_that_do_not_divide_the_input():
    """A last partial chunk (generation's prefill) and a chunk size other than L."""
    model, x = model_for("clex"), tokens(3 * L + 3)
    with torch.no_grad():
        got = progressive_logits(model, x, chunk=5)
    torch.testing.assert_close(got, written_out(model, x, bounds(3 * L + 3, 5)), rtol=1e-6, atol=1e-6)


def _raw_keys(model: Decoder, x: torch.Tensor) -> torch.Tensor:
    """Layer 0's un-rotated keys (B, H, T, D), computed from the weights (layer 0's input does not depend on t)."""
    attn, cfg = model.blocks[0].attn, model.cfg
    B, T = x.shape
    qkv = attn.qkv(model.blocks[0].attn_norm(model.embed(x))).view(B, T, 3, cfg.n_heads, cfg.head_dim)
    return qkv[:, :, 1].transpose(1, 2)


def test_cache_re_rotates_every_key_when_t_changes_and_only_the_new_ones_otherwise(monkeypatch):
    model = model_for("clex")
    x = tokens(L + 3)
    used, rotated_rows = [], []
    real_attention, real_rotary = clex.attention.attention, clex.attention.apply_rotary
    monkeypatch.setattr(clex.attention, "attention", lambda q, k, *a: used.append(k) or real_attention(q, k, *a))
    monkeypatch.setattr(clex.attention, "apply_rotary",
                        lambda y, c, s: rotated_rows.append(y.shape[-2]) or real_rotary(y, c, s))
    cache = model.new_cache()

    def step(a: int, b: int) -> torch.Tensor:
        used.clear(), rotated_rows.clear()
        with torch.no_grad():
            model(x[:, a:b], cache=cache)
        return used[0]  # layer 0's keys as attention saw them

    def rotated(n: int, t: int) -> torch.Tensor:
        with torch.no_grad():
            cos, sin = model.rope(torch.arange(n, dtype=torch.float32), t)
            return apply_rotary(_raw_keys(model, x[:, :n]), cos.double(), sin.double())

    torch.testing.assert_close(step(0, 5), rotated(5, 1))
    assert rotated_rows == [5, 5] * model.cfg.n_layers and cache.rerotations == 0  # q and k of each layer
    torch.testing.assert_close(step(5, L), rotated(L, 1))  # still t = 1: only the 3 new keys are rotated
    assert rotated_rows == [3, 3] * model.cfg.n_layers and cache.rerotations == 0
    keys = step(L, L + 1)  # context L + 1: t = 2, every key re-rotated with θ(2) at its own position
    assert rotated_rows == [1, L + 1] * model.cfg.n_layers and cache.rerotations == 1
    torch.testing.assert_close(keys, rotated(L + 1, 2))
    assert (keys - rotated(L + 1, 1)).abs().max() > 1e-3  # θ(2) differs from θ(1)
    before = cache.layers[0].rotated.view().clone()
    torch.testing.assert_close(step(L + 1, L + 3), rotated(L + 3, 2))  # t = 2 again: 2 new keys only
    assert rotated_rows == [2, 2] * model.cfg.n_layers and cache.rerotations == 1
    assert torch.equal(cache.layers[0].rotated.view()[..., :L + 1, :], before)
    torch.testing.assert_close(cache.layers[0].keys.view(), _raw_keys(model, x))  # the cache holds raw keys


def test_dynamic_ntk_re_rotates_at_every_step():
    """t = n/L is a float: every new token changes θ, so every step re-rotates the prefix."""
    model, x = model_for("dynamic_ntk"), tokens(L + 4)
    cache, got = model.new_cache(), []
    with torch.no_grad():
        got.append(model(x[:, :L + 1], cache=cache))
        for i in range(L + 1, L + 4):
            got.append(model(x[:, i:i + 1], cache=cache))
            assert cache.rerotations == i - L
    want = written_out(model, x, [0] + list(range(L + 1, L + 5)))
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-6, atol=1e-6)


def test_cached_forward_rejects_positions():
    model = model_for("rope")
    with pytest.raises(ValueError, match="positions"):
        model(tokens(4), positions=torch.arange(4.0), cache=model.new_cache())


# ---------------------------------------------------------------------------- the protocol's PPL
def test_progressive_ppl_of_plain_rope_is_the_nonoverlapping_ppl():
    """θ does not depend on t and causal attention ignores the future, so every prediction is the same; the
    official scoring drops exactly the first prediction of each chunk after the first, whose NLL we compute."""
    model = model_for("rope")
    docs = tokens(8 * L, B=3, seed=2)
    n = 4 * L
    cfg = EvalConfig(lengths=[L, n], batch_size=2)
    prog, plain = perplexity(model, docs, n, cfg, "progressive"), perplexity(model, docs, n, cfg, "nonoverlapping")
    assert prog["tokens"] == plain["tokens"] == 3 * 2 * (n - 1)
    assert prog["nll"] == pytest.approx(plain["nll"], rel=1e-6)
    boundary = 0.0  # NLL of token jL predicted at position jL-1, j = 1..3, in each window
    with torch.no_grad():
        for d in range(3):
            for s in (0, n):
                w = docs[d:d + 1, s:s + n]
                losses = F.cross_entropy(model(w)[0, :-1], w[0, 1:], reduction="none")
                boundary += losses[[L - 1, 2 * L - 1, 3 * L - 1]].double().sum().item()
    official = prog["official"]
    assert official["tokens"] == plain["tokens"] - 3 * 2 * 3
    assert official["nll"] == pytest.approx(plain["nll"] - boundary, rel=1e-6)
    assert official["ppl"] == pytest.approx(math.exp(official["nll"] / official["tokens"]))
    assert prog["t_chunks"] == [1, 1, 1, 1]


def test_progressive_ppl_of_clex_scores_each_chunk_at_its_t():
    """The NLL is the one of the written-out cache's logits: boundary predictions at the earlier chunk's t."""
    model = model_for("clex")
    docs = tokens(4 * L, B=2, seed=3)
    got = perplexity(model, docs, 4 * L, EvalConfig(lengths=[4 * L], batch_size=1), "progressive")
    with torch.no_grad():
        logits = written_out(model, docs, bounds(4 * L, L))[:, :-1]
    want = F.cross_entropy(logits.transpose(1, 2), docs[:, 1:], reduction="sum").item()
    assert got["nll"] == pytest.approx(want, rel=1e-5)
    assert got["t_chunks"] == [1, 2, 3, 4] and got["t"] == 4
    one_pass = perplexity(model, docs, 4 * L, EvalConfig(lengths=[4 * L], batch_size=1), "nonoverlapping")
    assert abs(one_pass["nll"] - got["nll"]) > 1e-3  # all at t = 4: a different quantity


def test_sweep_validation_scores_windows_as_the_primary_protocol():
    """The sweep's objective (LitDecoder with `val_protocol`) is the evaluation's PPL of the same windows under
    that protocol: progressive through the cache, not one forward at t = ceil(n/L)."""
    from clex.config import OptimConfig
    from clex.lit import LitDecoder

    model = model_for("clex")
    docs = tokens(4 * L, B=2, seed=3)
    windows = torch.cat([docs, docs[:, :1]], 1)  # 4L + 1 tokens: 4L predictions, as a validation window holds
    cfg = EvalConfig(lengths=[4 * L + 1], batch_size=2)
    for protocol in ("progressive", "nonoverlapping"):
        lit = LitDecoder(model, OptimConfig(steps=1, batch_size=2, lr=1e-3), seed=0, val_protocol=protocol)
        with torch.no_grad():
            lit.validation_step(windows, 0)
        nll, count = lit._val_nll[4 * L]
        want = perplexity(model, windows, 4 * L + 1, cfg, protocol)
        assert count == want["tokens"] and nll == pytest.approx(want["nll"], rel=1e-5), protocol


# ---------------------------------------------------------------------------- the evaluate stage
def test_evaluate_writes_one_run_per_protocol(trained_study):
    import mlflow

    run(trained_study, "clex", "evaluate", "base")
    record = json.loads((trained_study / "build/eval/base.json").read_text())
    lengths = ["32", "64", "128"]
    assert record["primary"] == record["protocol"] == "progressive" and list(record["protocols"]) == [
        "progressive", "nonoverlapping"]
    assert record["val_windows"] == 8 and record["ppl"] == record["protocols"]["progressive"]["ppl"]
    for entry in record["protocols"].values():
        assert list(entry["ppl"]) == list(entry["val_ppl"]) == lengths
        assert entry["detail"]["test"]["128"]["tokens"] == record["n_docs"] * 127
        assert entry["detail"]["val"]["128"]["tokens"] == 8 * 127
    # plain RoPE: the two protocols agree (float tolerance), and validation is not the test set
    prog, plain = record["protocols"]["progressive"], record["protocols"]["nonoverlapping"]
    for n in lengths:
        assert prog["ppl"][n] == pytest.approx(plain["ppl"][n], rel=1e-4)
        assert prog["val_ppl"][n] != pytest.approx(prog["ppl"][n], rel=1e-3)

    client = mlflow.MlflowClient(f"sqlite:///{trained_study / 'mlflow.db'}")
    exp = client.get_experiment_by_name("clex-study")
    runs = client.search_runs([exp.experiment_id], "tags.dvc_stage = 'evaluate_base'", max_results=100)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" and r.info.run_name == "evaluate_base" for r in runs)
    by_protocol = {r.data.tags["eval_protocol"]: r for r in runs}
    assert {p: r.info.run_id for p, r in by_protocol.items()} == {
        p: e["run_id"] for p, e in record["protocols"].items()}
    assert record["run_id"] == by_protocol["progressive"].info.run_id
    for protocol, r in by_protocol.items():
        primary = protocol == "progressive"
        assert r.data.tags["eval_primary"] == str(primary).lower()
        assert r.data.tags["mlflow.parentRunId"] == record["train_run_id"]
        for key in ("ppl", "val_ppl"):
            history = {m.step: m.value for m in client.get_metric_history(r.info.run_id, key)}
            assert history == {int(n): v for n, v in record["protocols"][protocol][key].items()}
            assert r.data.metrics[f"{key}_64"] == record["protocols"][protocol][key]["64"]
        assert ("passkey_acc" in r.data.metrics) == primary and ("passkey_acc_32_depth0.5" in r.data.metrics) == primary
        assert [a.path for a in client.list_artifacts(r.info.run_id, "eval")] == ["eval/base.json"]
        assert r.data.params["eval.protocols"] == "['progressive', 'nonoverlapping']"
