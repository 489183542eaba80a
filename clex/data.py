"""The prepare stage: real text → document split → byte-level BPE → token arrays, plus a manifest.

Documents come through `datasets` (one document per file for the embedded stdlib corpus and for
local files; one row per document for a Hugging Face dataset). The split is by document, from a
hash of (split_seed, document id), so it does not depend on file-system order or on which other
documents exist. The tokenizer is trained on the train split only. Everything is written into a
temporary sibling folder and moved into place at the end, so a failure leaves no half-written data.

A local corpus (`data.source: files`) keeps only UTF-8 text files: a file with a NUL byte or bytes that are
not UTF-8 (binary, or text in another encoding) is skipped with a warning naming it and listed in the
manifest (`skipped_files`), since it would otherwise become a garbled document. A corpus too small for the
study (under 3 documents, no test document of the longest eval length, a train or validation split shorter
than one such window) stops the stage with a ParamsError naming the data key: exit 2, nothing written.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clex.config import DataConfig, ParamsError
from clex.tracking import file_sha256

EOS = "<|endoftext|>"
SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------ documents
def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library *.py sources (no third-party packages, no caches)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if p.is_file() and not skip.intersection(p.relative_to(root).parts))


def _load_text_files(paths: list[Path], root: Path | None) -> tuple[list[str], list[str]]:
    """One document per file, read by the `datasets` text builder; ids are paths relative to root."""
    import datasets

    ds = datasets.load_dataset(
        "text", data_files=[str(p) for p in paths], sample_by="document", split="train", encoding_errors="replace",
    )
    if len(ds) != len(paths):
        raise RuntimeError(f"datasets read {len(ds)} documents from {len(paths)} files")
    ids = [str(p.relative_to(root)) if root else str(p) for p in paths]
    return ids, ds["text"]


def _load_hf(cfg: DataConfig, root: Path | str) -> tuple[list[str], list[str]]:
    """A Hugging Face dataset by name (needs a network) or by local path (relative to the study root); one row
    per document."""
    import datasets

    local = Path(root) / cfg.hf_name
    ds = datasets.load_dataset(str(local) if local.exists() else cfg.hf_name, cfg.hf_config, split=cfg.hf_split)
    if cfg.text_field not in ds.column_names:
        raise ValueError(
            f"data.text_field: got {cfg.text_field!r}; allowed: a column of {cfg.hf_name!r}: {ds.column_names}"
        )
    return [f"{cfg.hf_split}:{i}" for i in range(len(ds))], ds[cfg.text_field]


def _is_text(path: Path) -> bool:
    """UTF-8 text: no NUL byte (the mark of a binary file) and every byte sequence valid UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in data


def corpus_name(cfg: DataConfig) -> str:
    """The params key and value that name the corpus, for messages: "data.files: 'corpus/*.txt'"."""
    if cfg.source == "files":
        return f"data.files: {cfg.files!r}"
    return f"data.hf_name: {cfg.hf_name!r}" if cfg.source == "hf" else "data.source: 'stdlib'"


def load_documents(cfg: DataConfig, root: Path | str = ".") -> tuple[list[str], list[str], dict]:
    """(ids, texts, provenance) for the configured source; empty documents are dropped, and so are local files
    that are not UTF-8 text (with a warning naming them; provenance `skipped_files`). A relative `data.files`
    glob is read from the study `root` (not the current directory), and its documents' ids are paths relative
    to the root, so the split does not depend on where the study folder lies or where the command runs."""
    if cfg.source == "stdlib":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        ids, texts = _load_text_files(stdlib_files(), stdlib)
        where = {"stdlib": str(stdlib), "python_version": sys.version.split()[0]}
    elif cfg.source == "files":
        paths = sorted(Path(p) for p in glob.glob(cfg.corpus_glob(root), recursive=True) if Path(p).is_file())
        skipped = [str(p) for p in paths if not _is_text(p)]
        if skipped:
            warnings.warn(f"{corpus_name(cfg)}: skipped {len(skipped)} of {len(paths)} files that are not UTF-8 text "
                          f"(binary, or another encoding): {', '.join(skipped[:10])}" + (" ..." if len(skipped) > 10 else ""),
                          stacklevel=2)
            paths = [p for p in paths if str(p) not in skipped]
        relative_to = None if Path(cfg.files).is_absolute() else Path(root)
        ids, texts = _load_text_files(paths, relative_to) if paths else ([], [])
        where = {"files": cfg.files, **({"skipped_files": skipped} if skipped else {})}
    else:
        ids, texts = _load_hf(cfg, root)
        where = {"hf_name": cfg.hf_name, "hf_config": cfg.hf_config, "hf_split": cfg.hf_split}
    keep = [i for i, t in enumerate(texts) if t and t.strip()]
    return [ids[i] for i in keep], [texts[i] for i in keep], where


