"""TeleportEvents in a loop of one's own: the schedule, teleport data and guard sample, resumable
state, the optimizer-state and failure policies, compute reports, and the refusals."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from torch_teleport import Teleporter, TeleportEvents, TeleportTrainer
from torch_teleport.events import TeleportFailedError
from torch_teleport.plugins.schedules import (
    BudgetSchedule,
    EveryStepsSchedule,
    GainingSchedule,
    OnceSchedule,
)
from torch_teleport.wrappers import StaleShadowError


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(count: int, size: int = 8, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 6, generator=generator),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def recorded(teleporter: Teleporter) -> list[dict]:
    """What each call of ``teleporter.teleport`` was given; the teleport still runs."""
    calls, original = [], teleporter.teleport

    def teleport(inputs, targets, **options):
        calls.append({"inputs": inputs, **options})
        return original(inputs, targets, **options)

    teleporter.teleport = teleport
    return calls


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor
) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()


def test_a_custom_loop_teleports_when_the_schedule_says_and_keeps_its_own_counters():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    events = TeleportEvents(
        Teleporter(model, F.cross_entropy), EveryStepsSchedule(every=5, steps=1)
    )
    teleported = []
    for step, (inputs, targets) in enumerate(batches(10)):
        reports, failures = events.before_step(
            optimizer, epoch=0, step=step, inputs=inputs, targets=targets
        )
        assert failures == []
        teleported += [step] * len(reports)
        train(model, optimizer, inputs, targets)
    assert teleported == [0, 5]
    # the loop's counter decides: asked about step 5 again, the events teleport again
    assert events.before_step(optimizer, epoch=0, step=5, inputs=inputs, targets=targets)[0]


def test_an_event_draws_a_basis_and_a_guard_sample_and_guards_with_the_loss_it_began_with():
    """Each sample joins batches until it holds ``guard_samples``: first the basis sample, whose
    inputs join the core space, then the guard sample, which judges; both are the event's."""
    model = small_mlp()
    teleporter = Teleporter(model, F.cross_entropy)
    calls = recorded(teleporter)
    data = batches(3, size=4)
    events = TeleportEvents(
        teleporter, OnceSchedule(batches=3, steps=2), teleport_data=data, guard_samples=6
    )
    reports, _ = events.before_step(torch.optim.SGD(model.parameters(), lr=0.1), epoch=0, step=0)
    basis = torch.cat([data[0][0], data[1][0]])  # batches joined until 6 samples
    guard = torch.cat([data[2][0], data[0][0]])  # the next ones, the pass begun again
    assert all(torch.equal(call["basis"], basis) for call in calls)
    assert all(torch.equal(call["guard"][0], guard) for call in calls)
    assert [
        torch.equal(c["inputs"], d[0])
        for c, d in zip(calls, [data[1], data[2], data[0]], strict=True)
    ] == [True] * 3
    assert [call["guard_baseline"] for call in calls] == [
        None,
        reports[0].guard_loss_before,
        reports[0].guard_loss_before,
    ]
    assert reports[0].guard_loss_before is not None


def test_an_event_draws_only_the_samples_its_method_takes():
    """Level-set teleport takes no basis sample and honours no guard: its events draw neither."""
    model = small_mlp()
    teleporter = Teleporter(model, F.cross_entropy, method="level_set")
    calls = recorded(teleporter)
    data = batches(3, size=4)
    events = TeleportEvents(teleporter, OnceSchedule(batches=2, steps=1), teleport_data=data, guard_samples=6)
    events.before_step(torch.optim.SGD(model.parameters(), lr=0.1), epoch=0, step=0)
    assert [call.get("basis") for call in calls] == [None, None]
    assert [call.get("guard") for call in calls] == [None, None]
    assert [torch.equal(c["inputs"], d[0]) for c, d in zip(calls, data, strict=False)] == [True] * 2


