"""Bad input: a clear error, and the model exactly as it was (parameters, buffers, modes, hooks)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import torch_teleport as tt
from torch_teleport import Batch, Evaluation, Objective, Teleporter, UnknownPluginError


def make_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).to(dtype)
    model.train()
    model[2].eval()
    return model


def make_batch(dtype=torch.float32, size=5):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 6, generator=generator, dtype=dtype), torch.randint(
        0, 3, (size,), generator=generator
    )


def expect_error(model, error, match, build=None, run=None):
    """``build()`` (a Teleporter) or ``run(teleporter)`` raises ``error``; ``model`` is untouched."""
    before = snapshot(model)
    with pytest.raises(error, match=match):
        teleporter = (
            build() if build else Teleporter(model, nn.functional.cross_entropy, uncovered="freeze")
        )
        if run:
            run(teleporter)
    assert_unchanged(model, before)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs(value):
    model = make_model()
    inputs, targets = make_batch()
    inputs[2, 3] = value
    expect_error(
        model,
        ValueError,
        "inputs contain non-finite values",
        run=lambda t: t.teleport(inputs, targets),
    )


def test_non_finite_float_targets():
    model = make_model()
    inputs, _ = make_batch()
    targets = torch.zeros(5, 3)
    targets[0, 0] = math.nan
    teleporter = Teleporter(model, nn.functional.mse_loss, uncovered="freeze")
    before = snapshot(model)
    with pytest.raises(ValueError, match="targets contain non-finite values"):
        teleporter.teleport(inputs, targets)
    assert_unchanged(model, before)


def test_non_finite_loss():
    model = make_model()
    inputs, targets = make_batch()

    def nan_loss(outputs, labels):
        return nn.functional.cross_entropy(outputs, labels) * math.nan

    before = snapshot(model)
    teleporter = Teleporter(model, nan_loss, uncovered="freeze")
    with pytest.raises(ValueError, match="not finite"):
        teleporter.teleport(inputs, targets)
    assert_unchanged(model, before)


def test_non_scalar_loss():
    model = make_model()
    inputs, targets = make_batch()
    per_sample = Teleporter(model, nn.CrossEntropyLoss(reduction="none"), uncovered="freeze")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got \(5,\)"):
        per_sample.teleport(inputs, targets)
    assert_unchanged(model, before)


def test_loss_that_is_not_a_tensor():
    model = make_model()
    inputs, targets = make_batch()
    teleporter = Teleporter(model, lambda outputs, labels: 1.0, uncovered="freeze")
    before = snapshot(model)
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor, got float"):
        teleporter.teleport(inputs, targets)
    assert_unchanged(model, before)


class Scale(nn.Module):
    """A module no projector knows: an elementwise learned scale."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.scale


def test_model_without_supported_layers():
    model = nn.Sequential(Scale(6), nn.LayerNorm(6))
    expect_error(
        model,
        ValueError,
        r"no parameter of Sequential can be teleported.*0\.scale, 1\.weight, 1\.bias",
        build=lambda: Teleporter(model, nn.functional.cross_entropy, uncovered="freeze"),
    )


@pytest.mark.parametrize(
    ("option", "value", "known"),
    [
        ("objective", "grad_nrom", "grad_norm"),
        ("null_space", "exakt", "exact"),
        ("method", "nullspace", "null_space"),
    ],
)
def test_unknown_plugin_names(option, value, known):
    model = make_model()
    with pytest.raises(UnknownPluginError) as raised:
        Teleporter(model, nn.functional.cross_entropy, uncovered="freeze", **{option: value})
    message = str(raised.value)
    assert repr(value) in message and "registered:" in message and known in message


@pytest.mark.parametrize("tau", [0.0, -0.5, 1.5, math.nan])
def test_tau_outside_the_unit_interval(tau):
    model = make_model()
    expect_error(
        model,
        ValueError,
        r"tau must lie in \(0, 1\]",
        build=lambda: Teleporter(
            model, nn.functional.cross_entropy, null_space="svd", tau=tau, uncovered="freeze"
        ),
    )


def test_tau_below_one_needs_the_svd_null_space():
    model = make_model()
    expect_error(
        model,
        ValueError,
        "exact null space needs tau = 1.*null_space='svd'",
        build=lambda: Teleporter(model, nn.functional.cross_entropy, null_space="exact", tau=0.9, uncovered="freeze"),
    )


@pytest.mark.parametrize("lr", [-0.1, 0.0, math.inf, math.nan])
def test_bad_learning_rate(lr):
    model = make_model()
    expect_error(
        model,
        ValueError,
        "lr must be a positive finite number",
        build=lambda: Teleporter(model, nn.functional.cross_entropy, lr=lr, uncovered="freeze"),
    )


def test_zero_size_batch():
    model = make_model()
    inputs, targets = make_batch()
    expect_error(
        model,
        ValueError,
        "inputs must hold at least one sample",
        run=lambda t: t.teleport(inputs[:0], targets[:0]),
    )


def test_mismatched_batch_sizes():
    model = make_model()
    inputs, targets = make_batch()
    expect_error(
        model,
        ValueError,
        "inputs and targets disagree on the batch size: 5 vs 4",
        run=lambda t: t.teleport(inputs, targets[:4]),
    )


