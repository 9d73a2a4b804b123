"""Where a training run's progress goes: the console, a JSON-lines event stream, trackers.

The training loop only calls a :class:`Reporter`. The console one prints what the seed's users
know (``{'loss': 3.2201, 'grad_norm': 4.9692, 'learning_rate': 9.5e-05, 'epoch': 5.0}``) under a
progress bar with tokens/s, peak memory and ETA. :class:`JsonLinesReporter` prints the same run as
events, one JSON object per line on stdout, when ``MLX_LORA_EVENTS=jsonl`` is set (the studio
starts runs that way)::

    {"event": "start", "step": 0, "total_steps": 200, "steps_per_epoch": 34}
    {"event": "step", "step": 12, "total_steps": 200, "loss": 7.71, "tokens_per_second": 2148.0,
     "peak_memory_gb": 0.007, "elapsed_s": 1.0, "eta_s": 16.0}          (at most 4 per second)
    {"event": "log", "step": 10, "loss": 7.86, "grad_norm": 2.5, "learning_rate": 7e-05, ...}
    {"event": "eval", "step": 20, "eval_loss": 7.05, "epoch": 0.59}
    {"event": "text", "text": "..."}
    {"event": "end", "status": "finished" | "interrupted" | "error", "message": "..."}

Experiment trackers (:mod:`mlx_lora.train.trackers`) are reporters too; :class:`Fanout` sends one
run to
several.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mlx_lora.core.files import atomic_file
from mlx_lora.core.units import human_bytes

EVENTS_ENV = "MLX_LORA_EVENTS"


def peak_rss_bytes() -> int:
    """This process's own peak resident memory. Linux: ``VmHWM``, not ``ru_maxrss``, which keeps
    the parent's size at fork time across ``exec`` (a child of a 3 GB test process reports 3 GB)."""
    import resource

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes


def log_line(record: dict) -> str:
    """The seed's log line: a Python dict with rounded losses."""
    return str({k: (round(v, 4) if k in ("loss", "eval_loss") else v) for k, v in record.items()})


class Reporter:
    """What the training loop tells the world; every method is a no-op here.

    Calls come in this order: ``start`` once, then ``step`` after every optimizer step, ``log``
    for each logged record (train loss lines and evaluations), ``message`` for other lines, and
    ``end`` exactly once, whether the run finished, was interrupted or failed.
    """

    def start(self, info: dict, config: dict) -> None:
        """``info``: step (> 0 when resuming), total_steps, steps_per_epoch, summary text,
        resumed_from; ``config``: the run's settings."""

    def step(self, step: int, loss: float, tokens_per_second: float, peak_memory: float) -> None:
        """One optimizer step is done (``peak_memory`` in bytes)."""

    def log(self, record: dict, step: int) -> None:
        """A logged record: ``loss, grad_norm, learning_rate, epoch`` or ``eval_loss, epoch``."""

    def message(self, text: str) -> None:
        """A line for humans."""

    def end(self, status: str, message: str, summary: dict | None = None) -> None:
        """``status``: finished, interrupted or error; ``summary``: HF's final record."""


class Fanout(Reporter):
    """Several reporters as one (the console, the event stream, trackers)."""

    def __init__(self, *reporters: Reporter):
        self.reporters = [r for r in reporters if r is not None]

    def start(self, info: dict, config: dict) -> None:
        for r in self.reporters:
            r.start(info, config)

    def step(self, step: int, loss: float, tokens_per_second: float, peak_memory: float) -> None:
        for r in self.reporters:
            r.step(step, loss, tokens_per_second, peak_memory)

    def log(self, record: dict, step: int) -> None:
        for r in self.reporters:
            r.log(record, step)

    def message(self, text: str) -> None:
        for r in self.reporters:
            r.message(text)

    def end(self, status: str, message: str, summary: dict | None = None) -> None:
        for r in self.reporters:
            r.end(status, message, summary)


class ConsoleReporter(Reporter):
    """The summary, a progress bar (tokens/s, peak memory, ETA) and the seed's log lines."""

    def __init__(self, *, progress: bool = True):
        self.progress = progress
        self.bar: Any = None

    def start(self, info: dict, config: dict) -> None:
        from tqdm import tqdm

        if info.get("resumed_from"):
            self.message(f"resuming from {info['resumed_from']} (step {info['step']})")
        self.message(info["summary"])
        self.bar = tqdm(
            total=info["total_steps"],
            initial=info["step"],
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
            mininterval=0.5,
            file=sys.stderr,
        )

    def step(self, step: int, loss: float, tokens_per_second: float, peak_memory: float) -> None:
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
        self.message(log_line(record))

    def message(self, text: str) -> None:
        if self.progress and self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def end(self, status: str, message: str, summary: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if summary is not None:
            self.message(str(summary))
        if status == "finished" and message:
            self.message(message)


class JsonLinesReporter(Reporter):
    """The run as JSON events on stdout, one per line (see the module docstring)."""

    def __init__(self, stream: Any = None, min_interval: float = 0.25):
        self.stream = stream
        self.min_interval = min_interval
        self.total = 0
        self.t0 = time.perf_counter()
        self.first_step: int | None = None
        self.last_emit = 0.0

    def _emit(self, event: dict) -> None:
        out = self.stream or sys.stdout
        out.write(json.dumps(event, ensure_ascii=False) + "\n")
        out.flush()

    def start(self, info: dict, config: dict) -> None:
        self.total, self.t0 = info["total_steps"], time.perf_counter()
        event = {"event": "start", "step": info["step"], "total_steps": self.total}
        event["steps_per_epoch"] = info.get("steps_per_epoch")
        if info.get("resumed_from"):
            event["resumed_from"] = str(info["resumed_from"])
        self._emit(event)
        self.message(info["summary"])

    def step(self, step: int, loss: float, tokens_per_second: float, peak_memory: float) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = step - 1
        if now - self.last_emit < self.min_interval and step < self.total:
            return
        self.last_emit = now
        elapsed = now - self.t0
        done = max(step - self.first_step, 1)
        eta = elapsed / done * (self.total - step)
        self._emit(
            {
                "event": "step",
                "step": step,
                "total_steps": self.total,
                "loss": loss,
                "tokens_per_second": round(tokens_per_second, 1),
                "peak_memory_gb": round(peak_memory / 1e9, 4),
                "elapsed_s": round(elapsed, 2),
                "eta_s": round(eta, 2),
            }
        )

    def log(self, record: dict, step: int) -> None:
        kind = "eval" if "eval_loss" in record else "log"
        self._emit({"event": kind, "step": step, **record})

    def message(self, text: str) -> None:
        self._emit({"event": "text", "text": text})

    def end(self, status: str, message: str, summary: dict | None = None) -> None:
        if summary is not None:
            self._emit({"event": "summary", **summary})
        self._emit({"event": "end", "status": status, "message": message})


def default_reporter(*, lead: bool, progress: bool, trackers: list[Reporter] = ()) -> Reporter:
    """What a run reports to unless told otherwise: nothing on ranks other than 0; else the
    console, or the JSON event stream when ``MLX_LORA_EVENTS=jsonl``, plus the trackers."""
    if not lead:
        return Reporter()
    if os.environ.get(EVENTS_ENV) == "jsonl":
        main: Reporter = JsonLinesReporter()
    else:
        main = ConsoleReporter(progress=progress)
    return Fanout(main, *trackers) if trackers else main


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
