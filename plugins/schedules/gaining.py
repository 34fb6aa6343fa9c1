"""Teleport every N steps for as long as teleports gain."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch_teleport import Schedule, TeleportPlan, TeleportReport, hookimpl


class GainingSchedule(Schedule):
    """One teleport event before every ``every``-th optimizer step, until teleports stop gaining.

    Each event is ``batches`` x ``steps`` (each batch of at least ``samples``
    samples when given). An event *gains* when the geometric mean of its
    teleports' gradient-norm gains (after / before, on their batches) is at
    least ``min_gain``; after ``patience`` events in a row that did not, the
    schedule teleports no more. Counted in steps and decided on the global
    batch's figures, so data-parallel ranks agree.
    """

    def __init__(
        self,
        every: int = 500,
        batches: int = 1,
        steps: int = 8,
        samples: int | None = None,
        min_gain: float = 1.5,
        patience: int = 2,
        warmup: int = 0,
        cap: float | None = None,
    ) -> None:
        if every < 1 or patience < 1 or not min_gain >= 1:
            raise ValueError(
                f"every and patience must be at least 1 and min_gain at least 1, got {every}, {patience}, {min_gain}"
            )
        self.every, self.min_gain, self.patience, self.warmup = int(every), float(min_gain), int(patience), int(warmup)
        self.template = TeleportPlan(batches, steps, cap, samples)
        self.misses = 0  # events in a row that did not gain

    @property
    def stopped(self) -> bool:
        return self.misses >= self.patience

    def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
        if self.stopped or step < self.warmup or (step - self.warmup) % self.every:
            return None
        return self.template

    def outcome(self, reports: Sequence[TeleportReport]) -> None:
        gains = [r.gain for r in reports if r.grad_norm_before > 0 and not r.rolled_back]
        gain = math.exp(sum(math.log(g) for g in gains) / len(gains)) if gains else 1.0
        self.misses = 0 if gain >= self.min_gain else self.misses + 1

    def state_dict(self) -> dict[str, Any]:
        return {"misses": self.misses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.misses = int(state["misses"])


@hookimpl
def teleport_register_schedules(registry) -> None:
    registry.add_schedule("gaining", GainingSchedule)
