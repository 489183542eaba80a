"""The prepare stage: real text → document split → byte-level BPE (or a checkpoint's tokenizer) → token arrays,
plus a manifest.

Documents come through `datasets` (one document per file for the embedded stdlib corpus and for
local files; one row per document for a Hugging Face dataset). The split is by document, from a
hash of (split_seed, document id), so it does not depend on file-system order or on which other
documents exist. The tokenizer is trained on the train split only. Everything is written into a
temporary sibling folder and moved into place at the end (`clex.io.atomic_dir`), so a failure leaves no
half-written data. The readers at the end (token streams, test documents, fixed windows) import torch but not
Lightning, so evaluation can use them cheaply; training's LightningDataModule is in clex/train.py.

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
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from clex.config import DataConfig, ModelConfig, ParamsError
from clex.io import atomic_dir
from clex.tracking import file_sha256, folder_sha256

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


def checkpoint_tokenizer(model: ModelConfig, root: Path | str) -> tuple[object, int, Path]:
    """(the fast tokenizer's `tokenizers` backend, its EOS id, the checkpoint folder) of a Hugging Face model
    (`model.source: hf`), as `AutoTokenizer.from_pretrained(model.path)` loads it."""
    from transformers import AutoTokenizer

    from clex.hf import checkpoint_dir

    folder = checkpoint_dir(model, root)
    tok = AutoTokenizer.from_pretrained(str(folder))
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or tok.eos_token_id is None:
        raise ParamsError(f"model.path: {model.path!r}: its tokenizer ({type(tok).__name__}) has "
                          f"{'no fast (tokenizers) backend' if backend is None else 'no EOS token'}; allowed: a checkpoint "
                          "with a fast tokenizer that defines eos_token (it separates the documents)")
    return backend, int(tok.eos_token_id), folder


def token_dtype(vocab_size: int) -> type:
    """uint16 token arrays up to a vocabulary of 65,535 tokens, uint32 above (e.g. LLaMA-3's 128k)."""
    return np.uint16 if vocab_size <= 65535 else np.uint32


def _encode(tok, texts: list[str], dtype: type = np.uint16) -> list[np.ndarray]:
    """Token ids of each text, no special tokens added (a checkpoint's tokenizer would add BOS: documents are
    separated by EOS instead; our BPE adds none either way)."""
    return [np.asarray(e.ids, dtype=dtype) for e in tok.encode_batch(texts, add_special_tokens=False)]


# ------------------------------------------------------------------------------------ the stage
def prepare(cfg: DataConfig, out_dir: Path, *, test_len: int, root: Path | str = ".",
            model: ModelConfig | None = None) -> dict:
    """Write train.bin, val.bin (token streams, documents joined by EOS), test.npz (test documents with at least
    `test_len` tokens, cut to test_len), tokenizer.json and manifest.json into out_dir; a relative corpus glob is
    read from the study `root` (`load_documents`).

    The tokenizer is a byte-level BPE trained on the train split (uint16 tokens), or with `model.source: hf` the
    checkpoint's own (data.vocab_size ignored; uint32 tokens above 65,535 ids, manifest `token_dtype`), whose fast
    backend is saved as tokenizer.json; the manifest then records the checkpoint folder's hash (`model_sha256`),
    so that every stage downstream of build/data reruns when the checkpoint changes."""
    out_dir = Path(out_dir)
    ids, texts, where = load_documents(cfg, root)
    split = split_documents(ids, cfg)
    checkpoint = {}
    if model is not None and model.source == "hf":
        tok, eos, folder = checkpoint_tokenizer(model, root)
        checkpoint = {"tokenizer": "checkpoint", "model_path": model.path, "model_sha256": folder_sha256(folder)}
    else:
        tok = train_tokenizer([texts[i] for i in split["train"]], cfg.vocab_size)
        eos = tok.token_to_id(EOS)
    dtype = token_dtype(tok.get_vocab_size())
    if checkpoint:
        checkpoint["token_dtype"] = np.dtype(dtype).name

    with atomic_dir(out_dir) as tmp:
        counts = {}
        for name in ("train", "val"):
            parts = _encode(tok, [texts[i] for i in split[name]], dtype)
            stream = np.concatenate([np.append(p, np.array([eos], dtype=dtype)) for p in parts])
            stream.tofile(tmp / f"{name}.bin")
            counts[f"{name}_documents"], counts[f"{name}_tokens"] = len(parts), int(stream.size)
        test_parts = _encode(tok, [texts[i] for i in split["test"]], dtype)
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
            **checkpoint,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ------------------------------------------------------------------------------------ readers
def load_tokens(data_dir: Path, split: str) -> np.ndarray:
    """The token stream of 'train' or 'val' (memory-mapped), in the manifest's `token_dtype` (absent: uint16)."""
    dtype = json.loads((Path(data_dir) / "manifest.json").read_text()).get("token_dtype", "uint16")
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.dtype(dtype), mode="r")


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