def shuffled_loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(
        torch.randn(20, 6, generator=generator), torch.randint(0, 3, (20,), generator=generator)
    )
    return DataLoader(
        dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def drawn_events(seed: int) -> tuple[TeleportEvents, list[dict]]:
    """Events drawing six batches a step (a basis and a guard sample of two each, two to teleport
    on) of a pass of five."""
    teleporter = Teleporter(small_mlp(), F.cross_entropy, steps=1)
    schedule = EveryStepsSchedule(every=1, batches=2, steps=1)
    return TeleportEvents(
        teleporter, schedule, teleport_data=shuffled_loader(seed), guard_samples=6
    ), recorded(teleporter)


def drawn(events: TeleportEvents, steps: range, calls: list[dict]) -> list[torch.Tensor]:
    del calls[:]
    optimizer = torch.optim.SGD(events.teleporter.model.parameters(), lr=0.1)
    for step in steps:
        events.before_step(optimizer, epoch=0, step=step)
    return [
        tensor for call in calls for tensor in (call["inputs"], call["basis"], call["guard"][0])
    ]


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), saved_after=st.integers(0, 4))
def test_a_resumed_loop_draws_the_same_teleport_batches(seed, saved_after):
    whole, calls = drawn_events(seed)
    drawn(whole, range(saved_after), calls)
    state = whole.state_dict()
    expected = drawn(whole, range(saved_after, saved_after + 3), calls)

    resumed, resumed_calls = drawn_events(seed)
    resumed.load_state_dict(state)
    got = drawn(resumed, range(saved_after, saved_after + 3), resumed_calls)
    assert len(got) == len(expected) == 18
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def counting_policy() -> tuple[list[list[int]], Callable]:
    """A state policy that records the steps of the reports it is given."""
    calls: list[list[int]] = []
    return calls, lambda optimizer, reports: calls.append([r.steps for r in reports])


@pytest.mark.parametrize("outcome", ["moved", "took no step", "rejected"])
def test_the_state_policy_follows_only_an_event_that_moved_the_weights(outcome):
    model = small_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs, targets = batches(1)[0]
    train(model, optimizer, inputs, targets)
    if outcome == "rejected":
        inputs = inputs.clone()
        inputs[0, 0] = float("nan")
    cap = 1e-6 if outcome == "took no step" else None  # below the starting gradient norm
    calls, policy = counting_policy()
    events = TeleportEvents(
        Teleporter(model, F.cross_entropy), OnceSchedule(batches=2, steps=2, cap=cap), optimizer_state=policy
    )
    before = weights(model)
    skipped = pytest.warns(RuntimeWarning, match="training goes on")
    with skipped if outcome == "rejected" else contextlib.nullcontext():
        reports, failures = events.before_step(
            optimizer, epoch=0, step=0, inputs=inputs, targets=targets
        )
    moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert moved == (outcome == "moved")
    assert calls == ([[2, 2]] if outcome == "moved" else [])
    assert len(failures) == (2 if outcome == "rejected" else 0)


def test_reset_clears_the_optimizer_state_only_after_an_event_that_moved_the_weights():
    model = small_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, optimizer, *batches(1)[0])
    capped = TeleportEvents(
        Teleporter(model, F.cross_entropy),
        OnceSchedule(batches=1, steps=2, cap=1e-6),
        optimizer_state="reset",
    )
    (report,), _ = capped.before_step(
        optimizer, epoch=0, step=0, inputs=batches(1)[0][0], targets=batches(1)[0][1]
    )
    assert report.steps == 0 and len(optimizer.state) == len(list(model.parameters()))
    moving = TeleportEvents(
        Teleporter(model, F.cross_entropy), OnceSchedule(batches=1, steps=2), optimizer_state="reset"
    )
    (report,), _ = moving.before_step(
        optimizer, epoch=0, step=0, inputs=batches(1)[0][0], targets=batches(1)[0][1]
    )
    assert report.steps == 2 and len(optimizer.state) == 0


def rejected_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    inputs, targets = batches(1)[0]
    inputs[0, 0] = float("nan")
    return [(inputs, targets)]


def test_a_skipped_failure_warns_at_the_line_of_the_loop_that_asked():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    events = TeleportEvents(
        Teleporter(model, F.cross_entropy),
        OnceSchedule(batches=1, steps=1),
        teleport_data=rejected_data(),
        guard=False,
    )
    with pytest.warns(RuntimeWarning, match="teleport rejected at step 0") as caught:
        events.before_step(optimizer, epoch=0, step=0)
    trainer = TeleportTrainer(
        model,
        F.cross_entropy,
        optimizer,
        schedule=OnceSchedule(batches=1, steps=1),
        teleport_data=rejected_data(),
        guard=False,
    )
    with pytest.warns(RuntimeWarning, match="teleport rejected at step 0") as through_trainer:
        trainer.step(*batches(1)[0])
    assert [w.filename for w in (*caught, *through_trainer)] == [__file__, __file__]


