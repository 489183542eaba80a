"""Writes that never leave a half-written output: write to a temporary path, then rename into place.

A process killed mid-write leaves the previous output (or none), never a partial one; a write that fails
removes its temporary files and raises, and an OSError of the write itself (a full disk: ENOSPC, EFBIG) is
re-raised naming the output it was writing, which `clex` prints in one line. Three shapes:

- `atomic_file(path)`: one file, written at `<folder>/.partial/<name>` (the name kept: MLflow logs the
  temporary file as an artifact under the output's name before it moves into place);
- `atomic_dir(path)`: a whole folder, written as the sibling `<name>.partial` and swapped in;
- `staged_files(folder)`: several files written into `<folder>/.partial/` and moved into `folder` only once
  all of them exist (for a folder that holds other files too, e.g. DVC's .gitignore).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial"


def _naming(e: OSError, tmp: Path, out: Path) -> OSError:
    """`e` as an OSError naming `out`, when it is the failure of writing `tmp` (no file name, or a path in tmp)."""
    where = None if e.filename is None else Path(e.filename)
    if where is None or where == tmp or tmp in where.parents:
        return OSError(e.errno, e.strerror, str(out))
    return e


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield the temporary path of file `path` (`<folder>/.partial/<name>`); when the block ends without error,
    rename it into place. On any error the temporary file goes, and `.partial` too when nothing else is in it."""
    path = Path(path)
    tmp = path.parent / PARTIAL / path.name
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise _naming(e, tmp, path) from e
    finally:
        tmp.unlink(missing_ok=True)
        try:
            tmp.parent.rmdir()
        except OSError:  # another writer's file is in it
            pass


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder `<name>.partial` beside folder `path`; when the block ends without error,
    it replaces `path` (the old one removed first). On any error the temporary folder is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    except OSError as e:
        raise _naming(e, tmp, path) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_files(folder: Path) -> Iterator[Path]:
    """Yield a fresh, empty `<folder>/.partial/`; when the block ends without error, every file written under it
    moves to the same relative path in `folder`, replacing its namesake. On any error nothing moves."""
    folder = Path(folder)
    tmp = folder / PARTIAL
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        move_files(tmp, folder)
    except OSError as e:
        raise _naming(e, tmp, folder) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_files(src: Path, dest: Path) -> None:
    """Move every file under `src` to the same relative path under `dest` (folders created, namesakes replaced)."""
    for f in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        target = Path(dest) / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        f.replace(target)
