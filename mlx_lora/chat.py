"""``python -m mlx_lora.chat``: the command lives in :mod:`mlx_lora.infer.chat`."""

import sys

from mlx_lora.core.cli import run
from mlx_lora.infer.chat import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run(main))