def test_the_raise_policy_raises_with_the_weights_as_they_were():
    model = small_mlp()
    before = weights(model)
    events = TeleportEvents(
        Teleporter(model, F.cross_entropy),
        OnceSchedule(batches=1, steps=1),
        teleport_data=rejected_data(),
        on_teleport_failure="raise",
    )
    with pytest.raises(TeleportFailedError, match="non-finite"):
        events.before_step(torch.optim.SGD(model.parameters(), lr=0.1), epoch=0, step=0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


class Recording(EveryStepsSchedule):
    def __init__(self) -> None:
        super().__init__(every=3, batches=1, steps=1)
        self.reports: list[tuple[float, float]] = []

    def observe(self, *, train_seconds: float = 0.0, teleport_seconds: float = 0.0) -> None:
        self.reports.append((train_seconds, teleport_seconds))


def test_the_schedule_hears_the_loop_s_training_time_with_the_events_own():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = Recording()
    events = TeleportEvents(Teleporter(model, F.cross_entropy), schedule)
    for step, (inputs, targets) in enumerate(batches(7)):
        events.before_step(optimizer, epoch=0, step=step, inputs=inputs, targets=targets)
        events.observe(train_seconds=0.25)
    assert [train for train, _ in schedule.reports] == [0.25] * 7
    assert [teleport > 0 for _, teleport in schedule.reports] == [
        step % 3 == 0 for step in range(7)
    ]


def test_a_clock_schedule_is_refused_under_data_parallelism(monkeypatch):
    model = small_mlp()
    events = TeleportEvents(
        Teleporter(model, F.cross_entropy), BudgetSchedule(fraction=0.5, warmup=0)
    )
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="BudgetSchedule decides by each process's own clock"):
        events.before_step(torch.optim.SGD(model.parameters(), lr=0.1), epoch=0, step=0)


def test_an_optimizer_that_would_undo_teleports_is_refused_at_the_first_event():
    class Lookahead(torch.optim.SGD):
        """Named as the wrapper that pulls the weights back toward its slow copy."""

    model = small_mlp()
    optimizer = Lookahead(model.parameters(), lr=0.1)
    before = weights(model)
    events = TeleportEvents(
        Teleporter(model, F.cross_entropy), EveryStepsSchedule(every=2, steps=1)
    )
    inputs, targets = batches(1)[0]
    assert events.before_step(optimizer, epoch=0, step=1, inputs=inputs, targets=targets) == (
        [],
        [],
    )
    with pytest.raises(StaleShadowError, match="Lookahead"):
        events.before_step(optimizer, epoch=0, step=2, inputs=inputs, targets=targets)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_missing_data_is_named():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    without = TeleportEvents(Teleporter(model, F.cross_entropy), OnceSchedule(batches=1, steps=1))
    with pytest.raises(
        ValueError, match=r"no teleport_data.*before_step\(\.\.\., inputs=\.\.\., targets=\.\.\.\)"
    ):
        without.before_step(optimizer, epoch=0, step=0)
    empty = TeleportEvents(
        Teleporter(model, F.cross_entropy), OnceSchedule(batches=1, steps=1), teleport_data=[]
    )
    with pytest.raises(ValueError, match="teleport_data yields no batch"):
        empty.before_step(optimizer, epoch=0, step=0)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("guard_samples", 0, "guard_samples must be a positive int"),
        (
            "optimizer_state",
            "clear",
            r"optimizer_state must be one of \('auto', 'keep', 'reset', 'rescale'\) or a callable",
        ),
        ("on_teleport_failure", "ignore", "on_teleport_failure must be one of"),
        ("shadow_policy", "never", "shadow_policy must be one of"),
    ],
)
def test_options_are_checked(option, value, message):
    model = small_mlp()
    with pytest.raises(ValueError, match=message):
        TeleportEvents(Teleporter(model, F.cross_entropy), **{option: value})


def test_events_without_a_schedule_take_the_default_of_their_first_optimizer_and_a_state_loaded_before():
    model = small_mlp()
    events = TeleportEvents(Teleporter(model, F.cross_entropy), teleport_data=batches(2))
    assert events.schedule is None
    events.load_state_dict({"schedule": {"misses": 1}, "teleport_pass": None})
    assert events.state_dict()["schedule"] == {"misses": 1}
    assert events.before_step(torch.optim.SGD(model.parameters(), lr=0.1), epoch=0, step=1) == ([], [])
    assert isinstance(events.schedule, GainingSchedule) and events.schedule.misses == 1

    adam = TeleportEvents(Teleporter(model, F.cross_entropy), teleport_data=batches(2))
    reports, _ = adam.before_step(torch.optim.Adam(model.parameters()), epoch=0, step=0)
    assert isinstance(adam.schedule, OnceSchedule) and len(reports) == 1
