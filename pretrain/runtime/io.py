"""Atomic file writes through iopath (local paths and URIs alike); no torch.

Every file is written under a temporary name, synced, and renamed into place, so a crash at any moment
never leaves a truncated file under the final name. iopath's ``mv`` does not overwrite, so the old file is
moved aside first (to ``<name>.prev`` when asked to keep it, else removed).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from iopath.common.file_io import PathManager

__all__ = ["CHECKPOINT", "CHECKPOINT_FILES", "PREVIOUS_SUFFIX", "atomic_write", "atomic_write_json",
           "atomic_write_text", "find_checkpoint", "join", "read_json", "staged_folder"]

PREVIOUS_SUFFIX = ".prev"
TMP_SUFFIX = ".tmp"
CHECKPOINT = "checkpoint-last.pth"  # every stage's resumable checkpoint in its run folder
CHECKPOINT_FILES = (CHECKPOINT, CHECKPOINT + PREVIOUS_SUFFIX)  # what find_checkpoint looks for, in order


def join(folder: str, name: str) -> str:
    """``folder/name`` for local paths and URIs alike."""
    return str(folder).rstrip("/") + "/" + name


def _sync_to_disk(handle: IO) -> None:
    handle.flush()
    with contextlib.suppress(AttributeError, OSError, io.UnsupportedOperation):  # remote handles: no descriptor
        os.fsync(handle.fileno())


def _move(pm: PathManager, src: str, dst: str) -> None:
    if not pm.mv(src, dst):
        raise OSError(f"could not rename {src} to {dst}")


def atomic_write(
    path: str, write: Callable[[IO], None], binary: bool = True, keep_previous: bool = False,
    pm: PathManager | None = None,
) -> None:
    """Write ``path`` through ``write(handle)`` on a temporary file, then rename it into place.

    The old file is first moved to ``path + '.prev'`` (``keep_previous``) or removed; readers of a checkpoint
    fall back to ``.prev`` if ``path`` is missing.
    """
    pm = pm or PathManager()
    path = str(path)
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    pm.mkdirs(folder)
    tmp = path + TMP_SUFFIX
    with pm.open(tmp, "wb" if binary else "w") as handle:
        write(handle)
        _sync_to_disk(handle)
    if pm.exists(path):
        if keep_previous:
            previous = path + PREVIOUS_SUFFIX
            if pm.exists(previous):
                pm.rm(previous)
            _move(pm, path, previous)
        else:
            pm.rm(path)
    _move(pm, tmp, path)


def find_checkpoint(folder: str, pm: PathManager | None = None) -> str | None:
    """``folder/checkpoint-last.pth``, else its ``.prev`` (a crash between the two renames), else None."""
    pm = pm or PathManager()
    for name in CHECKPOINT_FILES:
        candidate = join(folder, name)
        if pm.exists(candidate):
            return candidate
    return None


def atomic_write_text(path: str, text: str, pm: PathManager | None = None) -> None:
    """Atomically write ``text``."""
    atomic_write(path, lambda handle: handle.write(text), binary=False, pm=pm)


def atomic_write_json(path: str, obj: Any, pm: PathManager | None = None) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n", pm)


def read_json(path: str, pm: PathManager | None = None) -> Any:
    """The JSON content of ``path`` (``OSError`` if missing, ``json.JSONDecodeError`` if malformed)."""
    pm = pm or PathManager()
    with pm.open(str(path), "r") as handle:
        return json.load(handle)


@contextlib.contextmanager
def staged_folder(root: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``root`` to fill; on success it replaces ``root`` by renames.

    An interrupted or failed fill never leaves a partial ``root`` (the temporary folder is removed).
    ``FileExistsError`` up front if ``root`` is a file or a non-empty folder and not ``overwrite``.
    """
    root = Path(root).expanduser().absolute()
    if root.exists() and not overwrite and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} already exists and is not an empty folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is an ordinary one
        if overwrite and root.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, trash / root.name)
            os.replace(tmp, root)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, root)  # fails if another process filled root meanwhile; replaces an empty root folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
