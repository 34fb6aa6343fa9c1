"""TeleportTrainer: defaults, optimizer-state policy, Parameter identity, LR scheduler, resumable
state, step counting, clipping, loss scaling and gradient accumulation (the events alone, in a loop
of one's own: test_events.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torch_teleport import Teleporter, TeleportReport, TeleportTrainer
from torch_teleport.plugins.schedules import (
    EpochSchedule,
    EveryStepsSchedule,
    GainingSchedule,
    OnceSchedule,
)


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
    assert state == {"epoch": 1, "global_step": 3, **trainer.events.state_dict()}
    assert state["teleport_pass"] is None  # teleports on the training batch: no pass to place

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
        seen.append((inputs, options["guard"][0]))
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
        guard_samples=6,
    )
    trainer.step(*batches(1)[0])
    # the event's guard sample first (batches joined until it holds 6 samples), then the teleport
    # batches, cycled
    first, second = tele_batches[0][0], tele_batches[1][0]
    assert len(seen) == 3
    assert [torch.equal(batch, expected) for (batch, _), expected in zip(seen, (first, second, first), strict=True)] == [True] * 3
    assert all(torch.equal(guard, torch.cat([first, second])) for _, guard in seen)


def test_trainer_options_are_checked():
    model, optimizer, _ = setup()
    with pytest.raises(ValueError, match="optimizer_state must be"):
        TeleportTrainer(model, nn.functional.cross_entropy, optimizer, optimizer_state="clear")
    with pytest.raises(ValueError, match="teleport must be True or False"):
        TeleportTrainer(model, nn.functional.cross_entropy, optimizer, teleport="yes")
    for steps in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="accumulation_steps must be a positive int"):
            TeleportTrainer(model, nn.functional.cross_entropy, optimizer, accumulation_steps=steps)
    for samples in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="guard_samples must be a positive int"):
            TeleportTrainer(model, nn.functional.cross_entropy, optimizer, guard_samples=samples)
    for norm in (0, -1.0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="max_grad_norm must be a positive finite number"):
            TeleportTrainer(model, nn.functional.cross_entropy, optimizer, max_grad_norm=norm)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        TeleportTrainer(model, nn.functional.cross_entropy, optimizer, scaler=2.0)
    with pytest.raises(ValueError, match="autocast_dtype must be"):
        TeleportTrainer(model, nn.functional.cross_entropy, optimizer, autocast_dtype=torch.float64)


# -- default teleports ------------------------------------------------------------------
def small_mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def same(model, reference, atol=0.0):
    return all(
        torch.allclose(p, q, rtol=0, atol=atol) for p, q in zip(model.parameters(), reference, strict=True)
    )


def plain_sgd(model, data, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for inputs, targets in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return weights(model)


def test_teleport_data_alone_teleports_with_the_default_teleporter_and_schedule():
    model = small_mlp()
    reference = plain_sgd(small_mlp(), batches(2))
    trainer = TeleportTrainer(
        model,
        nn.functional.cross_entropy,
        torch.optim.SGD(model.parameters(), lr=0.1),
        teleport_data=batches(3, size=6),
    )
    assert isinstance(trainer.teleporter, Teleporter) and trainer.teleporter.model is model
    assert isinstance(trainer.schedule, GainingSchedule)
    assert (trainer.schedule.every, trainer.schedule.template.batches) == (500, 1)
    counts = [len(trainer.step(*batch).teleports) for batch in batches(2)]
    assert counts == [1, 0]  # one teleport before step 0, the next before step 500
    assert not same(model, reference, atol=1e-4)  # the teleport moved the weights
    trainer.end_epoch()
    assert len(trainer.step(*batches(1)[0]).teleports) == 0  # counted in steps, not epochs


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop])
def test_an_optimizer_that_normalises_its_steps_teleports_once_at_the_start_by_default(optimizer):
    model = small_mlp()
    trainer = TeleportTrainer(
        model, nn.functional.cross_entropy, optimizer(model.parameters(), lr=1e-3), teleport_data=batches(3, size=6)
    )
    assert isinstance(trainer.schedule, OnceSchedule) and trainer.schedule.at == 0
    assert [len(trainer.step(*batch).teleports) for batch in batches(3)] == [1, 0, 0]


def test_one_part_gets_the_default_other_part():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = EveryStepsSchedule(every=2, steps=1)
    trainer = TeleportTrainer(model, nn.functional.cross_entropy, optimizer, schedule=schedule)
    assert trainer.schedule is schedule and isinstance(trainer.teleporter, Teleporter)
    counts = [len(trainer.step(*batch).teleports) for batch in batches(4)]
    assert counts == [1, 0, 1, 0]  # on the training batch, without teleport_data

    teleporter = Teleporter(model, nn.functional.cross_entropy)
    trainer = TeleportTrainer(model, nn.functional.cross_entropy, optimizer, teleporter=teleporter)
    assert trainer.teleporter is teleporter and isinstance(trainer.schedule, GainingSchedule)


def test_without_teleport_parts_or_with_teleport_false_there_are_no_teleports():
    data = batches(3)
    reference = plain_sgd(small_mlp(), data)
    for options in ({}, {"teleport": False}):
        model = small_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = TeleportTrainer(model, nn.functional.cross_entropy, optimizer, **options)
        assert trainer.events is None and trainer.teleporter is None and trainer.schedule is None
        assert trainer.state_dict() == {"epoch": 0, "global_step": 0, "schedule": {}, "teleport_pass": None}
        assert all(trainer.step(*batch).teleports == [] for batch in data)
        assert same(model, reference)


@pytest.mark.parametrize("part", ["teleporter", "schedule", "teleport_data"])
def test_teleport_false_refuses_teleport_parts(part):
    model = small_mlp()
    value = {
        "teleporter": Teleporter(model, nn.functional.cross_entropy),
        "schedule": EveryStepsSchedule(),
        "teleport_data": batches(1),
    }[part]
    with pytest.raises(ValueError, match=f"teleport=False trains without teleports.*got {part}"):
        TeleportTrainer(
            model, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), teleport=False, **{part: value}
        )


# -- step counting -------------------------------------------------------------------------
def test_step_counts_each_step_once():
    model = small_mlp()
    trainer = TeleportTrainer(
        model,
        nn.functional.cross_entropy,
        torch.optim.SGD(model.parameters(), lr=0.1),
        schedule=EveryStepsSchedule(every=5, steps=1),
    )
    counts = [len(trainer.step(*batch).teleports) for batch in batches(10)]
    assert counts == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert trainer.global_step == 10


# -- gradient clipping ------------------------------------------------------------------------
def gradient(model, inputs, targets):
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_max_grad_norm_clips_the_update(max_norm):
    model = small_mlp(torch.float64)
    inputs, targets = batches(1)[0]
    inputs = inputs.double()
    grads = gradient(model, inputs, targets)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    assert 0.05 < norm < 1e3
    before = weights(model)
    trainer = TeleportTrainer(
        model, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=max_norm
    )
    result = trainer.step(inputs, targets)
    assert result.grad_norm == pytest.approx(norm, rel=1e-12)
    factor = min(1.0, max_norm / (norm + 1e-6))  # clip_grad_norm_'s coefficient
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(b - p.detach(), factor * g, rtol=1e-9, atol=1e-15)
    moved = [b - p.detach() for p, b in zip(model.parameters(), before, strict=True)]
    step_size = math.sqrt(sum(float(m.pow(2).sum()) for m in moved))
    assert step_size == pytest.approx(min(norm, max_norm), rel=1e-5)


# -- loss scaling -------------------------------------------------------------------------------
def test_grad_scaler_on_cpu_scales_unscales_before_clipping_and_steps():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert scaler.is_enabled()
    model = small_mlp(torch.float64)
    inputs, targets = batches(1)[0]
    inputs = inputs.double()
    grads = gradient(model, inputs, targets)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    seen = []
    model[2].weight.register_hook(lambda grad: seen.append(grad.clone()))
    before = weights(model)
    trainer = TeleportTrainer(
        model,
        nn.functional.cross_entropy,
        torch.optim.SGD(model.parameters(), lr=1.0),
        max_grad_norm=0.05,
        scaler=scaler,
    )
    result = trainer.step(inputs, targets)
    torch.testing.assert_close(seen[0], 1024.0 * grads[2], rtol=1e-12, atol=0)  # backward saw the scaled loss
    assert result.grad_norm == pytest.approx(norm, rel=1e-12)  # measured after unscaling
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(b - p.detach(), (0.05 / (norm + 1e-6)) * g, rtol=1e-9, atol=1e-15)
    assert scaler.get_scale() == 1024.0  # updated, no overflow and no growth yet


def test_grad_scaler_skips_a_step_with_non_finite_gradients():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    factor = [math.inf]

    def loss_fn(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets) * factor[0]

    model = small_mlp(torch.float64)
    before = weights(model)
    trainer = TeleportTrainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    inputs, targets = batches(1)[0]
    trainer.step(inputs.double(), targets)
    assert same(model, before)  # the step was skipped
    assert scaler.get_scale() == 512.0  # and the scale backed off
    factor[0] = 1.0
    trainer.step(inputs.double(), targets)
    assert not same(model, before)


def test_autocast_dtype_covers_the_training_forward_only():
    model = small_mlp()
    seen = []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append((torch.is_grad_enabled(), output.dtype)))
    trainer = TeleportTrainer(
        model,
        nn.functional.cross_entropy,
        torch.optim.SGD(model.parameters(), lr=0.1),
        schedule=EveryStepsSchedule(every=1, steps=1),
        autocast_dtype=torch.bfloat16,
        scaler=torch.amp.GradScaler("cpu"),
    )
    before = weights(model)
    result = trainer.step(*batches(1)[0])
    assert len(result.teleports) == 1 and result.teleports[0].steps == 1
    assert seen[-1] == (True, torch.bfloat16)  # the training forward
    assert {dtype for _, dtype in seen[:-1]} == {torch.float32}  # the teleport's forwards
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert not same(model, before)


# -- gradient accumulation --------------------------------------------------------------------
def test_accumulation_matches_one_large_batch():
    k, size = 4, 3
    micro = [(x.double(), y) for x, y in batches(2 * k, size=size)]
    large = [
        (torch.cat([x for x, _ in micro[i : i + k]]), torch.cat([y for _, y in micro[i : i + k]]))
        for i in range(0, 2 * k, k)
    ]
    reference_model = small_mlp(torch.float64)
    reference = TeleportTrainer(
        reference_model,
        nn.functional.cross_entropy,
        torch.optim.SGD(reference_model.parameters(), lr=0.5, momentum=0.9),
    )
    for batch in large:
        reference.step(*batch)

    model = small_mlp(torch.float64)
    trainer = TeleportTrainer(
        model,
        nn.functional.cross_entropy,
        torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        accumulation_steps=k,
    )
    stepped = [trainer.step(*batch).stepped for batch in micro]
    assert stepped == [False, False, False, True] * 2
    assert trainer.global_step == 2
    assert not same(model, weights(small_mlp(torch.float64)), atol=1e-3)
    assert same(model, weights(reference_model), atol=1e-6)


def test_accumulation_clips_the_accumulated_gradient():
    k = 3
    micro = [(x.double(), y) for x, y in batches(k, size=4)]
    model = small_mlp(torch.float64)
    whole = (torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))
    grads = gradient(model, *whole)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    trainer = TeleportTrainer(
        model, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=1.0),
        accumulation_steps=k, max_grad_norm=0.05,
    )
    results = [trainer.step(*batch) for batch in micro]
    assert [r.grad_norm is None for r in results] == [True, True, False]
    assert results[-1].grad_norm == pytest.approx(norm, rel=1e-9)


def test_accumulation_teleports_only_before_the_first_micro_batch_of_a_window():
    model = small_mlp()
    trainer = TeleportTrainer(
        model,
        nn.functional.cross_entropy,
        torch.optim.SGD(model.parameters(), lr=0.1),
        schedule=EveryStepsSchedule(every=1, steps=1),
        accumulation_steps=3,
    )
    counts = [len(trainer.step(*batch).teleports) for batch in batches(7)]
    assert counts == [1, 0, 0, 1, 0, 0, 1]
    assert trainer.global_step == 2


def test_end_epoch_finishes_an_incomplete_window_with_the_mean_gradient():
    micro = [(x.double(), y) for x, y in batches(3, size=4)]
    reference_model = small_mlp(torch.float64)
    plain_sgd(reference_model, [(torch.cat([micro[0][0], micro[1][0]]), torch.cat([micro[0][1], micro[1][1]])), micro[2]])

    model = small_mlp(torch.float64)
    trainer = TeleportTrainer(
        model, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=2
    )
    for batch in micro:
        trainer.step(*batch)
    assert trainer.global_step == 1
    with pytest.warns(RuntimeWarning, match="accumulation window"):
        trainer.state_dict()
    trainer.end_epoch()
    assert (trainer.global_step, trainer.epoch) == (2, 1)
    assert same(model, weights(reference_model), atol=1e-12)


def test_teleports_from_teleport_data_are_guarded_by_the_next_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    data = [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(4)]
    trainer = TeleportTrainer(
        model, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.01),
        teleporter=Teleporter(model, nn.functional.cross_entropy, steps=2),
        schedule=EveryStepsSchedule(every=1, batches=1, steps=2), teleport_data=data,
    )
    result = trainer.step(*data[0])
    (report,) = result.teleports
    assert report.guard_loss_before is not None and report.guard_loss_after is not None
    unguarded = TeleportTrainer(
        model, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.01),
        schedule=EveryStepsSchedule(every=1, batches=1, steps=2), teleport_data=data, guard=False,
    )
    assert unguarded.step(*data[0]).teleports[0].guard_loss_before is None
