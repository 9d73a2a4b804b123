"""``mlx-lora <command> …`` (and ``python -m mlx_lora <command> …``): one console script for every
command, dispatching to the same ``main`` that ``python -m mlx_lora.<command>`` runs."""

from __future__ import annotations

import importlib
import sys

from mlx_lora import __version__
from mlx_lora.core.cli import run

# command → (module holding its ``main``, one line for the command list), in pipeline order
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("mlx_lora.plan.__main__", "will a training run fit this machine? (reads config.json)"),
    "train": ("mlx_lora.train.__main__", "LoRA / DoRA / full fine-tuning with exact resume"),
    "eval": ("mlx_lora.eval.__main__", "base vs tuned: held-out loss and answers side by side"),
    "chat": ("mlx_lora.infer.chat", "chat with a base model or base + adapter in the terminal"),
    "serve": ("mlx_lora.serve", "OpenAI-compatible HTTP server (for Dify)"),
    "fuse": ("mlx_lora.export.fuse", "merge an adapter into its base: a Hugging Face folder"),
    "export": ("mlx_lora.export.__main__", "GGUF or MLX + Ollama Modelfile, verified"),
    "verify": ("mlx_lora.verify.__main__", "check an export against the model you trained"),
    "studio": ("mlx_lora.studio.__main__", "the local web page over all of the above"),
    "demo": ("mlx_lora.demo", "the whole road on a tiny model: does my install work?"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items())
    return (
        "usage: mlx-lora <command> [flags]   (mlx-lora <command> --help for its flags)\n\n"
        f"commands:\n{rows}\n\n"
        "Each is also `python -m mlx_lora.<command>`."
    )


def console(argv: list[str] | None = None) -> int:
    """The ``mlx-lora`` entry point: exit code 2 and the command list for an unknown command."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"mlx_lora {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    sys.argv = [f"mlx-lora {args[0]}", *args[1:]]
    return run(module.main, None if argv is None else args[1:])


if __name__ == "__main__":
    sys.exit(console())
