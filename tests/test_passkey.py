"""Passkey retrieval: example layout, the fixed eval set, teacher-forced scoring and the training mix."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from torch import nn

from clex.data import TokenWindows, train_tokenizer
from clex.passkey import PasskeyFormat, PasskeyMix, build_example, eval_set, passkey_accuracy

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DIGITS = 5


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    """A real byte-level BPE (vocab 300) trained on a few hundred stdlib lines."""
    lines = [ln for name in ("textwrap.py", "bisect.py", "shlex.py") for ln in (STDLIB / name).read_text().splitlines()
             if ln.strip()][:600]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(lines, 300).save(str(path))
    return path


@pytest.fixture(scope="module")
def tok(tok_path) -> Tokenizer:
    return Tokenizer.from_file(str(tok_path))


@pytest.fixture(scope="module")
def fmt(tok_path) -> PasskeyFormat:
    return PasskeyFormat.from_tokenizer(tok_path, DIGITS)


@pytest.fixture(scope="module")
def stream(tok) -> np.ndarray:
    """A long token stream of real code (filler)."""
    text = "\n".join((STDLIB / n).read_text() for n in ("copy.py", "heapq.py", "fnmatch.py"))
    return np.asarray(tok.encode(text).ids, dtype=np.uint16)


def test_format(fmt, tok):
    assert fmt.digit_ids == tuple(tok.token_to_id(str(d)) for d in range(10))
    assert len(fmt.needle) == 3  # the key appears twice in the needle
    assert fmt.overhead == sum(map(len, fmt.needle)) + len(fmt.question) + 3 * DIGITS
    assert tok.decode(list(fmt.question)) == "\n# What is the pass key? The pass key is "


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, 0.37])
def test_build_example(fmt, tok, stream, depth):
    length, key = 200, [4, 0, 2, 1, 3]
    tokens, pos = build_example(fmt, stream, length, depth, key)
    assert tokens.shape == (length,) and tokens.dtype == np.int64
    m = length - fmt.overhead
    p = round(depth * m)
    needle = fmt.needle_ids(key)
    assert tokens[p:p + len(needle)].tolist() == needle  # the needle starts at round(depth * m)
    assert tokens[:p].tolist() == stream[:p].tolist()
    assert tokens[p + len(needle):p + len(needle) + m - p].tolist() == stream[p:m].tolist()
    assert pos.tolist() == list(range(length - DIGITS, length))
    assert tokens[pos].tolist() == [fmt.digit_ids[d] for d in key]
    text = tok.decode(tokens.tolist())
    assert "\n# The pass key is 40213. Remember it. 40213 is the pass key.\n" in text
    assert text.endswith("\n# What is the pass key? The pass key is 40213")


def test_bad_args(fmt, stream, tok_path):
    with pytest.raises(ValueError, match="length"):
        build_example(fmt, stream, fmt.overhead, 0.5, [1] * DIGITS)
    with pytest.raises(ValueError, match="filler"):
        build_example(fmt, stream[:10], fmt.overhead + 20, 0.5, [1] * DIGITS)
    for depth in (-0.1, 1.5):
        with pytest.raises(ValueError, match="depth"):
            build_example(fmt, stream, 200, depth, [1] * DIGITS)
    for key in ([1] * (DIGITS - 1), [1, 2, 3, 4, 10], [-1, 0, 0, 0, 0]):
        with pytest.raises(ValueError, match="key"):
            build_example(fmt, stream, 200, 0.5, key)
    with pytest.raises(ValueError):
        PasskeyFormat.from_tokenizer(tok_path, 0)
    with pytest.raises(ValueError, match="docs"):
        eval_set(fmt, stream[:100].reshape(2, 50), 200, [0.5], 2, seed=0)
    with pytest.raises(ValueError):
        eval_set(fmt, stream[:1000].reshape(2, 500), fmt.overhead, [0.5], 2, seed=0)
    windows = TokenWindows(stream, 256, 10, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        PasskeyMix(windows, fmt, 1.5, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        PasskeyMix(TokenWindows(stream, fmt.overhead + 7, 10, seed=0), fmt, 0.3, seed=0)


def docs_of(stream: np.ndarray, n: int = 3, doc_len: int = 400) -> np.ndarray:
    return stream[: n * doc_len].reshape(n, doc_len)


def test_eval_set(fmt, stream):
    docs, depths, samples, length = docs_of(stream), [0.0, 0.5, 1.0], 4, 256
    tokens, pos, depth_idx = eval_set(fmt, docs, length, depths, samples, seed=7)
    assert tokens.shape == (len(depths) * samples, length) and tokens.dtype == torch.long
    assert pos.shape == (len(depths) * samples, DIGITS) and pos.dtype == torch.long
    assert depth_idx.tolist() == [j for j in range(len(depths)) for _ in range(samples)]
    again = eval_set(fmt, docs, length, depths, samples, seed=7)
    assert all(torch.equal(a, b) for a, b in zip((tokens, pos, depth_idx), again))
    answers = tokens.gather(1, pos).view(len(depths), samples, DIGITS)
    assert (answers == answers[0]).all()  # the same key at every depth
    assert len({tuple(a.tolist()) for a in answers[0]}) > 1  # different keys across samples
    # the same filler at every depth: the example at depth 1 starts with the filler used at depth 0
    m = length - fmt.overhead
    for k in range(samples):
        filler = tokens[2 * samples + k, :m]
        assert torch.equal(tokens[k, len(fmt.needle_ids([0] * DIGITS)):][:m], filler)
        doc = torch.from_numpy(docs[k % len(docs)].astype(np.int64))
        assert any(torch.equal(doc[s:s + m], filler) for s in range(docs.shape[1] - m + 1))
    other = eval_set(fmt, docs, length, depths, samples, seed=8)[0]
    assert not torch.equal(other, tokens)


class NextTokenModel(nn.Module):
    """Logits with the largest value on the true next token; from position `wrong_from` on, digits are
    predicted as the next digit mod 10 instead (always wrong)."""

    def __init__(self, vocab: int, digit_ids: tuple[int, ...], wrong_from: int | None = None):
        super().__init__()
        self.vocab, self.wrong_from = vocab, wrong_from
        self.register_buffer("remap", torch.arange(vocab))
        for d in range(10):
            self.remap[digit_ids[d]] = digit_ids[(d + 1) % 10]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        nxt = torch.roll(tokens, -1, dims=1)
        if self.wrong_from is not None:
            nxt[:, self.wrong_from:] = self.remap[nxt[:, self.wrong_from:]]
        return torch.nn.functional.one_hot(nxt, self.vocab).float()


def test_passkey_accuracy(fmt, stream, tok):
    depths, length, vocab = [0.0, 0.5, 1.0], 256, tok.get_vocab_size()
    tokens, pos, depth_idx = eval_set(fmt, docs_of(stream), length, depths, 5, seed=0)
    oracle = passkey_accuracy(NextTokenModel(vocab, fmt.digit_ids), tokens, pos, depth_idx, depths, batch_size=4)
    assert oracle["digit_acc"] == 1.0 and oracle["exact"] == 1.0
    assert set(oracle["by_depth"]) == {"0.0", "0.5", "1.0"}
    assert all(v == {"digit_acc": 1.0, "exact": 1.0} for v in oracle["by_depth"].values())
    wrong = passkey_accuracy(NextTokenModel(vocab, fmt.digit_ids, wrong_from=0), tokens, pos, depth_idx, depths, 4)
    assert wrong["digit_acc"] == 0.0 and wrong["exact"] == 0.0
    first = NextTokenModel(vocab, fmt.digit_ids, wrong_from=length - DIGITS)  # right only before the first digit
    first_only = passkey_accuracy(first, tokens, pos, depth_idx, depths, batch_size=7)
    assert first_only["digit_acc"] == pytest.approx(1 / DIGITS) and first_only["exact"] == 0.0
    assert all(v["digit_acc"] == pytest.approx(1 / DIGITS) for v in first_only["by_depth"].values())
    # `logits_at` is how the protocol runs the model (e.g. chunked through a KV cache): it decides the logits
    wrong_model, asked = NextTokenModel(vocab, fmt.digit_ids, wrong_from=0), []

    def logits_at(x, rows):
        asked.append(rows)
        return wrong_model(x)[torch.arange(len(x))[:, None], rows]

    via_protocol = passkey_accuracy(NextTokenModel(vocab, fmt.digit_ids), tokens, pos, depth_idx, depths, 4, logits_at)
    assert via_protocol["digit_acc"] == 0.0
    assert torch.equal(torch.cat(asked), pos - 1)  # only the rows that predict the answer digits


def test_passkey_mix(fmt, stream):
    seq_len, n = 255, 2000
    windows = TokenWindows(stream, seq_len, n, seed=3)
    plain = PasskeyMix(windows, fmt, 0.0, seed=1)
    assert len(plain) == n and all(torch.equal(plain[i], windows[i]) for i in range(50))

    mix, again = PasskeyMix(windows, fmt, 0.3, seed=1), PasskeyMix(windows, fmt, 0.3, seed=1)
    question = list(fmt.question)
    q_at, m = seq_len + 1 - DIGITS - len(question), seq_len + 1 - fmt.overhead
    hits = 0
    for i in range(n):
        item, base = mix[i], windows[i]
        assert item.shape == (seq_len + 1,) and item.dtype == torch.long
        assert torch.equal(item, again[i])
        assert mix.is_passkey(i) == (np.random.default_rng([1, i, 0]).random() < 0.3)
        if mix.is_passkey(i):
            hits += 1
            assert item[q_at:q_at + len(question)].tolist() == question
            # depth and key from default_rng([seed, i, 1]); the filler is the window's own tokens
            rng = np.random.default_rng([1, i, 1])
            depth, key = rng.random(), rng.integers(0, 10, DIGITS).tolist()
            p, needle = round(depth * m), fmt.needle_ids(key)
            assert item[-DIGITS:].tolist() == [fmt.digit_ids[d] for d in key]
            assert item[p:p + len(needle)].tolist() == needle
            assert torch.equal(torch.cat([item[:p], item[p + len(needle):q_at]]), base[:m])
        else:
            assert torch.equal(item, base)
    sd = (n * 0.3 * 0.7) ** 0.5
    assert abs(hits - 0.3 * n) < 4 * sd

