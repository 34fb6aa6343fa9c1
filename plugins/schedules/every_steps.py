"""A teleport every N training steps."""

from __future__ import annotations

from torch_teleport import Schedule, TeleportPlan, hookimpl


class EveryStepsSchedule(Schedule):
    """Teleport before every ``every``-th step once ``warmup`` steps have passed: ``batches`` x
    ``steps``, each batch of at least ``samples`` samples when given."""

    def __init__(
        self,
        every: int = 100,
        batches: int = 1,
        steps: int = 8,
        cap: float | None = None,
        warmup: int = 0,
        samples: int | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = int(every)
        self.template = TeleportPlan(batches, steps, cap, samples)
        self.warmup = int(warmup)

    def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
        if step < self.warmup or (step - self.warmup) % self.every:
            return None
        return self.template


@hookimpl
def teleport_register_schedules(registry) -> None:
    registry.add_schedule("every", EveryStepsSchedule)
