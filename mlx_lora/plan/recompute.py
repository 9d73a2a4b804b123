"""``--gradient-checkpointing auto``: recompute activations only when the run would not fit without.

Checkpointing trades a third more compute for activation memory. The seed turned it on always; on
a machine where the run fits anyway that is pure loss. The memory plan (:mod:`mlx_lora.plan.memory`)
predicts the run's peak both ways against the machine's memory (its one budget reader); ``auto``
turns checkpointing on only when the peak without it does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_lora.core.units import human_bytes as gb
from mlx_lora.plan.memory import MARGIN


@dataclass(frozen=True)
class Decision:
    on: bool
    reason: str  # one clause for the start-up summary


def decide(setting: bool | None, plan: Any) -> Decision:
    """Checkpointing on or off, and why. ``setting``: True/False (explicit) or None (auto);
    ``plan``: the run's :class:`mlx_lora.plan.memory.Plan`."""
    if setting is not None:
        return Decision(setting, "on (as asked)" if setting else "off (as asked)")

    need = plan.peak_bytes(checkpointing=False) * (1 + MARGIN)
    have = plan.budget.bytes
    where = f"{gb(have)} {plan.budget.source}" if have is not None else plan.budget.source
    if plan.checkpointing:  # the plan's own auto rule: on when the run does not fit without
        return Decision(True, f"on (auto: the run would need about {gb(need)} without it, {where})")
    return Decision(False, f"off (auto: the run needs about {gb(need)} without it, {where})")
