"""What the studio reads from a run: JSON events on stdout, one-line errors, and, afterwards,
``trainer_state.json``.

A training run started by the studio gets ``MLX_LORA_EVENTS=jsonl`` and reports through
:class:`mlx_lora.train.report.JsonLinesReporter`, whose module docstring is the contract (start /
step /
log / eval / text / summary / end events). A run that fails before it starts, or dies, has no
``end`` event: then its exit code and the CLI's one ``error: …`` / ``interrupted: …`` line tell.
Runs without events (export) print human text, which becomes ``text`` events; their progress bars
are left out of the log except the finished one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import read_json
from mlx_lora.train.checkpoint import STATE_FILE, checkpoints

_PROGRESS = re.compile(r"(\d+)%\|")


class LineReader:
    """Events from a child's combined stdout/stderr, fed in chunks as the pipe delivers them.

    Progress bars redraw with ``\r``, so both ``\r`` and ``\n`` end a line.
    """

    def __init__(self) -> None:
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> list[dict]:
        parts = re.split(r"[\r\n]", self.pending + text)
        self.pending = "" if final else parts.pop()
        events: list[dict] = []
        for line in parts:
            events += self.line(line)
        return events

    def line(self, raw: str) -> list[dict]:
        line = raw.strip()
        if not line:
            return []
        if line.startswith('{"event"'):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                return [{"event": "text", "text": line}]
            return [event] if isinstance(event, dict) else []
        if line.startswith("error: "):
            return [{"event": "end", "status": "error", "message": line[len("error: ") :]}]
        if line.startswith("interrupted"):
            return [{"event": "end", "status": "interrupted", "message": line}]
        if (bar := _PROGRESS.search(line)) and bar[1] != "100":
            return []  # progress bars (GGUF writing): only their final state is news
        return [{"event": "text", "text": raw.rstrip()}]  # tables keep their indentation


# ---------------------------------------------------------------- earlier runs, from disk


def run_state(out: Path) -> dict | None:
    """The newest ``trainer_state.json`` of a run: the final one, or its latest checkpoint's."""

    best = None
    for path in [out / STATE_FILE] + [c / STATE_FILE for c in reversed(checkpoints(out))]:
        try:
            state = read_json(path)
        except MlxLoraError:  # being replaced right now, or damaged: the next one will do
            continue
        step = state.get("global_step", 0)
        if state and isinstance(step, int) and (best is None or step > best["global_step"]):
            best = {**state, "global_step": step}
    return best


def curves(history: list[dict]) -> dict[str, list[list[float]]]:
    """``loss`` and ``eval_loss`` points ``[step, value]`` of a log history, sorted by step."""
    out: dict[str, dict[int, float]] = {"loss": {}, "eval_loss": {}}
    for h in history:
        step = h.get("step")
        if not isinstance(step, int):
            continue
        for key in out:
            v = h.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[key][step] = float(v)
    return {k: [[s, v] for s, v in sorted(d.items())] for k, d in out.items()}


def final_figures(history: list[dict]) -> dict[str, float]:
    """tokens/s, peak memory and runtime of a finished run (its last log_history record)."""
    for h in reversed(history):
        if "train_runtime" in h:
            keys = ("train_tokens_per_second", "peak_memory_gb", "train_runtime")
            return {k: h[k] for k in keys if isinstance(h.get(k), int | float)}
    return {}
