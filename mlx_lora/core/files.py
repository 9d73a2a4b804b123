"""Reading and writing files so that a failure (full disk, kill, Ctrl-C) never leaves half of one.

The seed's "error 3" was a merge that failed on an adapter an interrupted run had half written.
Everything mlx_lora writes goes through here: a temporary name next to the final place, then an
atomic rename; on any failure the temporary is removed and the old version (if any) is untouched.
Temporary names start with a dot and hold ``.tmp-``, so nothing that lists a folder's results
mistakes one for a finished file.
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

from mlx_lora.core.errors import MlxLoraError


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` to write to; on success it replaces ``final``.

    The temporary keeps ``final``'s suffix, because some writers (matplotlib, MLX) pick the format
    from it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:  # a full disk or Ctrl-C must not leave the temporary behind
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def scratch_file(beside: Path, label: str) -> Iterator[Path]:
    """A temporary file path beside ``beside`` (same disk), removed afterwards whatever happens:
    for intermediates such as the f16 GGUF llama.cpp's quantizer reads."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = beside.with_name(f".{beside.stem}.tmp-{os.getpid()}-{label}{beside.suffix}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def copy_file_atomic(src: Path, dst: Path) -> None:
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


def safe_tmpdir(parent: Path, prefix: str) -> Path:
    """A temporary folder next to its final place, so the final ``rename`` is atomic."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield ``.NAME.tmp-*`` beside ``final``: on success it replaces ``final``, else it goes."""
    tmp = safe_tmpdir(final.parent, f".{final.name}.tmp-")
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if final.exists():
            trash = final.with_name(f".{final.name}.old")
            final.rename(trash)
            shutil.rmtree(trash)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(final: Path) -> None:
    """Delete what a killed :func:`atomic_dir` left beside ``final`` (call it under a lock that
    keeps every other writer of ``final`` out)."""
    for tmp in Path(final).parent.glob(f".{Path(final).name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path, *, required: bool = False) -> dict:
    """A JSON object from ``path``; ``{}`` when the file is absent (unless ``required``).

    A file that exists but does not parse, or holds something other than an object, is a user
    error either way: silently ignoring it would hide a broken model folder.
    """
    path = Path(path)
    if not path.is_file():
        if required:
            raise MlxLoraError(f"{path} is missing; pass a complete Hugging Face model folder")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MlxLoraError(f"{path}: not valid JSON ({e}); fix or re-download the file") from None
    if not isinstance(data, dict):
        raise MlxLoraError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_error_detail(e: BaseException) -> str:
    """What went wrong in a write, in a few words (MLX reports a full disk as RuntimeError)."""
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def check_apart(
    out: Path, sources: dict[str, Path | str | None], flag: str = "--output-dir"
) -> None:
    """Refuse an output folder that is, contains or lies inside one of the command's inputs: a
    run started over (``--overwrite-output-dir``) or a fused folder put in place would delete or
    mix with the model or data it reads. ``sources`` maps a flag (``--model``) to its path."""
    o = Path(out).expanduser().resolve()
    for name, src in sources.items():
        if src is None or not Path(src).expanduser().exists():
            continue
        s = Path(src).expanduser().resolve()
        if o == s:
            how = "is"
        elif s.is_relative_to(o):
            how = "contains"
        elif o.is_relative_to(s) and s.is_dir():
            how = "lies inside"
        else:
            continue
        raise MlxLoraError(
            f"{flag} {out} {how} {name} {src}; writing there could delete or mix with it: choose "
            "a separate folder"
        )
