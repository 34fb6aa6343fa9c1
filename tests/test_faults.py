"""Faults and bad input: each has a defined outcome, and no bad value ever reaches the weights."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.events import TeleportFailedError
from torch_teleport.limits import LANDED
from torch_teleport.objective import Batch, Evaluation, Objective
from torch_teleport.objectives.grad_norm import GradNorm
from torch_teleport.schedule import TeleportPlan
from torch_teleport.testing import assert_teleport_invariant


def mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def batch(size: int = 6, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 8, generator=generator, dtype=dtype), torch.randint(0, 4, (size,), generator=generator)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"


class InfiniteSlope(Objective):
    """The gradient norm plus ``sqrt|w - w0|`` summed over the first weight, at ``w = w0``.

    The added term is 0, so the value is finite, but its gradient is not
    (``0 * inf``): a non-finite *update*.
    """

    def evaluate(self, batch: Batch) -> Evaluation:
        inner = GradNorm().evaluate(batch)
        weight = batch.parameters[0]
        return Evaluation(inner.value + (weight - weight.detach()).abs().sqrt().sum(), inner.loss, inner.grad_norm)


# -- non-finite values ---------------------------------------------------------------
@pytest.mark.parametrize("where", ["inputs", "targets"])
def test_non_finite_batch_is_rejected_and_the_model_left_alone(where):
    model = mlp()
    before = snapshot(model)
    inputs, _ = batch()
    targets = torch.randn(6, 4, dtype=torch.float64)
    (inputs if where == "inputs" else targets)[2, 1] = float("nan")
    with pytest.raises(ValueError, match=f"{where} contain non-finite values"):
        tt.Teleporter(model, F.mse_loss).teleport(inputs, targets)
    assert_unchanged(model, before)


def test_non_finite_starting_loss_is_rejected():
    model = mlp()
    with torch.no_grad():
        model[4].bias[0] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match="not finite"):
        tt.Teleporter(model, F.cross_entropy).teleport(*batch())
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "dtype, options, where",
    [
        # A plain ascent rate so large that the first step overflows the weights, on either path.
        # (drift tolerance and gain limit off: with them, the step would be undone, or shortened to
        # land on the gain limit, before anything was rolled back)
        (torch.float32, {"lr": 1e38, "normalize": False, "gradient": "full", "limits": tt.Limits(drift=None, max_gain=None)}, "weights"),
        (torch.float32, {"lr": 1e38, "normalize": False, "limits": tt.Limits(drift=None, max_gain=None)}, "weights"),
        # A finite objective with an infinite gradient: the update itself is non-finite.
        (torch.float64, {"objective": InfiniteSlope()}, "update"),
    ],
)
def test_non_finite_during_the_teleport_is_rolled_back(dtype, options, where):
    model = mlp(dtype)
    before = snapshot(model)
    report = tt.Teleporter(model, F.cross_entropy, **options).teleport(*batch(dtype=dtype))
    assert report.rolled_back and report.stopped == "non_finite"
    assert report.loss_after == report.loss_before
    assert_unchanged(model, before)


def test_far_too_large_rate_moves_the_loss_and_the_guard_rolls_it_back():
    """lr = 1 (each step the size of the weights, cut to the most a step may move a module,
    ``SITE_STEP_LIMIT`` of its norm) for 512 steps with every default limit off: in float32 the
    weights grow many-fold in the null space and rounding moves the batch loss."""
    inputs, targets = batch(dtype=torch.float32)
    unguarded = mlp(torch.float32)
    absurd = {"lr": 1.0, "steps": 512}
    absurd_limits = {"drift": None, "max_gain": None}
    report = tt.Teleporter(unguarded, F.cross_entropy, **absurd, limits=tt.Limits(**absurd_limits)).teleport(inputs, targets)
    # Without any guard the damage is applied and shows in the report ...
    assert not report.rolled_back and report.loss_change > 2e-5
    guarded = mlp(torch.float32)
    before = snapshot(guarded)
    report = tt.Teleporter(guarded, F.cross_entropy, **absurd, limits=tt.Limits(**absurd_limits, max_loss_change=1e-6)).teleport(inputs, targets)
    # ... with one, the teleport is undone.
    assert report.rolled_back and report.stopped == "loss_changed"
    assert_unchanged(guarded, before)
    # A sane rate passes the same guard.
    report = tt.Teleporter(guarded, F.cross_entropy, limits=tt.Limits(max_loss_change=1e-6)).teleport(inputs, targets)
    assert not report.rolled_back and report.steps == 8


def test_the_default_drift_tolerance_backtracks_to_the_last_good_step():
    """The same absurd rate with the default drift tolerance: the step that drifts is undone and
    the teleport ends at the last good step, with the batch loss kept to float32 precision."""
    inputs, targets = batch(dtype=torch.float32)
    model = mlp(torch.float32)
    report = tt.Teleporter(model, F.cross_entropy, lr=1.0, steps=512, limits=tt.Limits(max_gain=None)).teleport(inputs, targets)
    assert report.stopped == "drift" and not report.rolled_back and 0 < report.steps < 512
    assert report.loss_change <= 1e-5
    with torch.no_grad():
        assert abs(float(F.cross_entropy(model(inputs), targets)) - report.loss_before) <= 1e-5 * report.loss_before


def test_the_default_gain_cap_lands_a_runaway_ascent_just_below_it():
    """The default gain cap (10x), reached at lr = 1 within 64 steps (no step moves a module by
    more than ``SITE_STEP_LIMIT`` of its norm, so the default 8 need not get there): the step that
    would cross it is shortened to land within ``LANDED`` below it, and the ascent stops there."""
    inputs, targets = batch(dtype=torch.float32)
    report = tt.Teleporter(mlp(torch.float32), F.cross_entropy, lr=1.0, steps=64).teleport(inputs, targets)
    limit = 10 * report.grad_norm_before
    assert report.stopped == "gain" and (1 - LANDED) * limit <= report.grad_norm_after <= limit
    assert all(norm <= limit for norm in report.grad_norms)


def test_relative_rates_above_one_are_refused():
    with pytest.raises(ValueError, match="lr is relative to the weights' norm"):
        tt.Teleporter(mlp(), F.cross_entropy, lr=10)
    tt.Teleporter(mlp(), F.cross_entropy, lr=10, normalize=False)  # a plain rate may be anything positive


def test_max_loss_change_must_be_a_non_negative_number():
    with pytest.raises(ValueError, match="max_loss_change"):
        tt.Teleporter(mlp(), F.cross_entropy, limits=tt.Limits(max_loss_change=-1.0))


# -- batch shapes ------------------------------------------------------------------------
def test_zero_size_batch_is_rejected():
    model = mlp()
    before = snapshot(model)
    inputs, targets = batch()
    with pytest.raises(ValueError, match="at least one sample"):
        tt.Teleporter(model, F.cross_entropy).teleport(inputs[:0], targets[:0])
    assert_unchanged(model, before)


def test_batch_of_one_is_invariant():
    inputs, targets = batch(size=1)
    report = assert_teleport_invariant(mlp(), F.cross_entropy, inputs, targets)
    assert [layer.null_dim for layer in report.layers] == [8, 16, 16]  # rank 1 of 9, 17, 17


# -- models ---------------------------------------------------------------------------
class Gain(nn.Module):
    """An elementwise gain: a layer no projector covers."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_model_without_supported_layers_is_refused():
    model = nn.Sequential(Gain(8), nn.Tanh(), Gain(8))
    with pytest.warns(UserWarning, match="no projector"), pytest.raises(ValueError, match="can be teleported"):
        tt.Teleporter(model, F.mse_loss)


