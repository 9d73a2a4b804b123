"""``python -m mlx_lora.serve``: the command lives in :mod:`mlx_lora.infer.serve`; the memory plan
(:func:`mlx_lora.plan.memory.serve_concurrency`) picks its default ``--max-concurrency``."""

import sys

from mlx_lora.core.cli import run
from mlx_lora.infer import serve
from mlx_lora.plan.memory import serve_concurrency


def main(argv: list[str] | None = None) -> None:
    serve.main(argv, concurrency_rule=serve_concurrency)


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(run(main))