def test_eight_bit_parameters():
    dtype = torch.float8_e4m3fn
    model = make_model(dtype)
    expect_error(
        model,
        TypeError,
        f"teleport moves float64, float32, bfloat16 and float16 parameters; 0.weight is {dtype}",
        build=lambda: Teleporter(model, nn.functional.cross_entropy, uncovered="freeze"),
    )


def test_absurd_step_rolls_back():
    """A plain step of 1e30 overflows float32: the weights go back and the report says so."""
    model = make_model()
    inputs, targets = make_batch()
    before = snapshot(model)
    teleporter = Teleporter(
        model, nn.functional.cross_entropy, lr=1e30, normalize=False, uncovered="freeze"
    )
    report = teleporter.teleport(inputs, targets)
    assert report.rolled_back and report.stopped == "non_finite"
    assert "rolled back" in report.summary()
    assert (
        report.loss_after == report.loss_before
        and report.grad_norm_after == report.grad_norm_before
    )
    assert_unchanged(model, before)


class InfiniteAtSecondStep(Objective):
    """The gradient-norm objective, but infinite from its second evaluation on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def evaluate(self, batch: Batch) -> Evaluation:
        self.calls += 1
        loss = batch.loss()
        grads = torch.autograd.grad(loss, batch.parameters, create_graph=True)
        value = 0.5 * sum(g.square().sum() for g in grads)
        if self.calls >= 2:
            value = value * math.inf
        return Evaluation(value=value, loss=loss)


def test_non_finite_objective_mid_ascent_rolls_back():
    model = make_model()
    inputs, targets = make_batch()
    before = snapshot(model)
    objective = InfiniteAtSecondStep()
    report = Teleporter(
        model, nn.functional.cross_entropy, objective=objective, uncovered="freeze"
    ).teleport(inputs, targets)
    assert objective.calls == 2  # one step was taken before the objective went infinite
    assert report.steps == 1
    assert report.rolled_back and report.stopped == "non_finite"
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "where, value, error, match",
    [
        ("teleport", {"steps": 0}, ValueError, "steps must be at least 1, got 0"),
        ("teleport", {"steps": -3}, ValueError, "steps must be at least 1, got -3"),
        ("teleport", {"steps": 2.5}, TypeError, "steps must be a whole number, got 2.5"),
        ("teleport", {"steps": True}, TypeError, "steps must be a whole number"),
        ("teleport", {"cap": -1}, ValueError, "cap must be a positive finite number, got -1"),
        ("teleport", {"cap": math.nan}, ValueError, "cap must be a positive finite number"),
        ("build", {"steps": 0}, ValueError, "steps must be at least 1"),
        ("build", {"cap": 0}, ValueError, "cap must be a positive finite number"),
        ("build", {"lr": 10}, ValueError, "lr is relative to the weights' norm"),
        ("limits", {"max_gain": 0.5}, ValueError, "max_gain .* at least 1"),
        ("limits", {"drift": -1}, ValueError, "drift must be a positive finite number"),
        ("limits", {"guard": math.inf}, ValueError, "guard must be a positive finite"),
        ("limits", {"module_step": 0}, ValueError, "module_step must be a positive finite"),
        ("limits", {"max_loss_change": -1}, ValueError, "max_loss_change must be None or a non-negative"),
        ("build", {"max_gain": 2}, TypeError, r"max_gain is one of the limits: give limits=Limits\(max_gain=...\)"),
        ("build", {"limits": {"drift": 1e-3}}, TypeError, "limits must be a torch_teleport.Limits"),
    ],
)
def test_bad_counts_and_limits_are_refused(where, value, error, match):
    model = make_model()
    inputs, targets = make_batch()
    if where == "limits":
        with pytest.raises(error, match=match):
            tt.Limits(**value)
    elif where == "build":
        expect_error(model, error, match, build=lambda: Teleporter(
            model, nn.functional.cross_entropy, uncovered="freeze", **value))
    else:
        expect_error(model, error, match, run=lambda t: t.teleport(inputs, targets, **value))


def test_a_detached_loss_is_named():
    model = make_model()
    inputs, targets = make_batch()
    expect_error(
        model,
        ValueError,
        "loss_fn returned a loss detached from the parameters",
        build=lambda: Teleporter(model, lambda out, y: nn.functional.cross_entropy(out.detach(), y), uncovered="freeze"),
        run=lambda t: t.teleport(inputs, targets),
    )


def test_targets_the_loss_cannot_take_are_named():
    """The loss's own error, with a note that names the targets and the output's shape."""
    model = make_model()
    inputs, _ = make_batch()
    wrong = torch.full((5,), 7)  # class 7 of a 3-class output
    before = snapshot(model)
    with pytest.raises(IndexError) as caught:
        Teleporter(model, nn.functional.cross_entropy, uncovered="freeze").teleport(inputs, wrong)
    notes = " ".join(getattr(caught.value, "__notes__", []))
    if hasattr(caught.value, "add_note"):  # Python 3.11+
        assert "targets of shape (5,) (torch.int64) and a model output of shape (5, 3)" in notes
    assert_unchanged(model, before)


def test_a_guard_batch_must_be_a_pair_of_good_tensors():
    model = make_model()
    inputs, targets = make_batch()
    expect_error(model, TypeError, "guard must be an", run=lambda t: t.teleport(inputs, targets, guard=inputs))
    bad = (inputs.clone(), targets)
    bad[0][0, 0] = math.nan
    expect_error(model, ValueError, "non-finite", run=lambda t: t.teleport(inputs, targets, guard=bad))
