"""The model is left as found: modes, buffers, hooks, Parameter objects; and restored on errors."""

from __future__ import annotations

import torch
from conftest import LOSS_RTOL, assert_unchanged, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from torch_teleport import Teleporter
from torch_teleport.testing import assert_teleport_invariant


@st.composite
def batchnorm_models(draw):
    """An MLP with BatchNorm (each layer in train or eval mode), dropout, a user hook and random statistics."""
    seed = draw(st.integers(0, 2**31 - 1))
    width = draw(st.integers(8, 32))
    batch = draw(st.integers(2, 40))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    bn_training = draw(st.lists(st.booleans(), min_size=2, max_size=2))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(6, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.Tanh(),
            nn.Linear(width, 3),
        ).to(dtype)
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.copy_(torch.randn(width, generator=generator, dtype=dtype))
            bn.running_var.copy_(torch.rand(width, generator=generator, dtype=dtype) + 0.5)
            bn.num_batches_tracked.fill_(7)
            bn.weight.copy_(torch.rand(width, generator=generator, dtype=dtype) + 0.5)
    model.train()
    model[1].train(bn_training[0])
    model[5].train(bn_training[1])
    model[4].register_forward_hook(lambda module, args, output: None)  # the user's own hook stays
    inputs = torch.randn(batch, 6, generator=generator, dtype=dtype)
    targets = torch.randint(0, 3, (batch,), generator=generator)
    return model, inputs, targets


@given(batchnorm_models())
def test_buffers_modes_and_hooks_are_untouched(case):
    model, inputs, targets = case
    before = snapshot(model)
    teleporter = Teleporter(model, nn.functional.cross_entropy, null_space="exact", uncovered="freeze")
    report = teleporter.teleport(inputs, targets)
    assert_unchanged(model, before, parameters=False)
    assert report.loss_change <= LOSS_RTOL[inputs.dtype]
    assert {"1.weight", "1.bias", "5.weight", "5.bias"} <= set(report.frozen)
    # the helper's own checks, on a copy, agree (BatchNorm keeps its mode inside the teleport)
    assert_teleport_invariant(
        model, nn.functional.cross_entropy, inputs, targets, uncovered="freeze"
    )


@given(batchnorm_models(), st.integers(1, 5))
def test_an_exception_mid_teleport_leaves_the_model_as_found(case, failing_call):
    model, inputs, targets = case
    calls = 0

    def loss_fn(outputs, labels):
        nonlocal calls
        calls += 1
        if calls == failing_call:
            raise RuntimeError("loss function failed")
        return nn.functional.cross_entropy(outputs, labels)

    before = snapshot(model)
    teleporter = Teleporter(model, loss_fn, steps=4, uncovered="freeze")
    try:
        teleporter.teleport(inputs, targets)
    except RuntimeError as error:
        assert str(error) == "loss function failed"
        assert_unchanged(model, before)
    else:  # only a teleport with no room to move ends before the failing call
        assert calls < failing_call


def test_parameters_are_updated_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    inputs, targets = torch.randn(4, 8), torch.randint(0, 3, (4,))
    before = snapshot(model)
    report = Teleporter(model, nn.functional.cross_entropy).teleport(inputs, targets)
    after = snapshot(model)
    assert report.steps == 8
    assert after["objects"] == before["objects"] and after["storage"] == before["storage"]
    assert not torch.equal(model[2].weight, before["tensors"]["2.weight"])


def test_dropout_is_off_inside_the_teleport():
    """With dropout in train mode the batch loss would be random; inside the teleport it is not."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )
    model = model.double().train()
    inputs = torch.randn(5, 8, dtype=torch.float64)
    targets = torch.randint(0, 3, (5,))
    report = Teleporter(model, nn.functional.cross_entropy, null_space="exact").teleport(inputs, targets)
    assert all(module.training for module in model.modules())
    assert (
        report.loss_change <= LOSS_RTOL[torch.float64]
        and report.grad_norm_after > report.grad_norm_before
    )
    with torch.no_grad():
        model.eval()
        assert report.loss_after == float(nn.functional.cross_entropy(model(inputs), targets))


def test_teleport_runs_in_full_precision_under_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )
    inputs, targets = torch.randn(6, 8), torch.randint(0, 3, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = Teleporter(model, nn.functional.cross_entropy).teleport(inputs, targets)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        loss_after = float(nn.functional.cross_entropy(model(inputs), targets))
    assert report.steps == 8 and report.loss_change <= LOSS_RTOL[torch.float32]
    assert abs(loss_after - report.loss_before) <= LOSS_RTOL[torch.float32] * report.loss_before


def test_requires_grad_flags_survive():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    model[0].bias.requires_grad_(False)
    model[4].requires_grad_(False)
    before = snapshot(model)
    Teleporter(model, nn.functional.cross_entropy, uncovered="error").teleport(
        torch.randn(4, 8), torch.randint(0, 3, (4,))
    )
    after = snapshot(model)
    assert after["requires_grad"] == before["requires_grad"]
    for name in ("0.weight", "0.bias", "4.weight", "4.bias"):
        assert torch.equal(after["tensors"][name], before["tensors"][name]), name
    assert not torch.equal(after["tensors"]["2.weight"], before["tensors"]["2.weight"])
