"""Passkey retrieval (Mohtashami & Jaggi 2023, the long-context probe used by the CLEX paper), sized for a tiny model.

A random key of `digits` decimal digits is hidden at a chosen depth inside filler text, and the example ends with a
question whose answer is the key:

    filler[:p]  "\\n# The pass key is 40213. Remember it. 40213 is the pass key.\\n"  filler[p:m]
    "\\n# What is the pass key? The pass key is 40213"

The filler is real text from the code corpus (a test document, or the training window itself), and the needle and
question are written as Python comments so they fit that corpus. Each key digit is one token (the byte-level id of the
character '0'..'9'), so the key can only be recovered by attending back to the needle, wherever it lies. Scoring is
teacher-forced: at each answer digit the model's argmax over the vocabulary must be that digit. Per-digit accuracy is
reported along with exact-key accuracy, since a tiny model rarely gets the whole key right.

`eval_set` fixes the keys and filler from (seed, length, sample), so every depth and every model sees the same
examples and comparisons are paired. `PasskeyMix` swaps a seeded share of the training windows for passkey examples,
so a model learns the task's format during fine-tuning. Its choices depend only on (seed, item index), so every rank,
worker and resumed run sees the same data.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from clex import layout
from clex.config import (KEY, PASSKEY_NEEDLE as NEEDLE, PASSKEY_QUESTION as QUESTION, ParamsError, Study,
                         check_passkey_template)

MIN_FILLER = 8  # an example needs more than this many filler tokens besides the needle, question and answer


@dataclass(frozen=True)
class PasskeyFormat:
    """Token ids of the fixed text: `needle` holds the pieces around each occurrence of the key in the needle,
    `question` holds the text before the answer, and `digit_ids[d]` is the id of the character str(d)."""

    digits: int
    digit_ids: tuple[int, ...]
    needle: tuple[tuple[int, ...], ...]
    question: tuple[int, ...]
    overhead: int = field(init=False)  # tokens that are not filler: needle, question and answer, keys included

    def __post_init__(self):
        if self.digits < 1 or len(self.digit_ids) != 10 or len(self.needle) < 2:
            raise ValueError(f"bad passkey format: digits={self.digits}, {len(self.digit_ids)} digit ids, "
                             f"{len(self.needle)} needle pieces (need digits >= 1, 10 ids, >= 2 pieces)")
        keys = len(self.needle)  # occurrences of the key: len(needle) - 1 in the needle, plus the answer
        object.__setattr__(self, "overhead", sum(map(len, self.needle)) + len(self.question) + keys * self.digits)

    @classmethod
    def from_tokenizer(cls, path: str | Path, digits: int, needle: str = NEEDLE, question: str = QUESTION):
        """Encode the needle and question templates with the tokenizer saved at `path` (tokenizer.json)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        digit_ids = tuple(tok.token_to_id(str(d)) for d in range(10))
        assert None not in digit_ids, "the tokenizer has no single-character token for some digit"
        check_passkey_template(needle, question)

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tok.encode(text, add_special_tokens=False).ids) if text else ()  # no BOS: as prepare encodes

        return cls(digits, digit_ids, tuple(ids(t) for t in needle.split(KEY)), ids(question[: -len(KEY)]))

    def fits(self, length: int) -> bool:
        """Whether an example of `length` tokens leaves more than MIN_FILLER tokens of filler."""
        return length - self.overhead > MIN_FILLER

    def key_ids(self, key: Sequence[int]) -> list[int]:
        key = [int(d) for d in key]
        if len(key) != self.digits or not all(0 <= d <= 9 for d in key):
            raise ValueError(f"key: got {key}; allowed: {self.digits} digits in 0..9")
        return [self.digit_ids[d] for d in key]

    def needle_ids(self, key: Sequence[int]) -> list[int]:
        k = self.key_ids(key)
        out = list(self.needle[0])
        for piece in self.needle[1:]:
            out += k + list(piece)
        return out


def passkey_format(study: Study, length: int, what: str) -> PasskeyFormat:
    """The passkey format on the prepared tokenizer, checked to fit `length` tokens before any compute."""
    pk = study.params.passkey
    fmt = PasskeyFormat.from_tokenizer(layout.data_dir(study.root) / "tokenizer.json", pk.digits, pk.needle, pk.question)
    if not fmt.fits(length):
        raise ParamsError(
            f"passkey.digits: {pk.digits} makes a passkey example {fmt.overhead} tokens plus more than "
            f"{MIN_FILLER} of filler, more than the {length} tokens of {what}; allowed: fewer digits or a "
            f"longer {what}"
        )
    return fmt


