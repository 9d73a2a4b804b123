"""``OUT/export.json``: what an export wrote, read by verify and the studio."""

from __future__ import annotations

MANIFEST = "export.json"  # what was written; `python -m mlx_lora.verify --export-dir` reads it
