"""The paper's schedule: one teleport at the start of each epoch of a set."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch_teleport import Schedule, TeleportPlan, hookimpl


class EpochSchedule(Schedule):
    """Teleport once at the start of each epoch in ``epochs`` (the paper's K).

    ``batches`` x ``steps`` per teleport (32 x 8 in the paper), each batch of
    at least ``samples`` samples when given (see :class:`~torch_teleport.TeleportPlan`);
    no teleport before global step ``warmup`` (40 for the paper's CNNs): an
    epoch in K whose start falls in the warm-up teleports at its first step after it.
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
        samples: int | None = None,
    ) -> None:
        self.epochs = frozenset(int(e) for e in epochs)
        self.template = TeleportPlan(batches, steps, cap, samples)
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


@hookimpl
def teleport_register_schedules(registry) -> None:
    registry.add_schedule("epochs", EpochSchedule)
