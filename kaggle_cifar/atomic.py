"""Atomic file writes: write beside the target under a temporary name, then rename over it.

A crash, a full disk or a killed process leaves either the old file or the new one, never a
truncated one that looks complete (rename is atomic within one filesystem)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def free_space(path: Path | str) -> str:
    """The free space on the disk that holds `path` (or its nearest existing parent), for messages
    about writes that failed."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return f"{shutil.disk_usage(path).free / 2**20:,.0f} MiB free"
