"""File helpers: atomic writes (no partial output on failure) and early output-path checks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from cora_onnx.core.errors import InputError

__all__ = ["atomic_write", "check_output_path", "check_input_file", "check_input_dir"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call write(f) on a temporary file beside path, then rename it to path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail early (before any work) when an output file cannot be created."""
    p = Path(path)
    if not p.parent.is_dir():
        raise InputError(f"{what} {p}: directory {p.parent} does not exist")
    if p.is_dir():
        raise InputError(f"{what} {p} is a directory, expected a file path")
    if not os.access(p.parent, os.W_OK):
        raise InputError(f"{what} {p}: directory {p.parent} is not writable")
    return p


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} does not exist")
    if not p.is_file():
        raise InputError(f"{what} {p} is not a file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what} {p} is not readable")
    return p


def check_input_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise InputError(f"{what} {p} is not a directory")
    return p
