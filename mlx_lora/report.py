"""Where a training run's progress goes: a progress bar, the seed's log lines, ``loss.png``.

The training loop only calls a :class:`Reporter`; the console one here prints what the seed's
users know (``{'loss': 3.2201, 'grad_norm': 4.9692, 'learning_rate': 9.5e-05, 'epoch': 5.0}``) under
a progress bar with tokens/s, peak memory and ETA. Anything else that wants to watch a run (the
studio's live page, experiment trackers) subclasses it and overrides what it needs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mlx_lora.files import atomic_file


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def log_line(record: dict) -> str:
    """The seed's log line: a Python dict with rounded losses."""
    return str({k: (round(v, 4) if k in ("loss", "eval_loss") else v) for k, v in record.items()})


class Reporter:
    """Console reporting of one run; ``enabled=False`` (ranks other than 0) prints nothing."""

    def __init__(self, *, enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self.progress = progress and enabled
        self.bar: Any = None

    def start(self, summary: str, total_steps: int, initial_step: int, config: dict) -> None:
        """The run begins (or resumes at ``initial_step``); ``config`` is the run's settings."""
        from tqdm import tqdm

        self.message(summary)
        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
            mininterval=0.5,
            file=sys.stderr,
        )

    def step(self, step: int, loss: float, tokens_per_second: float, peak_memory: float) -> None:
        """One optimizer step is done (``peak_memory`` in bytes)."""
        if self.bar is None:
            return
        self.bar.set_postfix(
            loss=f"{loss:.4f}",
            tok_s=f"{tokens_per_second:,.0f}",
            mem=human_bytes(peak_memory),
            refresh=False,
        )
        self.bar.update(1)

    def log(self, record: dict, step: int) -> None:
        """A logged record (train: loss, grad_norm, learning_rate, epoch; or eval_loss, epoch)."""
        self.message(log_line(record))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress and self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def finish(self, summary: dict) -> None:
        """The run ended; ``summary`` is HF's final record (train_runtime, train_loss, ...)."""
        self.close()
        self.message(str(summary))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def plot_losses(history: list[dict], path: Path) -> None:
    """``loss.png``: the curve the seed's users otherwise read off log lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(Path(path)) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
