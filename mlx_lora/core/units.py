"""Byte counts for people and back: the one formatter every table and log line uses."""

from __future__ import annotations

import re
from pathlib import Path

from mlx_lora.core.errors import MlxLoraError


def human_bytes(n: float) -> str:
    """``2.47 GB``, ``310 MB``, ``12 KB``, ``512 B`` (decimal units, as macOS reports sizes)."""
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.0f} KB"
    return f"{n:.0f} B"


def parse_size(text: str, what: str = "size") -> int:
    """``2GB``, ``1.5G``, ``512MB``, ``8GiB`` or plain bytes → bytes (GB = 10⁹, GiB = 2³⁰)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text, flags=re.I)
    if not m:
        raise MlxLoraError(f"{what}={text!r} is not a size; write it like 2GB or 512MB")
    unit = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** unit)


def path_bytes(path: Path) -> int:
    """A file's size, or the total of the files in a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
