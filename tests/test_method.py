"""The step rule every method shares: the step-length search, fixed rates and the per-module limit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.engine import INITIAL_LR
from torch_teleport.method import SEARCH_MAX_LENGTH
from torch_teleport.null_space_method import DEFAULT_DRIFT, SITE_STEP_LIMIT


def mlp(seed: int, widths: tuple[int, ...], dtype=torch.float32) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
        return nn.Sequential(*layers[:-1]).to(dtype)


def batch(seed: int, samples: int, width: int, classes: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed + 1000)
    inputs = torch.randn(samples, width, generator=generator, dtype=dtype)
    return inputs, torch.randint(0, classes, (samples,), generator=generator)


@given(seed=st.integers(0, 2**16), samples=st.integers(4, 48), hidden=st.integers(16, 64))
def test_a_default_teleport_keeps_its_batch_loss_in_float32_and_never_lowers_the_gradient_norm(seed, samples, hidden):
    model = mlp(seed, (12, hidden, hidden, 4))
    report = tt.Teleporter(model, F.cross_entropy).teleport(*batch(seed, samples, 12, 4))
    assert report.loss_change <= DEFAULT_DRIFT
    assert report.grad_norm_after >= report.grad_norm_before
    assert len(report.step_sizes) == report.steps
    assert all(0 < size <= INITIAL_LR * SEARCH_MAX_LENGTH for size in report.step_sizes)


def test_the_search_grows_the_step_only_where_the_sample_saturates_its_core_space():
    # 512 samples on a 3-dimensional subspace of 8 inputs: every core space is far smaller than the sample.
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(512, 3, generator=generator) @ torch.randn(3, 8, generator=generator)
    targets = torch.randint(0, 3, (512,), generator=generator)
    # (the drift tolerance is off: what is checked is what the search tries, not what the limits accept)
    big = tt.Teleporter(mlp(0, (8, 64, 64, 3)), F.cross_entropy, drift_tolerance=None).teleport(inputs, targets)
    assert max(big.step_sizes) > INITIAL_LR
    # 6 samples in 65 input dimensions span a new direction each: no step beyond the first length.
    small = tt.Teleporter(mlp(0, (64, 64, 64, 3)), F.cross_entropy, drift_tolerance=None).teleport(*batch(0, 6, 64, 3))
    assert small.steps > 0 and max(small.step_sizes) <= INITIAL_LR


def test_a_given_rate_is_kept_for_every_step():
    report = tt.Teleporter(mlp(1, (8, 16, 16, 3)), F.cross_entropy, lr=0.003).teleport(*batch(1, 512, 8, 3))
    assert report.steps > 0 and report.step_sizes == [0.003] * report.steps


def test_a_step_the_drift_tolerance_rejects_is_tried_shorter_and_the_batch_loss_is_kept():
    data = batch(2, 64, 8, 3, torch.float64)
    # tau = 0.99 leaves directions the batch uses: steps of the first length move its loss too far.
    options = {"null_space": "svd", "tau": 0.99, "drift_tolerance": 1e-6}
    searched = tt.Teleporter(mlp(2, (8, 32, 32, 3), torch.float64), F.cross_entropy, **options).teleport(*data)
    assert searched.steps > 0 and searched.loss_change <= 1e-6
    assert all(size < INITIAL_LR for size in searched.step_sizes)
    fixed = tt.Teleporter(mlp(2, (8, 32, 32, 3), torch.float64), F.cross_entropy, lr=INITIAL_LR, **options)
    stopped = fixed.teleport(*data)
    assert stopped.stopped == "drift" and stopped.steps < searched.steps


def test_no_normalised_step_moves_a_module_by_more_than_its_limit():
    model = mlp(3, (8, 64, 64, 3), torch.float64)
    with torch.no_grad():
        model[-1].weight.mul_(1e-3)  # a head far smaller than the body: the joint norm would dwarf it
        model[-1].bias.mul_(1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = tt.Teleporter(model, F.cross_entropy, null_space="exact", lr=0.5, steps=1).teleport(*batch(3, 16, 8, 3, torch.float64))
    assert report.steps == 1
    for index in (0, 2, 4):
        names = [f"{index}.weight", f"{index}.bias"]
        moved = torch.cat([(dict(model.named_parameters())[n] - before[n]).flatten() for n in names]).norm()
        size = torch.cat([before[n].flatten() for n in names]).norm()
        assert moved <= SITE_STEP_LIMIT * size * (1 + 1e-9)
    head = torch.cat([(dict(model.named_parameters())[n] - before[n]).flatten() for n in ("4.weight", "4.bias")])
    assert head.norm() > 0.5 * SITE_STEP_LIMIT * torch.cat([before["4.weight"].flatten(), before["4.bias"].flatten()]).norm()


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_the_trainer_refuses_a_guard_sample_that_is_not_a_positive_count(value):
    model = mlp(4, (8, 16, 3))
    with pytest.raises(ValueError, match="guard_samples must be a positive int"):
        tt.TeleportTrainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), 0.1), guard_samples=value)
