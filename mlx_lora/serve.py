"""``python -m mlx_lora.serve``: the command lives in :mod:`mlx_lora.infer.serve`."""

import sys

from mlx_lora.core.cli import run
from mlx_lora.infer.serve import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run(main))
