"""A run's data: the dataset file encoded with the model's tokenizer, split into train / validation.

Train and plan both call :func:`run_examples`, so the plan lays out the batches the run will see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_lora.config import TrainConfig
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.data.dataset import Dataset, load_dataset, split
from mlx_lora.data.preference import load_preference


def load_for(cfg: TrainConfig, path: Path, tokenizer: Any) -> Dataset:
    """A data file as ``--method`` reads it: SFT examples, or pairs / completions / prompts."""
    kw = dict(
        fmt=cfg.format,
        system_prompt=cfg.system_prompt,
        max_seq_length=cfg.max_seq_length,
        allow_special=cfg.allow_special_tokens_in_content,
    )
    if cfg.method == "sft":
        return load_dataset(path, tokenizer, **kw)
    return load_preference(path, tokenizer, cfg.method, **kw)


def _split_data(cfg: TrainConfig, ds: Dataset, tokenizer: Any) -> tuple[list, list]:
    if cfg.eval_data:
        return ds.examples, load_for(cfg, Path(cfg.eval_data), tokenizer).examples
    train_idx, val_idx = split(len(ds.examples), cfg.val_split, cfg.seed)
    return [ds.examples[i] for i in train_idx], [ds.examples[i] for i in val_idx]


def run_examples(cfg: TrainConfig, tokenizer: Any, world: int) -> tuple[Dataset, list, list]:
    """The encoded data set and its training / validation examples."""
    ds = load_for(cfg, Path(cfg.data), tokenizer)
    train_ex, val_ex = _split_data(cfg, ds, tokenizer)
    if cfg.per_device_train_batch_size * world > len(train_ex):
        raise MlxLoraError(
            f"--per-device-train-batch-size {cfg.per_device_train_batch_size} × {world} "
            f"process(es) is larger than the {len(train_ex)} training examples; lower it"
        )
    return ds, train_ex, val_ex
