"""Test material built or fetched offline: tiny models of every family, real files from PyPI
packages.

Part of the package (not of ``tests/``) because the demo, the tests and the scripts all build the
same tiny models, and ``pip install mlx_lora`` must be enough for ``python -m mlx_lora.demo``.
"""

from __future__ import annotations

from pathlib import Path

# The dataset sample written for this project (alpaca format, 甄嬛体). It ships inside the
# package so that the demo and the tiny models' tokenizer corpus are the same from a wheel as
# from a checkout; the checkout's dataset/huanhuan.json is a link to it.
SAMPLE_DATA = Path(__file__).resolve().parent / "data" / "huanhuan.json"
