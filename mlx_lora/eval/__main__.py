"""``python -m mlx_lora.eval`` and ``mlx-lora eval``: flags → config →
:mod:`mlx_lora.eval.compare`."""

from __future__ import annotations

import sys
from pathlib import Path

from mlx_lora.config import parse_config
from mlx_lora.core.cli import run
from mlx_lora.eval.compare import EvalConfig, EvalResult, evaluate_adapter

DESCRIPTION = """Compare a fine-tuned adapter with its base model: mean token loss and perplexity on
the same held-out examples (the training loss, same masks), and greedy answers side by side.
Writes eval.json, eval.md and eval.html (into the adapter folder unless --output-dir)."""

EPILOG = """examples:
  python -m mlx_lora.eval --adapter output/huanhuan
  python -m mlx_lora.eval --adapter output/huanhuan --data held_out.json --prompts questions.txt"""


def main(argv: list[str] | None = None) -> EvalResult:
    cfg: EvalConfig = parse_config(EvalConfig, argv, "python -m mlx_lora.eval", DESCRIPTION, EPILOG)
    r = evaluate_adapter(cfg)
    change = r.tuned_loss - r.base_loss
    print(
        f"base loss {r.base_loss:.4f} (ppl {r.base_perplexity:.2f}) → tuned {r.tuned_loss:.4f} "
        f"(ppl {r.tuned_perplexity:.2f}), {change:+.4f} on {r.examples} held-out examples"
    )
    for a in r.answers[:3]:
        print(f"\n>>> {a['prompt']}\n[tuned] {a['tuned'].strip()}\n[base]  {a['base'].strip()}")
    out = Path(cfg.output_dir or r.adapter)
    print(f"\nreports: {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.html'}")
    return r


if __name__ == "__main__":
    sys.exit(run(main))
