"""Atomic file writes: what hetrain saves is either the old file or the whole new one.

`write_atomic(path, text)` writes to a temporary file beside `path` (so the rename stays on
one filesystem) and renames it over `path`; on failure the temporary file is removed and
`path` is untouched. Directories of files (checkpoints) have their own protocol in
train/checkpoint.py; this module writes single files only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
