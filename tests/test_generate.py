"""Generation with the KV cache (clex.generate, `clex generate`), against no-cache re-runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cache_reference import L, VOCAB, context_t, model_for, one_thread, tokens, written_out  # noqa: F401
from clex.cli import main
from clex.generate import generate, pick
from conftest import run

PROMPT = 5  # generate 2L tokens from here: the context crosses L and 2L, so t goes 1 -> 2 -> 3


def reference(model, prompt: torch.Tensor, steps: int, logits_of, temperature: float = 0.0, seed: int = 0):
    """Decoding where every step re-runs the whole sequence so far through `logits_of` (no cache): the ids and
    the logits each was picked from."""
    seq, used, g = prompt.view(1, -1), [], torch.Generator().manual_seed(seed)
    for _ in range(steps):
        used.append(logits_of(model, seq)[0, -1])
        seq = torch.cat((seq, torch.tensor([[pick(used[-1], temperature, None, g)]])), 1)
    return seq[0, prompt.numel():].tolist(), torch.stack(used)


def cached(model, prompt: torch.Tensor, steps: int, temperature: float = 0.0, seed: int = 0):
    """`generate`'s ids, t per step, and the logits each id was picked from (the last row of every forward)."""
    rows = []
    hook = model.register_forward_hook(lambda module, args, out: rows.append(out[0, -1]))
    try:
        ids, ts = generate(model, prompt, steps, temperature, generator=torch.Generator().manual_seed(seed))
    finally:
        hook.remove()
    return ids, ts, torch.stack(rows[-steps:])  # one row per prefill chunk, then one per step


def no_cache(model, seq):
    with torch.no_grad():
        return model(seq)


def written_out_steps(model, seq):
    """The cache's own chunking: the prompt in chunks of L, then one token per step."""
    ends = list(range(0, PROMPT, L)) + list(range(PROMPT, seq.shape[1] + 1))
    return written_out(model, seq, ends)


CASES = [
    ("clex", 1, no_cache),  # one layer: re-rotating the cache is exactly a re-run at the new t
    ("rope", 2, no_cache),  # θ ignores t: the cache is exactly a re-run at any depth
    ("clex", 2, written_out_steps),  # deeper layers keep the keys/values of earlier t (the official cache)
    ("dynamic_ntk", 2, written_out_steps),
]


@pytest.mark.parametrize("name,n_layers,logits_of", CASES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_with_the_cache_equals_the_reference(name, n_layers, logits_of, temperature):
    """Greedy and sampled (same generator) decoding across a t change: the same ids from the same logits."""
    model = model_for(name, n_layers=n_layers)
    prompt = tokens(PROMPT, B=1)[0]
    ids, ts, logits = cached(model, prompt, 2 * L, temperature)
    want_ids, want_logits = reference(model, prompt, 2 * L, logits_of, temperature)
    assert ids == want_ids
    torch.testing.assert_close(logits, want_logits, rtol=1e-8, atol=1e-8)
    assert ts == [context_t(model, PROMPT + i) for i in range(2 * L)]
    if name == "clex":
        assert ts[0] == 1 and ts[-1] == 3
    if temperature:
        assert len(set(ids)) > 4  # the fed-back tokens vary


def test_one_layer_clex_generation_depends_on_t():
    """The test above can fail: a re-run at fixed t = 1 gives other logits once the context passes L."""
    model, prompt = model_for("clex", n_layers=1), tokens(PROMPT, B=1)[0]
    _, _, logits = cached(model, prompt, 2 * L)
    _, stale = reference(model, prompt, 2 * L, lambda m, seq: m(seq, t=1).detach())
    torch.testing.assert_close(logits[:L - PROMPT + 1], stale[:L - PROMPT + 1])  # context <= L: t = 1 anyway
    assert (logits[L - PROMPT + 1:] - stale[L - PROMPT + 1:]).abs().max() > 1e-3


def test_sampling():
    model, prompt = model_for("clex"), tokens(PROMPT, B=1)[0]
    draw = [generate(model, prompt, 12, temperature=1.5, generator=torch.Generator().manual_seed(s))[0]
            for s in (3, 3, 4)]
    assert draw[0] == draw[1] != draw[2]  # the seed decides
    assert generate(model, prompt, 12, temperature=0.7, top_k=1)[0] == generate(model, prompt, 12)[0]
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    top = set(logits.topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    picks = {pick(logits, 5.0, 3, g) for _ in range(200)}
    assert picks == top  # only the top 3, and at a high temperature all of them
    assert pick(logits) == int(logits.argmax())


def test_clex_generate_cli(trained_study, tmp_path):
    out = tmp_path / "gen.json"
    proc = run(trained_study, "clex", "generate", "base", "--max-new-tokens", "40", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["experiment"] == "base" and len(result["generated_ids"]) == 40
    assert result["t"] == [1] * 40  # plain RoPE: t is always 1
    assert proc.stdout.strip() == result["text"].strip() and result["text"]
    docs = np.load(trained_study / "build/data/test.npz")["tokens"]
    assert result["prompt_ids"] == docs[0, :32].tolist()  # default: the first L tokens of test document 0
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def main():\n    return")
    run(trained_study, "clex", "generate", "base", "--prompt-file", str(prompt), "--max-new-tokens", "3",
        "--temperature", "0.8", "--top-k", "5", "--sample-seed", "1", "--out", str(out))
    sampled = json.loads(out.read_text())
    assert sampled["prompt_text"] == "def main():\n    return" and sampled["sample_seed"] == 1


@pytest.mark.parametrize("args,words", [
    (["base", "--top-k", "3"], ["--top-k", "only with --temperature > 0"]),
    (["base", "--temperature", "-1"], ["--temperature", "-1"]),
    (["base", "--max-new-tokens", "0"], ["--max-new-tokens", "0", ">= 1"]),
    (["base", "--prompt-doc", "99"], ["--prompt-doc", "99", "0..2"]),
    (["base", "--prompt-tokens", "100000"], ["--prompt-tokens", "100000"]),
    (["clex"], ["--seed", "required"]),
    (["clex", "--seed", "7"], ["--seed", "7", "finetune.seeds"]),
    (["pi", "--seed", "0"], ["no checkpoint", "finetune@pi-0"]),
    (["nonexistent", "--seed", "0"], ["nonexistent"]),
])
def test_clex_generate_rejects_bad_arguments(trained_study, capsys, args, words):
    """Exit 2 and one message naming the flag, the value and what is allowed (in-process: fast)."""
    assert main(["--root", str(trained_study), "generate", *args]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, f"{w!r} missing from:\n{err}"
