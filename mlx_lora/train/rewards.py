"""GRPO's reward functions: TRL's signature (``prompts``, ``completions``, extra columns as lists →
one float per completion), from ``--reward module:function`` or the built-ins.

Built-ins: ``format`` (the completion matches ``--reward-pattern``, the whole of it), ``json`` (the
completion parses as JSON), ``exact`` (equals the record's ``answer`` column, spaces trimmed),
``numeric`` (the last number in the completion equals ``answer`` as a number). A function that
raises or returns the wrong count fails the run with its name and the record number.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlx_lora.core.errors import MlxLoraError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _answers(kw: dict, name: str) -> list[Any]:
    if "answer" not in kw:
        raise ValueError(f"the {name} reward needs an 'answer' column in the data")
    return kw["answer"]


def format_reward(pattern: str) -> Callable[..., list[float]]:
    rx = re.compile(pattern, re.DOTALL)

    def reward(prompts: list, completions: list[str], **kw: Any) -> list[float]:
        return [1.0 if rx.fullmatch(c.strip()) else 0.0 for c in completions]

    return reward


def json_reward(prompts: list, completions: list[str], **kw: Any) -> list[float]:
    out = []
    for c in completions:
        try:
            json.loads(c)
            out.append(1.0)
        except ValueError:
            out.append(0.0)
    return out


def exact_reward(prompts: list, completions: list[str], **kw: Any) -> list[float]:
    answers = _answers(kw, "exact")
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answers, strict=True)]


def numeric_reward(prompts: list, completions: list[str], **kw: Any) -> list[float]:
    answers = _answers(kw, "numeric")
    out = []
    for c, a in zip(completions, answers, strict=True):
        found = NUMBER.findall(c)
        out.append(float(bool(found) and abs(float(found[-1]) - float(a)) < 1e-9))
    return out


@dataclass(frozen=True)
class Reward:
    name: str
    fn: Callable[..., Any]

    def __call__(self, prompts: list, completions: list[str], extras: dict, record: int) -> list:
        """The function's floats for one group, or a one-line error naming it and the record."""
        cols = {k: [v] * len(completions) for k, v in extras.items()}
        try:
            out = [float(x) for x in self.fn(prompts, completions, **cols)]
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported as its own
            raise MlxLoraError(
                f"reward {self.name} failed on record {record}: {type(e).__name__}: {e}"
            ) from None
        if len(out) != len(completions):
            raise MlxLoraError(
                f"reward {self.name} returned {len(out)} values for {len(completions)} "
                f"completions (record {record})"
            )
        return out


def load_rewards(spec: str, pattern: str) -> list[Reward]:
    """``--reward``: comma-separated built-in names and ``module:function`` references."""
    builtins = {
        "format": format_reward(pattern),
        "json": json_reward,
        "exact": exact_reward,
        "numeric": numeric_reward,
    }
    out = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name in builtins:
            out.append(Reward(name, builtins[name]))
            continue
        module, _, attr = name.partition(":")
        if not attr:
            raise MlxLoraError(
                f"--reward {name}: not a built-in ({', '.join(builtins)}) nor module:function"
            )
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise MlxLoraError(f"--reward {name}: cannot load it ({e})") from None
        out.append(Reward(attr, fn))
    if not out:
        raise MlxLoraError("--method grpo needs at least one --reward")
    return out
