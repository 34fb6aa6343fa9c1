"""The guard batch and the limits of one teleport: drift, guard-loss rise and gradient-norm gain."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt


def problem(seed: int = 0):
    """An MLP and two batches of one task: a small teleport batch and a larger guard batch."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(10, 3, generator=generator)
    inputs = torch.randn(40, 10, generator=generator)
    targets = (inputs @ teacher).argmax(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    return model, (inputs[:6], targets[:6]), (inputs[6:], targets[6:])


def loss_on(model, batch, loss_fn=F.cross_entropy) -> float:
    with torch.no_grad():
        return float(loss_fn(model(batch[0]), batch[1]))


def quiet_guard_problem(seed: int = 0):
    """A regression MLP, a teleport batch, and a guard batch the core space leaves out.

    The guard batch's inputs stay out of the core space (it judges, it is not kept), and they are
    some 300 times smaller than the teleport batch's (the MLP has no biases and ReLU activations,
    so every layer's guard inputs are as small). Its targets are the model's own outputs plus
    noise, so moving its outputs raises its loss: the guard check is the backstop that catches
    that, while the teleport batch's span stays in the core and its loss does not drift.
    """
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(10, 3, generator=generator, dtype=torch.float64)
    inputs = torch.randn(40, 10, generator=generator, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(10, 32, bias=False),
            nn.ReLU(),
            nn.Linear(32, 32, bias=False),
            nn.ReLU(),
            nn.Linear(32, 3, bias=False),
        ).double()
    quiet = 0.003 * inputs[6:]
    with torch.no_grad():
        fit = model(quiet)
    fit = fit + fit.std() * torch.randn(fit.shape, generator=generator, dtype=torch.float64)
    return model, (inputs[:6], inputs[:6] @ teacher), (quiet, fit)


@pytest.mark.parametrize("seed", range(3))
def test_a_step_that_raises_the_guard_loss_is_undone(seed):
    model, teleport_batch, guard = quiet_guard_problem(seed)
    options = {"lr": 0.05, "limits": tt.Limits(max_gain=None)}  # a fixed step: the first rejected one ends the teleport
    unguarded = copy.deepcopy(model)
    report = tt.Teleporter(unguarded, F.mse_loss, **options).teleport(*teleport_batch)
    rise = loss_on(unguarded, guard, F.mse_loss) / loss_on(model, guard, F.mse_loss) - 1
    assert rise > 0.01, "the setting must hurt the guard batch without a guard, or the test says nothing"
    assert report.guard_loss_before is None and report.guard_loss_after is None

    guarded = copy.deepcopy(model)
    report = tt.Teleporter(guarded, F.mse_loss, **options).teleport(*teleport_batch, guard=guard)
    assert report.layers[1].samples == 6  # the guard's inputs did not join the core space
    assert report.stopped == "guard" and not report.rolled_back
    assert report.guard_loss_before == pytest.approx(loss_on(model, guard, F.mse_loss), rel=1e-6)
    assert report.guard_loss_after == pytest.approx(loss_on(guarded, guard, F.mse_loss), rel=1e-6)
    assert report.guard_loss_after <= (1 + tt.Limits().guard) * report.guard_loss_before
    assert report.loss_change <= 1e-5  # the teleport batch itself stays invariant either way


def test_the_guard_tolerance_is_the_teleporters():
    model, teleport_batch, guard = quiet_guard_problem(0)
    loose = tt.Teleporter(copy.deepcopy(model), F.mse_loss, lr=0.05, limits=tt.Limits(max_gain=None, guard=1e3))
    report = loose.teleport(*teleport_batch, guard=guard)
    assert report.stopped == "steps" and report.steps == 8
    assert report.guard_loss_after > 1.01 * report.guard_loss_before  # what the default tolerance stops


def test_a_harmless_teleport_passes_its_guard_untouched():
    """A guard batch whose loss never rises past the tolerance changes nothing: its inputs stay
    out of the core space, so the teleport is the one without it."""
    model, teleport_batch, guard = problem(1)
    plain, guarded = copy.deepcopy(model), copy.deepcopy(model)
    tt.Teleporter(plain, F.cross_entropy, lr=1e-4).teleport(*teleport_batch)
    report = tt.Teleporter(guarded, F.cross_entropy, lr=1e-4).teleport(*teleport_batch, guard=guard)
    assert report.stopped == "steps" and report.steps == 8
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), guarded.parameters(), strict=True))