def test_frozen_parameters_stay_put_and_the_rest_moves():
    model = mlp()
    model[2].weight.requires_grad_(False)
    before = snapshot(model)
    report = tt.Teleporter(model, F.cross_entropy).teleport(*batch())
    assert torch.equal(model[2].weight, before["2.weight"])
    assert report.frozen["2.bias"] == "its site has a parameter with requires_grad=False"
    # The last layer moves; the first cannot (its gradient lies in the span of the batch inputs).
    assert not torch.equal(model[4].weight, before["4.weight"])
    assert torch.equal(model[0].weight, before["0.weight"])
    assert report.loss_change < 1e-10


def test_parameters_shared_between_layers_stay_put():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        shared = nn.Linear(8, 8)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(8, 4)).double()
    before = snapshot(model)
    report = assert_teleport_invariant(model, F.cross_entropy, *batch(), null_space="exact")
    assert report.frozen["2.weight"] == report.frozen["2.bias"] == "shared between modules"
    teleporter = tt.Teleporter(model, F.cross_entropy)
    teleporter.teleport(*batch())
    assert torch.equal(shared.weight, before["2.weight"]) and torch.equal(shared.bias, before["2.bias"])
    # ... and are still the module's trainable parameters (not plain tensors left behind)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in (shared.weight, shared.bias))
    assert not torch.equal(model[5].weight, before["5.weight"])


def test_meta_device_model_gets_a_clear_error():
    model = mlp().to("meta")
    with pytest.raises(ValueError, match="meta device.*materialise"):
        tt.Teleporter(model, F.cross_entropy)


def test_eight_bit_model_is_refused():
    model = mlp().to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="float64, float32, bfloat16 and float16 parameters; 0.weight is"):
        tt.Teleporter(model, F.cross_entropy)


