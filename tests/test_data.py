"""The prepare stage on real local text (stdlib sources copied into files, a local dataset folder)."""
from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from clex.config import DataConfig
from clex.data import (
    EOS, FixedWindows, TokenWindows, data_hash, load_documents, load_test_docs, load_tokens, prepare, split_documents,
    stdlib_files,
)
from clex.train import TokenDataModule

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = ["textwrap.py", "bisect.py", "shlex.py", "fnmatch.py", "glob.py", "copy.py", "heapq.py", "keyword.py",
           "colorsys.py", "opcode.py", "numbers.py", "struct.py"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Twelve real documents as local text files (copies of stdlib modules)."""
    d = tmp_path_factory.mktemp("corpus")
    for name in SOURCES:
        shutil.copy(STDLIB / name, d / f"{Path(name).stem}.txt")
    return d


def files_cfg(corpus: Path, **kw) -> DataConfig:
    return DataConfig(source="files", files=str(corpus / "*.txt"), vocab_size=400,
                      val_fraction=0.2, test_fraction=0.25, **kw)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "data"
    return out, prepare(files_cfg(corpus), out, test_len=64)


def test_stdlib_file_list():
    files = stdlib_files()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert STDLIB / "textwrap.py" in files and files == sorted(files)
    assert not any({"site-packages", "dist-packages", "__pycache__"} & set(f.parts) for f in files)


def test_documents_are_whole_files_in_order(corpus):
    ids, texts, where = load_documents(files_cfg(corpus))
    assert ids == sorted(str(p) for p in corpus.glob("*.txt"))
    assert texts == [Path(i).read_text() for i in ids]  # one document per file, nothing dropped or merged
    assert where == {"files": str(corpus / "*.txt")}


def test_split_is_deterministic_disjoint_and_covering(corpus):
    ids, _, _ = load_documents(files_cfg(corpus))
    cfg = files_cfg(corpus)
    split = split_documents(ids, cfg)
    assert split == split_documents(ids, cfg)
    assert [len(split[s]) for s in ("train", "val", "test")] == [6, 3, 3]  # ceil(.25*12), ceil(.2*12)
    assert sorted(sum(split.values(), [])) == list(range(len(ids)))
    # assignment depends on ids, not on their order
    rev = split_documents(ids[::-1], cfg)
    assert {s: sorted(ids[::-1][i] for i in v) for s, v in rev.items()} == {
        s: sorted(ids[i] for i in v) for s, v in split.items()}
    other = split_documents(ids, files_cfg(corpus, split_seed=1))
    assert other != split
    sub = split_documents(ids, files_cfg(corpus, max_documents=6))
    assert sum(len(v) for v in sub.values()) == 6 and sub == split_documents(ids, files_cfg(corpus, max_documents=6))


def test_prepare_outputs(prepared):
    out, manifest = prepared
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.npz", "tokenizer.json", "train.bin", "val.bin"]
    assert not out.with_name("data.partial").exists()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert data_hash(out) == manifest["data_hash"] and len(manifest["data_hash"]) == 64
    c = manifest["counts"]
    assert (c["train_documents"], c["val_documents"], c["test_documents"]) == (6, 3, 3)
    assert c["train_tokens"] == load_tokens(out, "train").size and c["val_tokens"] == load_tokens(out, "val").size
    assert manifest["python_version"] and manifest["source"] == "files"
    assert sorted(sum(manifest["split"].values(), [])) == sorted(str(p) for p in Path(manifest["files"]).parent.glob("*.txt"))

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == manifest["vocab_size"] == 400 and tok.token_to_id(EOS) == manifest["eos_id"]
    # train.bin decodes back to the train documents, each followed by the separator
    train = load_tokens(out, "train")
    eos_at = np.flatnonzero(train == manifest["eos_id"])
    assert len(eos_at) == 6 and eos_at[-1] == train.size - 1
    segments = np.split(train[:-1], eos_at[:-1] + 1)
    decoded = {tok.decode([t for t in seg.tolist() if t != manifest["eos_id"]]) for seg in segments}
    assert decoded == {Path(i).read_text() for i in manifest["split"]["train"]}

    docs, ids = load_test_docs(out)
    assert docs.shape == (c["test_documents_used"], 64) and docs.dtype == np.uint16 and ids == manifest["test_ids"]
    for row, doc_id in zip(docs, ids):
        assert doc_id in manifest["split"]["test"]
        assert tok.decode(row.tolist()) == tok.decode(tok.encode(Path(doc_id).read_text()).ids[:64])


def test_prepare_is_deterministic(corpus, prepared, tmp_path):
    again = prepare(files_cfg(corpus), tmp_path / "data", test_len=64)
    assert again["data_hash"] == prepared[1]["data_hash"]
    assert again["file_sha256"] == prepared[1]["file_sha256"]


def test_too_short_test_documents_fail_cleanly(corpus, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(ValueError, match=r"no test document has 1000000 tokens.*eval.lengths"):
        prepare(files_cfg(corpus), out, test_len=1_000_000)
    assert not out.exists() and not (tmp_path / "data.partial").exists()


def test_hf_source_from_local_dataset_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"body": (STDLIB / n).read_text(), "n": n} for n in SOURCES[:8]]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source="hf", hf_name=str(folder), text_field="body", vocab_size=300,
                     val_fraction=0.2, test_fraction=0.2)
    ids, texts, where = load_documents(cfg)
    assert texts == [r["body"] for r in rows] and ids == [f"train:{i}" for i in range(8)]
    assert where["hf_name"] == str(folder)
    manifest = prepare(cfg, tmp_path / "data", test_len=32)
    assert manifest["counts"]["train_documents"] == 4 and manifest["source"] == "hf"
    with pytest.raises(ValueError, match=r"data.text_field: got 'text'.*\['body', 'n'\]"):
        load_documents(cfg.model_copy(update={"text_field": "text"}))


def test_token_windows(prepared):
    tokens = load_tokens(prepared[0], "train")
    ds = TokenWindows(tokens, 16, 50, seed=3)
    items = [ds[i] for i in range(len(ds))]
    assert len(ds) == 50 and all(x.shape == (17,) for x in items)
    for i, x in enumerate(items):  # contiguous slices of the stream
        o = ds.offset(i)
        assert 0 <= o <= tokens.size - 17 and x.tolist() == tokens[o:o + 17].tolist()
    assert [TokenWindows(tokens, 16, 50, seed=3)[i].tolist() for i in range(50)] == [x.tolist() for x in items]
    assert [ds.offset(i) for i in range(50)] != [TokenWindows(tokens, 16, 50, seed=4).offset(i) for i in range(50)]
    fixed = FixedWindows(tokens, 16, 5)
    assert fixed.offset(0) == 0 and fixed.offset(4) == tokens.size - 17
    assert fixed[4].tolist() == tokens[-17:].tolist()
    with pytest.raises(ValueError, match="cannot hold"):
        TokenWindows(tokens[:10], 16, 1, seed=0)


def test_datamodule_batches(prepared):
    dm = TokenDataModule(prepared[0], seq_len=16, batch_size=4, train_samples=12, val_windows=8, seed=0)
    train = list(dm.train_dataloader())
    assert len(train) == 3 and all(b.shape == (4, 17) for b in train)
    assert [b.shape for b in dm.val_dataloader()] == [(4, 17), (4, 17)]
