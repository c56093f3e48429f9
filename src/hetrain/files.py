"""Atomic file writes: what hetrain saves is either the old file or the whole new one.

`write_atomic(path, text)` writes to a temporary file beside `path` (so the rename stays on
one filesystem) and renames it over `path`; on failure the temporary file is removed and
`path` is untouched; `check_output_dir(path, key)` says, before any work, why a folder a
command will write into cannot be made or written. Directories of files (checkpoints) have
their own protocol in train/checkpoint.py; this module writes single files only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from hetrain.errors import ConfigError


def check_output_dir(path: str | os.PathLike, key: str) -> None:
    """ConfigError naming `key` (the config key that gave `path`) when `path` is a file, lies
    under a file, or sits in a folder this process may not write; creates nothing."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key} '{path}' is a file, not a folder; pass a folder path to --{key}")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != p and not probe.is_dir():
        raise ConfigError(f"{key} '{path}' lies under the file '{probe}'; pass a folder path to --{key}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} '{path}': cannot write in '{probe}' (permission denied); pass a folder you can "
                          f"write to --{key}")


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
