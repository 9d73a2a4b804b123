"""The one place where user errors become a single line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from mlx_lora.core.blas import maybe_relaunch
from mlx_lora.core.errors import MlxLoraError


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Call a command's ``main``; ``MlxLoraError`` → ``error: …`` and 2, Ctrl-C → 130.

    From a real command line (``argv is None``) the process first re-launches itself with the
    system OpenBLAS on Linux (see :mod:`mlx_lora.core.blas`).
    """
    if argv is None:
        maybe_relaunch()
    # transformers' "PyTorch was not found" advice would be a second stderr line (mlx-lm sets this
    # too, but export imports transformers first)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        main(argv)
    except MlxLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (
        KeyboardInterrupt
    ) as e:  # a command may say what it saved: KeyboardInterrupt("interrupted: …")
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
    return 0
