"""TeleportTrainer: optimizer-state policy, Parameter identity, LR scheduler and resumable state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_teleport import Teleporter, TeleportReport, TeleportTrainer
from torch_teleport.plugins.schedules import EpochSchedule, EveryStepsSchedule


def setup(optimizer_state="reset", schedule=None):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = TeleportTrainer(
        model,
        nn.functional.cross_entropy,
        optimizer,
        teleporter=Teleporter(model, nn.functional.cross_entropy, steps=2),
        schedule=schedule or EveryStepsSchedule(every=10, batches=2, steps=2, warmup=1),
        optimizer_state=optimizer_state,
    )
    return model, optimizer, trainer


def batches(count: int, size: int = 8):
    generator = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(size, 6, generator=generator),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def adam_steps(optimizer, param) -> int:
    return int(optimizer.state[param]["step"])


def test_reset_clears_the_optimizer_state_at_a_teleport():
    model, optimizer, trainer = setup("reset")
    first, second = batches(2)
    assert trainer.step(*first).teleports == []
    assert adam_steps(optimizer, model[2].weight) == 1
    result = trainer.step(*second)  # step 1: teleport (warmup=1), then the optimizer step
    assert len(result.teleports) == 2 and all(r.steps == 2 for r in result.teleports)
    assert adam_steps(optimizer, model[2].weight) == 1  # the moments restarted after the teleport


def test_keep_leaves_the_optimizer_state_alone():
    model, optimizer, trainer = setup("keep")
    first, second = batches(2)
    trainer.step(*first)
    moment = optimizer.state[model[2].weight]["exp_avg"].clone()
    result = trainer.step(*second)
    assert len(result.teleports) == 2
    assert adam_steps(optimizer, model[2].weight) == 2
    assert not torch.equal(optimizer.state[model[2].weight]["exp_avg"], moment)


def test_a_callable_policy_gets_the_optimizer_and_the_reports():
    calls = []
    model, optimizer, trainer = setup(lambda opt, reports: calls.append((opt, reports)))
    for inputs, targets in batches(3):
        trainer.step(inputs, targets)
    assert len(calls) == 1
    optimizer_seen, reports = calls[0]
    assert optimizer_seen is optimizer
    assert len(reports) == 2 and all(isinstance(r, TeleportReport) for r in reports)
    assert adam_steps(optimizer, model[2].weight) == 3


def test_teleport_in_training_keeps_the_parameter_objects():
    model, optimizer, trainer = setup("keep")
    params = list(model.parameters())
    storages = [p.data_ptr() for p in params]
    first, second = batches(2)
    trainer.step(*first)
    before = model[2].weight.detach().clone()
    report = trainer.teleporter.teleport(*second, steps=2)
    assert report.steps == 2 and not torch.equal(model[2].weight, before)
    trainer.step(*second)
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(a is b for a, b in zip(grouped, params, strict=True))
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert [p.data_ptr() for p in params] == storages


def test_trainer_state_round_trip_and_lr_scheduler():
    schedule = EpochSchedule(epochs=(0, 1), batches=1, steps=2)
    model, optimizer, trainer = setup("reset", schedule)
    trainer.lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    data = batches(3)
    teleports = [len(trainer.step(*batch).teleports) for batch in data]
    trainer.end_epoch()
    assert teleports == [1, 0, 0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    state = trainer.state_dict()
    assert (state["epoch"], state["global_step"], state["schedule"]) == (1, 3, {"done": [0]})

    _, _, resumed = setup("reset", EpochSchedule(epochs=(0, 1), batches=1, steps=2))
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.global_step) == (1, 3)
    assert resumed.state_dict() == state
    assert len(resumed.step(*data[0]).teleports) == 1  # epoch 1 still teleports, once
    assert len(resumed.step(*data[1]).teleports) == 0


def test_teleport_data_supplies_the_teleport_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 3))
    seen = []
    teleporter = Teleporter(model, nn.functional.cross_entropy, steps=1)
    original = teleporter.teleport

    def recording(inputs, targets, **options):
        seen.append(inputs)
        return original(inputs, targets, **options)

    teleporter.teleport = recording
    tele_batches = batches(2, size=4)
    trainer = TeleportTrainer(
        model,
        nn.functional.cross_entropy,
        torch.optim.SGD(model.parameters(), lr=0.1),
        teleporter=teleporter,
        schedule=EveryStepsSchedule(every=1, batches=3, steps=1),
        teleport_data=tele_batches,
    )
    trainer.step(*batches(1)[0])
    expected = [tele_batches[0][0], tele_batches[1][0], tele_batches[0][0]]  # cycled
    assert len(seen) == 3 and all(torch.equal(s, b) for s, b in zip(seen, expected, strict=True))


def test_trainer_options_are_checked():
    model, optimizer, _ = setup()
    with pytest.raises(ValueError, match="optimizer_state must be"):
        TeleportTrainer(model, nn.functional.cross_entropy, optimizer, optimizer_state="clear")
    with pytest.raises(ValueError, match="give both a teleporter and a schedule"):
        TeleportTrainer(
            model, nn.functional.cross_entropy, optimizer, schedule=EveryStepsSchedule()
        )
