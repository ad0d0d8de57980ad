"""Atomic file writes: a file is written under a temporary name beside its place and renamed
into it, so a crash or a full disk never leaves a torn file where a good one was (or was expected)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` to a temporary name beside `path`, then rename it into place; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
