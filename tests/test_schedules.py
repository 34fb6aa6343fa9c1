"""The built-in schedules plan teleports when they should, and resume from their state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from torch_teleport import TeleportPlan, TeleportReport, TeleportTrainer, default_registry
from torch_teleport.plugins.schedules import (
    BudgetSchedule,
    EpochSchedule,
    EveryStepsSchedule,
    GainingSchedule,
    OnceSchedule,
    SpikeSchedule,
)


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
        (lambda: EveryStepsSchedule(batches=0), "at least one batch, one step"),
        (lambda: EpochSchedule(steps=0), "at least one batch, one step"),
    ],
)
def test_bad_schedule_options(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_schedules_are_registered_by_name():
    registry = default_registry()
    assert registry.get("schedule", "epochs") is EpochSchedule
    assert registry.get("schedule", "every") is EveryStepsSchedule
    assert registry.get("schedule", "once") is OnceSchedule
    assert registry.get("schedule", "spike") is SpikeSchedule


@given(at=st.integers(0, 25))
def test_the_once_schedule_teleports_before_one_step_only(at):
    events = timeline(OnceSchedule(at=at, batches=2, steps=3), epochs=3, steps_per_epoch=10)
    assert [(step, plan) for _, step, plan in events] == [(at, TeleportPlan(batches=2, steps=3))]
    assert OnceSchedule().state_dict() == {}
    with pytest.raises(ValueError, match="at must be a step count"):
        OnceSchedule(at=-1)


def test_the_budget_schedule_keeps_teleports_under_their_share_of_training_time():
    schedule = BudgetSchedule(fraction=0.1, warmup=1)
    assert schedule.plan(epoch=0, step=0) is None  # warm-up: nothing measured yet
    schedule.observe(train_seconds=1.0)
    assert schedule.plan(epoch=0, step=1) is not None  # 0 <= 0.1 * 1
    schedule.observe(train_seconds=1.0, teleport_seconds=0.5)  # the teleport cost 0.5 s
    assert schedule.plan(epoch=0, step=2) is None  # 0.5 > 0.1 * 2
    for _ in range(3):
        schedule.observe(train_seconds=1.0)
    assert schedule.plan(epoch=0, step=5) is not None  # 0.5 <= 0.1 * 5: paid back
    restored = BudgetSchedule(fraction=0.1)
    restored.load_state_dict(schedule.state_dict())
    assert (restored.train_seconds, restored.teleport_seconds) == (5.0, 0.5)
    with pytest.raises(ValueError, match="fraction must lie in"):
        BudgetSchedule(fraction=1.5)


class Recording(EveryStepsSchedule):
    """Every third step, and a log of what the trainer reports after each step."""

    def __init__(self) -> None:
        super().__init__(every=3, batches=1, steps=2)
        self.reports: list[tuple[float, float]] = []

    def observe(self, *, train_seconds: float = 0.0, teleport_seconds: float = 0.0) -> None:
        self.reports.append((train_seconds, teleport_seconds))


def test_the_trainer_reports_its_time_to_the_schedule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    data = [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(3)]
    schedule = Recording()
    trainer = TeleportTrainer(
        model, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
        schedule=schedule, teleport_data=data,
    )
    results = [trainer.step(*data[i % 3]) for i in range(7)]
    assert len(schedule.reports) == 7 and all(train > 0 for train, _ in schedule.reports)
    # teleport time is reported exactly for the steps that teleported (0, 3, 6)
    assert [teleport > 0 for _, teleport in schedule.reports] == [bool(r.teleports) for r in results]
    assert [bool(r.teleports) for r in results] == [True, False, False, True, False, False, True]


def _report(gain: float, rolled_back: bool = False) -> TeleportReport:
    return TeleportReport(1.0, 1.0, 1.0, gain, 0.5, 0.5 * gain**2, 8, "steps", rolled_back=rolled_back)


def test_the_gaining_schedule_teleports_every_n_steps_until_teleports_stop_gaining():
    schedule = GainingSchedule(every=3, min_gain=1.5, patience=2, warmup=1)
    planned = [step for step in range(10) if schedule.plan(epoch=0, step=step)]
    assert planned == [1, 4, 7]
    schedule.outcome([_report(1.2), _report(1.3)])  # the geometric mean 1.25 does not gain
    assert schedule.plan(epoch=0, step=10) is not None
    schedule.outcome([_report(4.0), _report(1.0)])  # 2.0: it gains, the count starts again
    schedule.outcome([_report(9.0, rolled_back=True)])  # a rolled-back teleport moved nothing
    assert schedule.plan(epoch=0, step=13) is not None
    schedule.outcome([])
    assert schedule.stopped and schedule.plan(epoch=0, step=16) is None
    resumed = GainingSchedule(every=3, min_gain=1.5, patience=2, warmup=1)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.stopped


@pytest.mark.parametrize("options", [{"every": 0}, {"patience": 0}, {"min_gain": 0.9}, {"samples": 0}])
def test_the_gaining_schedule_refuses_options_that_cannot_work(options):
    with pytest.raises(ValueError, match="at least"):
        GainingSchedule(**options)


def drive(schedule, losses) -> list[int]:
    """Ask ``schedule`` before each step, then tell it the step's loss, as the trainer does; the
    steps it teleported before."""
    planned = []
    for step, loss in enumerate(losses):
        if schedule.plan(epoch=0, step=step) is not None:
            planned.append(step)
        schedule.observe_loss(loss)
    return planned


FALLING = [1.0 / (1 + step) for step in range(40)]
"""A loss that keeps falling: the lowest 4-step mean falls with it, 0.0257 after step 39."""


def test_the_spike_schedule_teleports_once_the_windowed_loss_reaches_factor_times_its_lowest():
    schedule = SpikeSchedule(factor=2.0, window=4, cooldown=10, batches=2, steps=3)
    assert drive(schedule, FALLING) == []
    # Steps 40-42 jump to 0.5: after step 40 the window (1/38, 1/39, 1/40, 0.5) means 0.144, over
    # twice 0.0257, so the teleport comes before step 41; the loss is back by step 43 and the
    # window holds none of the spike when the cooldown ends (step 50).
    spiking = FALLING + [0.5] * 3 + [0.02] * 20
    schedule = SpikeSchedule(factor=2.0, window=4, cooldown=10, batches=2, steps=3)
    assert drive(schedule, spiking) == [41]
    assert SpikeSchedule(window=4, cooldown=10).template == TeleportPlan(1, 8)
    # A loss that stays high teleports once per cooldown.
    assert drive(SpikeSchedule(factor=2.0, window=4, cooldown=10), FALLING + [0.5] * 25) == [41, 51, 61]
    # Below the factor, nothing: 0.0257 -> a window mean under 0.0514.
    assert drive(SpikeSchedule(factor=2.0, window=4, cooldown=10), FALLING + [0.04] * 25) == []


def test_the_spike_schedule_does_not_count_non_finite_losses():
    with_nan = list(FALLING)
    with_nan[20] = float("nan")
    with_nan[30] = float("inf")
    tail = [0.5] * 3 + [0.02] * 20
    clean = FALLING[:20] + FALLING[21:30] + FALLING[31:]
    # (the two skipped steps still count towards the cooldown, which has long passed)
    assert drive(SpikeSchedule(window=4, cooldown=10), with_nan + tail) == [41]
    assert drive(SpikeSchedule(window=4, cooldown=10), clean + tail) == [39]


@given(
    losses=st.lists(st.floats(0.01, 10.0), max_size=60),
    split=st.integers(0, 60),
    window=st.integers(1, 6),
    cooldown=st.integers(0, 12),
)
def test_the_spike_schedule_resumes_from_its_state(losses, split, window, cooldown):
    whole = drive(SpikeSchedule(factor=1.5, window=window, cooldown=cooldown), losses)
    first = SpikeSchedule(factor=1.5, window=window, cooldown=cooldown)
    planned = drive(first, losses[:split])
    resumed = SpikeSchedule(factor=1.5, window=window, cooldown=cooldown)
    resumed.load_state_dict(first.state_dict())
    planned += [split + step for step in drive(resumed, losses[split:])]
    assert planned == whole


@pytest.mark.parametrize("options", [{"factor": 1.0}, {"window": 0}, {"cooldown": -1}, {"steps": 0}])
def test_the_spike_schedule_refuses_options_that_cannot_work(options):
    with pytest.raises(ValueError, match="must exceed 1|at least"):
        SpikeSchedule(**options)


class HearingLoss(EveryStepsSchedule):
    """Never teleports; logs the losses it hears (``hears``: whether it asks for them)."""

    def __init__(self, hears: bool) -> None:
        super().__init__(every=10**9, warmup=10**9)
        self.hears_loss, self.heard = hears, []

    def observe_loss(self, loss: float) -> None:
        self.heard.append(loss)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_the_trainer_tells_a_schedule_that_hears_the_loss_each_optimizer_step_s_mean_loss(accumulation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    data = [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(6)]
    for hears in (True, False):
        schedule = HearingLoss(hears)
        trainer = TeleportTrainer(
            model, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
            schedule=schedule, accumulation_steps=accumulation,
        )
        losses = [trainer.step(*batch).loss for batch in data]
        windows = [losses[i : i + accumulation] for i in range(0, len(losses), accumulation)]
        expected = [sum(window) / accumulation for window in windows] if hears else []
        assert schedule.heard == pytest.approx(expected, rel=1e-15)
