"""``python -m mlx_lora.train`` and ``mlx-lora train``: flags → config →
:mod:`mlx_lora.train.loop`."""

from __future__ import annotations

import sys

from mlx_lora.config import TrainConfig, parse_config
from mlx_lora.core.cli import run
from mlx_lora.train.loop import TrainResult, train

DESCRIPTION = """LoRA fine-tuning of a chat model on Apple MLX (the seed's train.py, without traps).

The defaults are the seed's: Qwen1.5-4B-Chat from ModelScope, dataset/huanhuan.json, batch 4 × 4
accumulation, lr 1e-4, r 8, alpha 32, dropout 0.1 on q,k,v,o,gate,up,down. Conversations are
rendered with the model's own chat template; the loss covers every assistant turn and its
end-of-turn token."""

EPILOG = """examples:
  python -m mlx_lora.train --data dataset/huanhuan.json --output-dir output/huanhuan
  python -m mlx_lora.train --model runs/tiny-qwen --data my.jsonl --max-steps 30 --val-split 0.05
  python -m mlx_lora.train --config train.yaml --learning-rate 2e-4      # flags override the file
  python -m mlx_lora.train --output-dir output/huanhuan --resume          # continue after a stop

output: adapter_config.json + adapter_model.safetensors (PEFT format), checkpoint-N/,
        trainer_state.json, loss.png"""


def main(argv: list[str] | None = None) -> TrainResult:
    cfg = parse_config(TrainConfig, argv, "python -m mlx_lora.train", DESCRIPTION, EPILOG)
    return train(cfg)


if __name__ == "__main__":
    sys.exit(run(main))
