"""The built-in schedules plan teleports when they should, and resume from their state."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torch_teleport import TeleportPlan, default_registry
from torch_teleport.plugins.schedules import EpochSchedule, EveryStepsSchedule


def timeline(
    schedule, epochs: int, steps_per_epoch: int, first_epoch: int = 0
) -> list[tuple[int, int, TeleportPlan]]:
    """Ask ``schedule`` before every step, as the trainer does; ``(epoch, step, plan)`` of each teleport."""
    events = []
    for epoch in range(first_epoch, epochs):
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            plan = schedule.plan(epoch=epoch, step=step)
            if plan is not None:
                events.append((epoch, step, plan))
    return events


def test_epoch_schedule_teleports_at_the_start_of_each_listed_epoch():
    schedule = EpochSchedule(epochs=(0, 2, 3), batches=4, steps=3, cap=10.0)
    events = timeline(schedule, epochs=5, steps_per_epoch=5)
    assert [(epoch, step) for epoch, step, _ in events] == [(0, 0), (2, 10), (3, 15)]
    assert all(plan == TeleportPlan(batches=4, steps=3, cap=10.0) for _, _, plan in events)


def test_epoch_schedule_waits_for_the_warmup():
    schedule = EpochSchedule(epochs=(0, 1, 3), warmup=7)
    events = timeline(schedule, epochs=5, steps_per_epoch=5)
    # epoch 0 (steps 0-4) lies wholly in the warm-up; epoch 1 teleports at its first step after it
    assert [(epoch, step) for epoch, step, _ in events] == [(1, 7), (3, 15)]


@given(
    epochs=st.frozensets(st.integers(0, 7), max_size=8),
    warmup=st.integers(0, 30),
    steps_per_epoch=st.integers(1, 6),
)
def test_epoch_schedule_teleports_once_in_each_epoch_of_k(epochs, warmup, steps_per_epoch):
    events = timeline(
        EpochSchedule(epochs=epochs, warmup=warmup), epochs=8, steps_per_epoch=steps_per_epoch
    )
    expected = [
        (epoch, max(epoch * steps_per_epoch, warmup))
        for epoch in sorted(epochs)
        if (epoch + 1) * steps_per_epoch > warmup
    ]
    assert [(epoch, step) for epoch, step, _ in events] == expected


def test_epoch_schedule_resumes_from_its_state():
    schedule = EpochSchedule(epochs=(0, 1, 2))
    assert timeline(schedule, epochs=1, steps_per_epoch=4)  # epoch 0 done
    resumed = EpochSchedule(epochs=(0, 1, 2))
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.state_dict() == schedule.state_dict() == {"done": [0]}
    # resuming mid-epoch 0 does not teleport again; epochs 1 and 2 still do
    assert resumed.plan(epoch=0, step=2) is None
    assert [(epoch, step) for epoch, step, _ in timeline(resumed, 3, 4, first_epoch=1)] == [
        (1, 4),
        (2, 8),
    ]


@given(every=st.integers(1, 7), warmup=st.integers(0, 20))
def test_every_steps_schedule(every, warmup):
    schedule = EveryStepsSchedule(every=every, batches=2, steps=3, warmup=warmup)
    events = timeline(schedule, epochs=1, steps_per_epoch=60)
    assert [step for _, step, _ in events] == list(range(warmup, 60, every))
    assert all(plan == TeleportPlan(batches=2, steps=3) for _, _, plan in events)


def test_every_steps_schedule_is_stateless():
    schedule = EveryStepsSchedule(every=3)
    assert schedule.state_dict() == {}
    EveryStepsSchedule(every=3).load_state_dict(schedule.state_dict())
    with pytest.raises(ValueError, match="keeps no state"):
        schedule.load_state_dict({"done": [0]})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EveryStepsSchedule(every=0), "every must be at least 1"),
        (lambda: EveryStepsSchedule(batches=0), "at least one batch and one step"),
        (lambda: EpochSchedule(steps=0), "at least one batch and one step"),
    ],
)
def test_bad_schedule_options(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_schedules_are_registered_by_name():
    registry = default_registry()
    assert registry.get("schedule", "epochs") is EpochSchedule
    assert registry.get("schedule", "every") is EveryStepsSchedule