def test_teleport_under_autocast_runs_in_full_precision():
    inputs, targets = batch(dtype=torch.float32)
    plain, under_autocast = mlp(torch.float32), mlp(torch.float32)
    tt.Teleporter(plain, F.cross_entropy).teleport(inputs, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tt.Teleporter(under_autocast, F.cross_entropy).teleport(inputs, targets)
    for p, q in zip(plain.parameters(), under_autocast.parameters(), strict=True):
        assert torch.equal(p, q)


# -- the training run's failure policy --------------------------------------------------
class Always(tt.Schedule):
    def plan(self, *, epoch: int, step: int) -> TeleportPlan:
        return TeleportPlan(1, 2)


def train(teleport: bool, policy: str, teleport_data, steps: int = 3, objective: Objective | str = "grad_norm"):
    model = mlp(seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    options = {}
    if teleport:
        options = {"teleporter": tt.Teleporter(model, F.cross_entropy, objective=objective), "schedule": Always()}
    trainer = tt.TeleportTrainer(
        model, F.cross_entropy, optimizer, teleport_data=teleport_data, on_teleport_failure=policy, **options
    )
    results = [trainer.step(*batch(seed=10 + step)) for step in range(steps)]
    return model, results


@pytest.mark.parametrize("failure", ["rejected batch", "rolled back"])
def test_skip_policy_trains_on_as_if_there_had_been_no_teleport(failure):
    if failure == "rejected batch":
        inputs, targets = batch()
        inputs[0, 0] = float("nan")
        data, objective = [(inputs, targets)], "grad_norm"
    else:
        data, objective = None, InfiniteSlope()
    reference, _ = train(False, "skip", None)
    with pytest.warns(RuntimeWarning, match="training goes on"):
        model, results = train(True, "skip", data, objective=objective)
    assert all(len(result.failures) == 1 for result in results)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_raise_policy_stops_before_the_step_with_the_weights_as_they_were():
    inputs, targets = batch()
    inputs[0, 0] = float("inf")
    model = mlp(seed=1)
    before = snapshot(model)
    trainer = tt.TeleportTrainer(
        model,
        F.cross_entropy,
        torch.optim.SGD(model.parameters(), lr=0.1),
        teleporter=tt.Teleporter(model, F.cross_entropy),
        schedule=Always(),
        teleport_data=[(inputs, targets)],
        on_teleport_failure="raise",
    )
    with pytest.raises(TeleportFailedError, match="non-finite"):
        trainer.step(*batch(seed=3))
    assert_unchanged(model, before)
    assert trainer.global_step == 0


def test_failure_policy_is_checked():
    model = mlp()
    with pytest.raises(ValueError, match="on_teleport_failure"):
        tt.TeleportTrainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), on_teleport_failure="ignore")


# -- memory -----------------------------------------------------------------------------
def resident_bytes() -> int:
    """The process's resident set size now (``/proc/self/statm``, Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    return sum(issubclass(type(obj), torch.Tensor) for obj in gc.get_objects())


# Module outputs of a 2-step teleport of the 5-module MLP. Every path evaluates at the start and
# after each step (the last evaluation gives the final figures); the structured path adds a
# forward-mode pass per step, which stops at the last Linear's input (its output is not needed).
# The chain closed form captures once and measures the real loss once at the end (the drift check).
OUTPUTS = {"closed_form": 2 * 5, "structured": 6 * 5 - 2, "full": 4 * 5}


@pytest.mark.parametrize("gradient", sorted(OUTPUTS))
def test_teleports_keep_no_graph_alive_and_memory_does_not_grow(gradient):
    model = mlp(torch.float32)
    inputs, targets = batch(size=12, dtype=torch.float32)
    teleporter = tt.Teleporter(  # the closed form needs the exact null space; every path takes it alike
        model, F.cross_entropy, null_space="exact", steps=2, lr=1e-3, gradient=gradient
    )
    # Every module output of a forward with gradients is held by its autograd graph (Tanh saves
    # its output, the next Linear its input): a graph kept alive keeps one of them alive.
    outputs: list[weakref.ref] = []
    handles = [module.register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o))) for module in model]
    try:
        report = teleporter.teleport(inputs, targets)
    finally:
        for handle in handles:
            handle.remove()
    gc.collect()
    assert len(model) == 5 and report.steps == 2 and len(outputs) == OUTPUTS[gradient]
    assert [ref for ref in outputs if ref() is not None] == [], "a teleport left autograd graphs alive"

    for _ in range(20):  # warm-up: allocator pools and lazily built kernels
        teleporter.teleport(inputs, targets)
    tensors, resident = live_tensors(), resident_bytes()
    for _ in range(200):
        teleporter.teleport(inputs, targets)
    assert live_tensors() == tensors
    assert resident_bytes() - resident < 16 * 2**20
