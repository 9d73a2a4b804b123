"""The event stream a training run feeds the studio, and where it comes from today.

The studio consumes **events**: JSON objects, one per line, UTF-8. This is the whole contract a
run has to meet for the Watch tab (the studio starts runs with ``MLX_LORA_EVENTS=jsonl`` in the
environment; a run that honours it prints these lines on stdout, anything else it prints is shown
as log text):

``{"event": "start", "step": 0, "total_steps": 200, "steps_per_epoch": 34}``
    once the schedule is known (``step`` > 0 when resuming; ``"resumed_from": "OUT/checkpoint-20"``)
``{"event": "step", "step": 12, "total_steps": 200, "loss": 7.71, "tokens_per_second": 2148.0,
"peak_memory_gb": 0.007, "elapsed_s": 1.0, "eta_s": 16.0}``
    after optimizer steps (throttled, at most a few per second); ``loss`` is that step's loss
``{"event": "log", "step": 10, "loss": 7.86, "grad_norm": 2.5, "learning_rate": 7e-05,
"epoch": 0.29}``
    every ``--logging-steps``: the record that also goes into ``trainer_state.json``'s log_history
``{"event": "eval", "step": 20, "eval_loss": 7.05, "epoch": 0.59}``
    after each evaluation
``{"event": "end", "status": "finished" | "interrupted" | "error", "message": "..."}``
    last line; ``message`` is the one-line ``error: …`` / ``interrupted: saved …`` text
``{"event": "text", "text": "..."}``
    any other line for the log panel

Until ``mlx_lora.train`` emits these itself (its console output is moving into
``mlx_lora.report``), :class:`ConsoleTranslator` derives exactly these events from the console
output it prints now: the seed-format dict lines, the tqdm bar's counters and postfix, the schedule
line and the final ``error:`` / ``interrupted:`` line. Lines that already are events pass through
unchanged, so the studio needs no change when the run starts emitting them.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

EVENTS_ENV = "MLX_LORA_EVENTS"

_SCHEDULE = re.compile(r"schedule: (\d+) steps/epoch, (\d+) steps")
_RESUME = re.compile(r"resuming from (.+) \(step (\d+)\)")
_BAR = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)(?:,\s*([^\]]*))?\]")
_PROGRESS = re.compile(r"(\d+)%\|")
_SIZE = re.compile(r"([\d.]+)\s*(B|KB|MB|GB|TB)")
_UNITS = {"B": 1e-9, "KB": 1e-6, "MB": 1e-3, "GB": 1.0, "TB": 1e3}


def _seconds(clock: str) -> float | None:
    """tqdm's ``MM:SS`` / ``H:MM:SS`` as seconds (None for ``?``)."""
    if not clock or "?" in clock:
        return None
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + float(part)
    return total


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


class ConsoleTranslator:
    """Events from the human console output of ``python -m mlx_lora.train`` (stdout + stderr).

    ``feed`` takes raw text as it arrives (tqdm redraws with ``\\r``), returns the events of every
    complete line. The step of a seed-format log line is its epoch × steps per epoch (the line has
    no step), which is exact for any realistic epoch length.
    """

    def __init__(self) -> None:
        self.pending = ""
        self.steps_per_epoch: int | None = None
        self.total_steps: int | None = None
        self.step = 0

    def feed(self, text: str, final: bool = False) -> list[dict]:
        buf = (self.pending + text).replace("\r\n", "\n")
        parts = re.split(r"[\r\n]", buf)
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
        if line.startswith("{'"):
            return self._record(line)
        bar = _BAR.search(line)
        if bar and "|" in line[: bar.start() + 1]:
            return [self._bar(bar)]
        if (bar_pct := _PROGRESS.search(line)) and bar_pct[1] != "100":
            return []  # other progress bars (GGUF writing): only their final state is news
        if line.startswith("error: "):
            return [{"event": "end", "status": "error", "message": line[len("error: ") :]}]
        if line.startswith("interrupted"):
            return [{"event": "end", "status": "interrupted", "message": line}]
        events: list[dict] = [{"event": "text", "text": raw.rstrip()}]  # tables keep their indent
        if m := _SCHEDULE.search(line):
            self.steps_per_epoch, self.total_steps = int(m[1]), int(m[2])
            events.append(
                {
                    "event": "start",
                    "step": self.step,
                    "total_steps": self.total_steps,
                    "steps_per_epoch": self.steps_per_epoch,
                }
            )
        elif m := _RESUME.search(line):
            self.step = int(m[2])
            events.append({"event": "resume", "step": self.step, "resumed_from": m[1]})
        return events

    def _bar(self, m: re.Match) -> dict:
        self.step = int(m[1])
        event: dict[str, Any] = {
            "event": "step",
            "step": self.step,
            "total_steps": int(m[2]),
            "elapsed_s": _seconds(m[3]),
            "eta_s": _seconds(m[4]),
        }
        for item in (m[5] or "").split(", "):
            key, _, value = item.partition("=")
            if key == "loss":
                event["loss"] = _number(value)
            elif key == "tok_s":
                event["tokens_per_second"] = _number(value)
            elif key == "mem" and (size := _SIZE.search(value)):
                event["peak_memory_gb"] = float(size[1]) * _UNITS[size[2]]
        return event

    def _record(self, line: str) -> list[dict]:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            return [{"event": "text", "text": line}]
        if not isinstance(record, dict):
            return [{"event": "text", "text": line}]
        text = {"event": "text", "text": line}
        epoch = record.get("epoch")
        step = self.step
        if self.steps_per_epoch and isinstance(epoch, int | float):
            step = round(epoch * self.steps_per_epoch)
        if "train_runtime" in record:
            return [text]
        if "eval_loss" in record:
            return [text, {"event": "eval", "step": step, **record}]
        if "loss" in record:
            return [text, {"event": "log", "step": step, **record}]
        return [text]


# ---------------------------------------------------------------- earlier runs, from disk


def _read_state(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def run_state(out: Path) -> dict | None:
    """The newest ``trainer_state.json`` of a run: the final one, or its latest checkpoint's."""
    from mlx_lora.train import STATE_FILE, checkpoints

    candidates = [out / STATE_FILE] + [c / STATE_FILE for c in reversed(checkpoints(out))]
    best = None
    for path in candidates:
        state = _read_state(path) if path.is_file() else None
        if state is not None and (
            best is None or state.get("global_step", 0) > best["global_step"]
        ):
            best = {**state, "global_step": state.get("global_step", 0)}
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
