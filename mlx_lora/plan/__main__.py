"""``python -m mlx_lora.plan`` and ``mlx-lora plan``: flags → config →
:mod:`mlx_lora.plan.memory`."""

from __future__ import annotations

import sys

from mlx_lora.config import given_fields, parse_config, validate_train
from mlx_lora.core.cli import run
from mlx_lora.model.hub import resolve_model
from mlx_lora.plan.footprint import read_shape
from mlx_lora.plan.memory import Plan, PlanConfig, changes, examples_for, plan, suggest

DESCRIPTION = """The memory plan of a training run: will it fit this machine? (train's flags)

Reads config.json only (no weights). With --data it lays out the run's real batches (tokenizer
only); without, it assumes --max-seq-length examples. train prints the same plan and refuses a
run that does not fit (unless --force). MLX_LORA_MEMORY_LIMIT=8GB plans for a smaller machine."""

EPILOG = """examples:
  python -m mlx_lora.plan --model qwen/Qwen1.5-4B-Chat --quantize 4
  python -m mlx_lora.plan --model runs/base --data dataset/huanhuan.json --suggest
  MLX_LORA_MEMORY_LIMIT=8GB python -m mlx_lora.plan --model qwen/Qwen1.5-4B-Chat --suggest"""


def main(argv: list[str] | None = None) -> Plan:
    prog = "python -m mlx_lora.plan"
    cfg = parse_config(PlanConfig, argv, prog, DESCRIPTION, EPILOG)

    validate_train(cfg)  # the numbers train would refuse, before anything is read
    model_dir = resolve_model(cfg.model, cfg.model_source, weights=False)
    shape = read_shape(model_dir)  # a broken config.json fails here, before the tokenizer reads it
    examples = None
    if "data" in given_fields(PlanConfig, argv, prog, DESCRIPTION):
        examples = examples_for(cfg, model_dir)
    p = plan(cfg, examples, model_dir=model_dir, shape=shape)
    print(p.report())
    if cfg.suggest:
        found = suggest(cfg, examples, base=p)
        if found is None:
            print("\nsuggestion: nothing fits; use a smaller model or a bigger machine")
        else:
            new, q = found
            print(f"\nsuggestion (fastest that fits): {changes(cfg, new)}\n{q.report()}")
    return p


if __name__ == "__main__":
    sys.exit(run(main))
