"""Writing files and folders so that a failure (full disk, kill, Ctrl-C) never leaves half of one.

The seed's "error 3" was a merge that failed on an adapter an interrupted run had half written.
Everything mlx_lora writes goes through here: a temporary name next to the final place, then an
atomic rename; on any failure the temporary is removed and the old version (if any) is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk must not leave the temp file behind
        tmp.unlink(missing_ok=True)
        raise


def safe_tmpdir(parent: Path, prefix: str) -> Path:
    """A temporary folder next to its final place, so the final ``rename`` is atomic."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield ``.NAME.tmp-*`` beside ``final``; on success it replaces ``final``, on failure it vanishes."""
    tmp = safe_tmpdir(final.parent, f".{final.name}.tmp-")
    try:
        yield tmp
        if final.exists():
            trash = final.with_name(f".{final.name}.old")
            final.rename(trash)
            shutil.rmtree(trash)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_error_detail(e: BaseException) -> str:
    """What went wrong in a write, in a few words (MLX reports a full disk as RuntimeError)."""
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)
