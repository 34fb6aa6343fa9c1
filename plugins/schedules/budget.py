"""Teleports paced by their cost: at most a fraction of the training time."""

from __future__ import annotations

from typing import Any

from torch_teleport import Schedule, TeleportPlan, hookimpl


class BudgetSchedule(Schedule):
    """Teleport whenever doing so keeps teleport time under ``fraction`` of training time.

    The seconds spent in training steps and in teleports are reported after every step
    (:meth:`Schedule.observe`; the trainer and the Lightning callback do it, a loop of your own
    calls ``TeleportEvents.observe(train_seconds=...)``). Before each step, if the teleports
    so far have cost at most ``fraction`` of the training so far (and ``warmup`` steps have
    passed), one teleport of ``batches`` x ``steps`` is planned; a costly teleport is thus
    paid back by the steps after it before the next one runs.

    Its decisions follow the measured time, so they differ from run to run and from process
    to process: under data parallelism use a step-based schedule (``TeleportEvents`` refuses this
    one there, since ranks could disagree on whether to teleport).
    """

    measures_time = True

    def __init__(
        self, fraction: float = 0.1, batches: int = 1, steps: int = 8, cap: float | None = None, warmup: int = 1
    ) -> None:
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
        self.fraction = float(fraction)
        self.template = TeleportPlan(batches, steps, cap)
        self.warmup = int(warmup)
        self.train_seconds = 0.0
        self.teleport_seconds = 0.0

    def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
        if step < self.warmup or self.teleport_seconds > self.fraction * self.train_seconds:
            return None
        return self.template

    def observe(self, *, train_seconds: float = 0.0, teleport_seconds: float = 0.0) -> None:
        self.train_seconds += train_seconds
        self.teleport_seconds += teleport_seconds

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds, "teleport_seconds": self.teleport_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_seconds = float(state["train_seconds"])
        self.teleport_seconds = float(state["teleport_seconds"])


@hookimpl
def teleport_register_schedules(registry) -> None:
    registry.add_schedule("budget", BudgetSchedule)