def test_the_guard_batchs_inputs_stay_out_of_the_core_space_and_the_basis_samples_join_it():
    """With the exact null space a guard batch only judges: its loss moves, as without it (the
    guard limit off here). Given as the basis sample instead, the same inputs join the
    span every update avoids, so their loss is kept to rounding in float64, as the batch's is."""
    model, (inputs, targets), (guard_inputs, guard_targets) = problem(0)
    model = model.double()
    teleport_batch, guard = (inputs.double(), targets), (guard_inputs[:8].double(), guard_targets[:8])
    start = loss_on(model, guard)
    plain, judged, kept = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    options = {"null_space": "exact", "limits": tt.Limits(max_gain=None, guard=None)}
    tt.Teleporter(plain, F.cross_entropy, **options).teleport(*teleport_batch)
    report = tt.Teleporter(judged, F.cross_entropy, **options).teleport(*teleport_batch, guard=guard)
    assert [layer.samples for layer in report.layers] == [6] * 3
    assert abs(loss_on(plain, guard) / start - 1) > 1e-3
    assert abs(loss_on(judged, guard) / start - 1) > 1e-3
    report = tt.Teleporter(kept, F.cross_entropy, **options).teleport(*teleport_batch, basis=guard[0])
    assert report.steps > 0 and report.grad_norm_after > report.grad_norm_before
    assert [layer.samples for layer in report.layers] == [6 + 8] * 3
    assert abs(loss_on(kept, guard) / start - 1) <= 1e-10
    assert report.loss_change <= 1e-10


def test_level_set_teleport_refuses_a_guard():
    model, teleport_batch, guard = problem(0)
    with pytest.raises(ValueError, match="takes no guard batch"):
        tt.Teleporter(model, F.cross_entropy, method="level_set").teleport(*teleport_batch, guard=guard)



def test_a_basis_sample_keeps_the_loss_of_the_data_it_represents():
    """The update avoids the span of a larger sample's inputs too: at tau = 1 that sample's loss
    is kept exactly (as is the batch's), while the batch alone keeps only itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)).double()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(30, 10, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (30,), generator=generator)
    batch = (sample[:5], labels[:5])
    alone, with_sample = copy.deepcopy(model), copy.deepcopy(model)
    options = {"null_space": "exact", "lr": 0.05, "limits": tt.Limits(max_gain=None)}
    tt.Teleporter(alone, F.cross_entropy, **options).teleport(*batch)
    report = tt.Teleporter(with_sample, F.cross_entropy, **options).teleport(*batch, basis=sample)
    start = loss_on(model, (sample, labels))
    assert abs(loss_on(alone, (sample, labels)) / start - 1) > 1e-4  # the batch alone moves the rest
    assert abs(loss_on(with_sample, (sample, labels)) / start - 1) < 1e-10
    assert report.steps > 0 and report.grad_norm_after > report.grad_norm_before
    assert report.layers[1].samples == 35  # the batch's inputs and the sample's


def test_only_the_null_space_method_takes_a_basis_sample():
    model, teleport_batch, _ = problem(0)
    with pytest.raises(ValueError, match="takes no basis sample"):
        tt.Teleporter(model, F.cross_entropy, method="level_set").teleport(*teleport_batch, basis=teleport_batch[0])


def test_a_guard_baseline_keeps_a_series_of_teleports_from_compounding():
    """Judged against the guard loss a round started from, a teleport whose guard batch is already
    above that level by more than the tolerance takes no step; judged on its own, it moves."""
    model, teleport_batch, guard = problem(0)
    start = loss_on(model, guard)
    teleporter = tt.Teleporter(model, F.cross_entropy, lr=1e-3, limits=tt.Limits(max_gain=None))  # a first step within drift
    alone = teleporter.teleport(*teleport_batch, guard=guard, guard_baseline=start / 1.05)
    assert alone.stopped == "guard" and alone.steps == 0
    assert loss_on(model, guard) == start  # nothing moved
    report = teleporter.teleport(*teleport_batch, guard=guard, guard_baseline=start)
    assert report.steps > 0 and report.guard_loss_after <= 1.01 * start
    with pytest.raises(ValueError, match="guard_baseline needs a guard batch"):
        teleporter.teleport(*teleport_batch, guard_baseline=start)


@pytest.mark.parametrize("gradient", ["closed_form", "structured"])
def test_the_guard_batch_runs_once_per_point_it_judges(gradient):
    """Before the teleport and after each checked step (the closed form checks once, at the end),
    and never to capture its inputs (they do not join the core space): the last measurement gives
    ``guard_loss_after``, with no forward of its own."""
    model, teleport_batch, (guard_inputs, guard_targets) = problem(0)
    guard = (guard_inputs[:8], guard_targets[:8])
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    report = tt.Teleporter(
        model, F.cross_entropy, null_space="exact", lr=1e-3, steps=2, gradient=gradient
    ).teleport(*teleport_batch, guard=guard)
    assert report.stopped == "steps" and report.steps == 2
    assert sizes.count(len(guard[1])) == 1 + (1 if gradient == "closed_form" else 2)
    assert report.guard_loss_after == pytest.approx(loss_on(model, guard), rel=1e-6)