def _rank_key(seed: int, doc_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{doc_id}".encode()).hexdigest()


def split_documents(ids: list[str], cfg: DataConfig) -> dict[str, list[int]]:
    """Indices per split: documents ordered by hash(seed, id); the first go to test, then val, then train.

    `max_documents` keeps the first documents in that same order, so a subset is deterministic too.
    Each split gets at least one document.
    """
    order = sorted(range(len(ids)), key=lambda i: _rank_key(cfg.split_seed, ids[i]))
    if cfg.max_documents:
        order = order[: cfg.max_documents]
    n = len(order)
    if n < 3:
        raise ParamsError(f"{corpus_name(cfg)}: the corpus has {n} non-empty documents; allowed: a corpus of at least "
                          "3 (train, val, test)")
    n_test = max(1, math.ceil(cfg.test_fraction * n))
    n_val = max(1, math.ceil(cfg.val_fraction * n))
    if n_test + n_val >= n:
        raise ParamsError(f"{corpus_name(cfg)}: {n} documents leave none for training with data.test_fraction "
                          f"{cfg.test_fraction} and data.val_fraction {cfg.val_fraction}; allowed: more documents or "
                          "smaller fractions")
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


# ------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) with `<|endoftext|>` as the document separator."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _encode(tok, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(texts)]


# ------------------------------------------------------------------------------------ the stage
def prepare(cfg: DataConfig, out_dir: Path, *, test_len: int, root: Path | str = ".") -> dict:
    """Write train.bin, val.bin (uint16 token streams, documents joined by EOS), test.npz (test documents
    with at least `test_len` tokens, cut to test_len), tokenizer.json and manifest.json into out_dir; a
    relative corpus glob is read from the study `root` (`load_documents`)."""
    out_dir = Path(out_dir)
    ids, texts, where = load_documents(cfg, root)
    split = split_documents(ids, cfg)
    tok = train_tokenizer([texts[i] for i in split["train"]], cfg.vocab_size)
    eos = tok.token_to_id(EOS)

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = {}
        for name in ("train", "val"):
            parts = _encode(tok, [texts[i] for i in split[name]])
            stream = np.concatenate([np.append(p, np.uint16(eos)) for p in parts])
            stream.tofile(tmp / f"{name}.bin")
            counts[f"{name}_documents"], counts[f"{name}_tokens"] = len(parts), int(stream.size)
        test_parts = _encode(tok, [texts[i] for i in split["test"]])
        long = [(ids[i], p) for i, p in zip(split["test"], test_parts) if p.size >= test_len][: cfg.max_test_docs]
        if not long:
            longest = max(p.size for p in test_parts)
            raise ParamsError(
                f"{corpus_name(cfg)}: no test document has {test_len} tokens (the longest eval length); the longest has "
                f"{longest}. Allowed: a corpus with longer documents, a larger data.test_fraction or data.max_documents, "
                "or shorter eval.lengths"
            )
        for name in ("train", "val"):  # the validation windows (and any training) need one window of test_len + 1
            if counts[f"{name}_tokens"] <= test_len + 1:
                raise ParamsError(f"{corpus_name(cfg)}: the {name} split has {counts[f'{name}_tokens']} tokens; a "
                                  f"window of the longest eval length needs more than {test_len + 1}; allowed: a larger "
                                  f"corpus{', a larger data.val_fraction' if name == 'val' else ''} or shorter eval.lengths")
        test_ids = [d for d, _ in long]
        np.savez(tmp / "test.npz", tokens=np.stack([p[:test_len] for _, p in long]), ids=np.array(test_ids))
        counts.update(test_documents=len(test_parts), test_documents_used=len(long), test_len=test_len)
        tok.save(str(tmp / "tokenizer.json"))

        files = {f: file_sha256(tmp / f) for f in ("train.bin", "val.bin", "test.npz", "tokenizer.json")}
        corpus = hashlib.sha256()
        for i in sorted(range(len(ids)), key=lambda i: ids[i]):
            corpus.update(f"{ids[i]}\0{hashlib.sha256(texts[i].encode()).hexdigest()}\n".encode())
        manifest = {
            "data_hash": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
            "source": cfg.source, **where, "python_version": sys.version.split()[0],
            "params": cfg.model_dump(), "vocab_size": tok.get_vocab_size(), "eos_id": eos,
            "counts": counts, "file_sha256": files, "corpus_sha256": corpus.hexdigest(),
            "split": {name: sorted(ids[i] for i in split[name]) for name in SPLITS}, "test_ids": test_ids,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return manifest


# ------------------------------------------------------------------------------------ readers
def load_tokens(data_dir: Path, split: str) -> np.ndarray:
    """The uint16 token stream of 'train' or 'val' (memory-mapped)."""
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.uint16, mode="r")


def load_test_docs(data_dir: Path) -> tuple[np.ndarray, list[str]]:
    """(tokens of shape (n_docs, test_len), document ids)."""
    with np.load(Path(data_dir) / "test.npz") as z:
        return z["tokens"], [str(i) for i in z["ids"]]


def data_hash(data_dir: Path) -> str:
    """The content hash of the prepared data (over its output files), as recorded in the manifest."""
    return json.loads((Path(data_dir) / "manifest.json").read_text())["data_hash"]


class TokenWindows(Dataset):
    """`num_samples` random windows of seq_len + 1 tokens; window i's offset depends only on (seed, i),
    so every rank, worker and resumed run sees the same data."""

    def __init__(self, tokens: np.ndarray, seq_len: int, num_samples: int, seed: int):
        if tokens.size <= seq_len + 1:
            raise ValueError(f"{tokens.size} tokens cannot hold a window of {seq_len + 1}")
        self.tokens, self.seq_len, self.num_samples, self.seed = tokens, seq_len, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def offset(self, i: int) -> int:
        return int(np.random.default_rng([self.seed, i]).integers(0, self.tokens.size - self.seq_len))

    def __getitem__(self, i: int) -> torch.Tensor:
        o = self.offset(i)
        return torch.from_numpy(self.tokens[o:o + self.seq_len + 1].astype(np.int64))


class FixedWindows(TokenWindows):
    """`num_samples` evenly spaced windows: the same validation set for every run."""

    def __init__(self, tokens: np.ndarray, seq_len: int, num_samples: int):
        super().__init__(tokens, seq_len, num_samples, seed=0)
        self.offsets = np.linspace(0, tokens.size - seq_len - 1, num_samples).astype(np.int64)

    def offset(self, i: int) -> int:
        return int(self.offsets[i])


class Resumed(Dataset):
    """`dataset` from item `start` on (item i is dataset[start + i], wrapping at the end), with the same length:
    a resumed run's loader yields exactly the items an uninterrupted one would yield from that point, while
    Lightning's restored batch counters (which continue from the checkpoint) still match its length."""

    def __init__(self, dataset: Dataset, start: int):
        self.dataset, self.start = dataset, start

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset[(self.start + i) % len(self.dataset)]


class TokenDataModule(L.LightningDataModule):
    """Training windows (random, seeded; optionally mixed with passkey examples) and validation windows
    (fixed, never mixed) from the prepared token streams.

    Training resumes where it stopped: a trainer restored from a checkpoint has taken `global_step` updates of
    `accumulate_grad_batches` micro-batches on every rank, i.e. consumed the first `consumed_samples()` windows
    (checkpoints are taken at update boundaries, clex.train.StepCheckpoint), so its loader starts after them
    (`Resumed`); under DDP each rank's share of the rest is then the one it would have had.
    """

    def __init__(self, data_dir: Path, seq_len: int, batch_size: int, train_samples: int, val_windows: int,
                 seed: int, num_workers: int = 0, passkey: tuple | None = None, val_lengths: list[int] | None = None,
                 val_batch_size: int | None = None):
        super().__init__()
        self.passkey = passkey  # (PasskeyFormat, fraction): that share of training windows become passkey examples
        # validation at other lengths than seq_len (the sweep's objective): one loader per length
        self.val_lengths, self.val_batch_size = val_lengths, val_batch_size or batch_size
        self.data_dir, self.seq_len, self.batch_size = Path(data_dir), seq_len, batch_size
        self.train_samples, self.val_windows, self.seed, self.num_workers = train_samples, val_windows, seed, num_workers

    def _loader(self, ds: Dataset, batch_size: int | None = None) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size or self.batch_size, shuffle=False, drop_last=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def consumed_samples(self) -> int:
        """Training windows the attached trainer's restored updates consumed (0 before the first update)."""
        t = self.trainer
        return 0 if t is None else t.global_step * t.accumulate_grad_batches * self.batch_size * t.world_size

    def train_dataloader(self) -> DataLoader:
        windows = TokenWindows(load_tokens(self.data_dir, "train"), self.seq_len, self.train_samples, self.seed)
        if self.passkey is not None:
            from clex.passkey import PasskeyMix

            windows = PasskeyMix(windows, *self.passkey, seed=self.seed)
        start = self.consumed_samples()
        return self._loader(Resumed(windows, start) if start else windows)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        tokens = load_tokens(self.data_dir, "val")
        if self.val_lengths is None:
            return self._loader(FixedWindows(tokens, self.seq_len, self.val_windows))
        return [self._loader(FixedWindows(tokens, n, self.val_windows), self.val_batch_size) for n in self.val_lengths]