def build_example(fmt: PasskeyFormat, filler: np.ndarray, length: int, depth: float,
                  key: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """`length` int64 tokens: filler[:p] + needle + filler[p:m] + question + key, with m = length - overhead
    and p = round(depth * m); and the positions of the answer digits (the last `digits` tokens)."""
    m = length - fmt.overhead
    if m <= 0:
        raise ValueError(f"length: got {length}; allowed: more than the {fmt.overhead} passkey tokens")
    if len(filler) < m:
        raise ValueError(f"filler: got {len(filler)} tokens; {m} are needed for length {length}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: got {depth}; allowed: 0..1")
    p = int(round(depth * m))
    filler = np.asarray(filler[:m], dtype=np.int64)
    tokens = np.concatenate([filler[:p], fmt.needle_ids(key), filler[p:], fmt.question, fmt.key_ids(key)])
    assert tokens.size == length
    return tokens.astype(np.int64), np.arange(length - fmt.digits, length, dtype=np.int64)


def eval_set(fmt: PasskeyFormat, docs: np.ndarray, length: int, depths: list[float], samples: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (len(depths)*samples, length), answer positions (same rows, digits), depth index per row).

    Rows are depth-major. Sample k uses document k mod n_docs from an offset and a key drawn from
    default_rng([seed, length, k]), so all depths (and all models) share the key and the filler.
    """
    n_docs, doc_len = docs.shape
    need = length - fmt.overhead
    if need <= 0 or samples < 1 or not depths:
        raise ValueError(f"length {length} (overhead {fmt.overhead}), samples {samples}, depths {depths}: "
                         "allowed: length > overhead, samples >= 1, at least one depth")
    if n_docs == 0 or doc_len < need:
        raise ValueError(f"docs: got shape {docs.shape}; need at least one document of {need} tokens for length {length}")
    picks = []  # (filler, key) of sample k
    for k in range(samples):
        rng = np.random.default_rng([seed, length, k])
        key = rng.integers(0, 10, fmt.digits)
        start = int(rng.integers(0, doc_len - need + 1))
        picks.append((docs[k % n_docs, start:start + need], key))
    built = [build_example(fmt, filler, length, depth, key) for depth in depths for filler, key in picks]
    tokens = torch.from_numpy(np.stack([t for t, _ in built]))
    answers = torch.from_numpy(np.stack([a for _, a in built]))
    depth_idx = torch.arange(len(depths)).repeat_interleave(samples)
    return tokens, answers, depth_idx


def passkey_accuracy(model: torch.nn.Module, tokens: torch.Tensor, answer_pos: torch.Tensor, depth_idx: torch.Tensor,
                     depths: list[float], batch_size: int, logits_at: Callable | None = None) -> dict:
    """Teacher-forced accuracy: the argmax at answer_pos - 1 must be the token at answer_pos.

    `logits_at` ((B, T) tokens, (B, k) rows -> logits (B, k, V) at those rows; default: one forward of `model`) is
    how the evaluation protocol runs the model, e.g. in chunks through a KV cache, keeping only the rows asked for
    (`clex.evaluate.rows_of`).

    {"digit_acc": mean over all digits, "exact": share of examples with every digit right,
     "by_depth": {str(depth): {"digit_acc", "exact"}}}.
    """
    device = next(iter(model.parameters()), torch.empty(0)).device
    logits_at = logits_at or (lambda x, rows: model(x)[torch.arange(len(x), device=x.device)[:, None], rows])
    was_training = model.training
    model.eval()
    correct = []
    try:
        with torch.inference_mode():
            for i in range(0, len(tokens), batch_size):
                batch, pos = tokens[i:i + batch_size].to(device), answer_pos[i:i + batch_size].to(device)
                pred = logits_at(batch, pos - 1).argmax(-1)
                correct.append((pred == batch.gather(1, pos)).cpu())
    finally:
        model.train(was_training)
    correct = torch.cat(correct)

    def score(c: torch.Tensor) -> dict:
        return {"digit_acc": c.float().mean().item(), "exact": c.all(1).float().mean().item()}

    return {**score(correct), "by_depth": {str(d): score(correct[depth_idx == j]) for j, d in enumerate(depths)}}


class PasskeyMix(Dataset):
    """Training windows (`dataset[i]`: seq_len + 1 tokens) with a seeded share replaced by passkey examples.

    Item i is a passkey item when default_rng([seed, i, 0]).random() < fraction; its depth (uniform in [0, 1])
    and key come from default_rng([seed, i, 1]) and its filler is the window's own tokens.
    """

    def __init__(self, dataset: Dataset, fmt: PasskeyFormat, fraction: float, seed: int):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction: got {fraction}; allowed: 0..1")
        seq_len = getattr(dataset, "seq_len", None)
        window = seq_len + 1 if seq_len is not None else len(dataset[0])
        if fraction > 0 and not fmt.fits(window):
            raise ValueError(f"windows of {window} tokens leave at most {MIN_FILLER} filler tokens around the "
                             f"{fmt.overhead} passkey tokens; allowed: a longer seq_len or fraction 0")
        self.dataset, self.fmt, self.fraction, self.seed = dataset, fmt, fraction, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def is_passkey(self, i: int) -> bool:
        return self.fraction > 0 and np.random.default_rng([self.seed, int(i), 0]).random() < self.fraction

    def __getitem__(self, i: int) -> torch.Tensor:
        window = self.dataset[i]
        if not self.is_passkey(i):
            return window
        rng = np.random.default_rng([self.seed, int(i), 1])
        depth, key = float(rng.random()), rng.integers(0, 10, self.fmt.digits)
        tokens, _ = build_example(self.fmt, window.numpy(), len(window), depth, key)
        return torch.from_numpy(tokens)
