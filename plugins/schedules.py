"""The built-in schedules: the paper's epoch set, and every N steps."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch_teleport import Schedule, TeleportPlan, hookimpl


class EpochSchedule(Schedule):
    """Teleport once at the start of each epoch in ``epochs`` (the paper's K).

    ``batches`` x ``steps`` per teleport (32 x 8 in the paper); no teleport
    before global step ``warmup`` (40 for the paper's CNNs): an epoch in K
    whose start falls in the warm-up teleports at its first step after it.
    ``EpochSchedule()`` is the schedule :class:`~torch_teleport.TeleportTrainer`
    uses when it teleports without one.
    """

    def __init__(
        self,
        epochs: Iterable[int] = (0, 1, 2, 3, 4),
        batches: int = 32,
        steps: int = 8,
        cap: float | None = None,
        warmup: int = 0,
    ) -> None:
        self.epochs = frozenset(int(e) for e in epochs)
        self.template = TeleportPlan(batches, steps, cap)
        self.warmup = int(warmup)
        self.done: set[int] = set()

    def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
        if epoch not in self.epochs or epoch in self.done or step < self.warmup:
            return None
        self.done.add(epoch)
        return self.template

    def state_dict(self) -> dict[str, Any]:
        return {"done": sorted(self.done)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = set(state["done"])


class EveryStepsSchedule(Schedule):
    """Teleport before every ``every``-th step once ``warmup`` steps have passed."""

    def __init__(
        self, every: int = 100, batches: int = 1, steps: int = 8, cap: float | None = None, warmup: int = 0
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = int(every)
        self.template = TeleportPlan(batches, steps, cap)
        self.warmup = int(warmup)

    def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
        if step < self.warmup or (step - self.warmup) % self.every:
            return None
        return self.template


class BudgetSchedule(Schedule):
    """Teleport whenever doing so keeps teleport time under ``fraction`` of training time.

    The trainer reports the seconds it spends in training steps and in teleports after
    every step (:meth:`Schedule.observe`; with ``scheduled_teleports`` in a loop of your own,
    call ``schedule.observe(train_seconds=...)`` yourself). Before each step, if the teleports
    so far have cost at most ``fraction`` of the training so far (and ``warmup`` steps have
    passed), one teleport of ``batches`` x ``steps`` is planned; a costly teleport is thus
    paid back by the steps after it before the next one runs.

    Its decisions follow the measured time, so they differ from run to run and from process
    to process: under data parallelism use a step-based schedule (the trainer refuses this
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
    registry.add_schedule("epochs", EpochSchedule)
    registry.add_schedule("every", EveryStepsSchedule)
    registry.add_schedule("budget", BudgetSchedule)
