"""clex/io.py: an output is either whole or absent, never half-written; a full disk names the output. Real files; the
full device is /dev/full (every write fails with ENOSPC)."""
from __future__ import annotations

import errno

import pytest

from clex.io import atomic_dir, atomic_file, atomic_write_text, staged_files


def test_atomic_file_replaces_the_output_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "eval" / "base.json"
    atomic_write_text(out, "old")
    with atomic_file(out) as tmp:
        assert tmp.name == out.name and tmp.parent.name == ".partial"  # MLflow logs it under the output's name
        tmp.write_text("new")
        assert out.read_text() == "old"  # nothing moves before the block ends
    assert out.read_text() == "new" and sorted(p.name for p in out.parent.iterdir()) == ["base.json"]


def test_atomic_file_on_a_full_disk_names_the_output_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "base.json"
    out.write_text("old")
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "base.json").symlink_to("/dev/full")
    with pytest.raises(OSError) as e:
        atomic_write_text(out, "x" * 100_000)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["base.json"]


def test_atomic_file_keeps_other_errors_as_they_are(tmp_path):
    out = tmp_path / "x.json"
    with pytest.raises(FileNotFoundError) as e, atomic_file(out):
        (tmp_path / "missing").read_text()  # an input that is not there: not the output's fault
    assert e.value.filename == str(tmp_path / "missing")
    assert not out.exists() and not (tmp_path / ".partial").exists()


def test_atomic_dir_swaps_the_folder_in_only_when_complete(tmp_path):
    out = tmp_path / "data"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("killed halfway")
    assert sorted(p.name for p in out.iterdir()) == ["a"] and not (tmp_path / "data.partial").exists()
    with atomic_dir(out) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c"]  # the old folder's files do not survive a rewrite


def test_staged_files_move_in_together_beside_other_files(tmp_path):
    (tmp_path / ".gitignore").write_text("/x\n")
    with pytest.raises(ValueError), staged_files(tmp_path) as tmp:
        (tmp / "table.md").write_text("half")
        raise ValueError("the plot failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gitignore"]
    with staged_files(tmp_path) as tmp:
        (tmp / "table.md").write_text("t")
        (tmp / "figures").mkdir()
        (tmp / "figures" / "01_a.png").write_bytes(b"png")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        ".gitignore", "figures", "figures/01_a.png", "table.md"]
