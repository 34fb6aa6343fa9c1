"""A teleport when the training loss spikes."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from torch_teleport import Schedule, TeleportPlan, hookimpl


class SpikeSchedule(Schedule):
    """One teleport when the training loss spikes: its mean over the last ``window`` optimizer
    steps reaches ``factor`` times the lowest such mean so far.

    At a rate near the edge of stability the loss can jump by a large factor and take many steps
    to come back; a teleport that stabilises (descending the sharpness,
    :class:`~torch_teleport.objectives.sharpness.Sharpness` ``(direction="descend")``) moves to a
    flatter point of the same loss, where the rate may be stable again. Each event is ``batches``
    x ``steps`` (each batch of at least ``samples`` samples when given); ``cooldown`` optimizer
    steps pass between two events, so a loss that stays high costs one event per ``cooldown``
    steps at most. The loop reports each step's loss
    (:meth:`TeleportEvents.observe <torch_teleport.TeleportEvents.observe>`; the trainer and the
    Lightning callback do it); non-finite losses are not counted. Decided on those losses (the
    ranks' mean under data parallelism) and counted in steps, so data-parallel ranks agree.
    """

    hears_loss = True

    def __init__(
        self,
        factor: float = 2.0,
        window: int = 25,
        cooldown: int = 100,
        batches: int = 1,
        steps: int = 8,
        samples: int | None = None,
        cap: float | None = None,
    ) -> None:
        if not factor > 1 or window < 1 or cooldown < 0:
            raise ValueError(
                f"factor must exceed 1, window be at least 1 and cooldown at least 0, got {factor}, {window}, {cooldown}"
            )
        self.factor, self.window, self.cooldown = float(factor), int(window), int(cooldown)
        self.template = TeleportPlan(batches, steps, cap, samples)
        self.recent: deque[float] = deque(maxlen=self.window)
        self.lowest = math.inf  # the lowest mean of a full window so far
        self.since = self.cooldown  # steps observed since the last event
        self.pending = False  # a spike seen, its event not yet planned

    def observe_loss(self, loss: float) -> None:
        self.since += 1
        if not math.isfinite(loss):
            return
        self.recent.append(float(loss))
        if len(self.recent) < self.window:
            return
        mean = sum(self.recent) / self.window
        self.lowest = min(self.lowest, mean)
        if mean >= self.factor * self.lowest and self.since >= self.cooldown:
            self.pending = True

    def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
        if not self.pending:
            return None
        self.pending, self.since = False, 0
        return self.template

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "lowest": self.lowest, "since": self.since, "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque((float(v) for v in state["recent"]), maxlen=self.window)
        self.lowest, self.since, self.pending = float(state["lowest"]), int(state["since"]), bool(state["pending"])


@hookimpl
def teleport_register_schedules(registry) -> None:
    registry.add_schedule("spike", SpikeSchedule)
