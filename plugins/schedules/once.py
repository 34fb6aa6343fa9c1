"""One teleport event, before a given step."""

from __future__ import annotations

from torch_teleport import Schedule, TeleportPlan, hookimpl


class OnceSchedule(Schedule):
    """One event of ``batches`` x ``steps`` before optimizer step ``at`` (default: the first), each
    batch of at least ``samples`` samples when given."""

    def __init__(self, at: int = 0, batches: int = 1, steps: int = 8, cap: float | None = None, samples: int | None = None) -> None:
        if at < 0:
            raise ValueError(f"at must be a step count (at least 0), got {at}")
        self.at = int(at)
        self.template = TeleportPlan(batches, steps, cap, samples)

    def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
        return self.template if step == self.at else None


@hookimpl
def teleport_register_schedules(registry) -> None:
    registry.add_schedule("once", OnceSchedule)
