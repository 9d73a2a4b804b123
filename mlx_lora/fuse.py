"""``python -m mlx_lora.fuse``: the command lives in :mod:`mlx_lora.export.fuse`."""

import sys

from mlx_lora.core.cli import run
from mlx_lora.export.fuse import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run(main))
