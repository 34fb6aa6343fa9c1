"""The Teleporter: its grouped options, the grad modes it is called in, what it refuses, and the
model it leaves when a teleport fails half-way."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.limits import Limits
from torch_teleport.objective import Evaluation, Objective
from torch_teleport.plugins.methods.level_set import LevelSetMethod
from torch_teleport.plugins.methods.null_space import DEFAULT_DRIFT, NullSpaceMethod
from torch_teleport.plugins.methods.symmetry import SymmetryMethod


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def data(seed: int = 0, samples: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 6, generator=generator), torch.randint(
        0, 3, (samples,), generator=generator
    )


# -- grouped options ----------------------------------------------------------------------------


def test_a_method_is_named_with_its_options_or_given_built():
    named = tt.Teleporter(
        small_mlp(), F.cross_entropy, method="null_space", null_space="exact", gradient="full"
    )
    assert isinstance(named.method, NullSpaceMethod)
    assert (named.method.null_space, named.method.gradient) == ("exact", "full")
    built = NullSpaceMethod(gradient="structured")
    assert tt.Teleporter(small_mlp(), F.cross_entropy, method=built).method is built


def test_options_beside_a_built_method_are_refused():
    with pytest.raises(
        TypeError, match=r"give the options \['gradient', 'tau'\] to the NullSpaceMethod itself"
    ):
        tt.Teleporter(
            small_mlp(), F.cross_entropy, method=NullSpaceMethod(), tau=0.9, gradient="full"
        )


@pytest.mark.parametrize("field", sorted(Limits.__dataclass_fields__))
def test_a_limit_given_as_an_option_is_pointed_to_the_limits(field):
    with pytest.raises(
        TypeError, match=rf"^{field} is one of the limits: give limits=Limits\({field}=\.\.\.\)$"
    ):
        tt.Teleporter(small_mlp(), F.cross_entropy, **{field: 0.5})


@pytest.mark.parametrize(
    ("method", "option"), [("null_space", "colour"), ("level_set", "tau"), ("symmetry", "tau")]
)
def test_an_option_the_method_does_not_take_names_the_method(method, option):
    with pytest.raises(
        TypeError, match=rf"the '{method}' method does not take these options \['{option}'\]: .*'{option}'"
    ):
        tt.Teleporter(small_mlp(), F.cross_entropy, method=method, **{option: 1})


def test_limits_must_be_limits():
    with pytest.raises(TypeError, match="limits must be a torch_teleport.Limits, got dict"):
        tt.Teleporter(small_mlp(), F.cross_entropy, limits={"drift": 1e-3})


def test_the_methods_defaults_are_known_before_anything_is_built():
    assert tt.Teleporter(small_mlp(), F.cross_entropy).limits.drift == DEFAULT_DRIFT
    given = tt.Teleporter(small_mlp(), F.cross_entropy, limits=Limits(drift=1e-3, guard=0.5))
    assert (given.limits.drift, given.limits.guard) == (1e-3, 0.5)
    leaky = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.1), nn.Linear(16, 3))
    symmetric = tt.Teleporter(leaky, F.cross_entropy, method="symmetry")
    assert symmetric.limits.drift == SymmetryMethod.default_drift
    level_set = tt.Teleporter(
        small_mlp(), F.cross_entropy, method="level_set", limits=Limits(max_loss_change=0.1)
    )
    assert isinstance(level_set.method, LevelSetMethod)
    assert level_set.limits == Limits(
        drift=None, guard=None, max_gain=None, module_step=None, max_loss_change=0.1
    )


# -- grad modes ---------------------------------------------------------------------------------


def teleported(mode) -> tuple[tt.TeleportReport, nn.Module, tuple[bool, bool]]:
    """A teleport of a fresh model under ``mode`` (its batch made there too), and the grad and
    inference modes right after it, still inside ``mode``."""
    model = small_mlp()
    teleporter = tt.Teleporter(model, F.cross_entropy)
    with mode():
        inputs, targets = data()
        report = teleporter.teleport(inputs, targets)
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    return report, model, modes


@pytest.mark.parametrize(
    ("mode", "modes"),
    [(torch.no_grad, (False, False)), (torch.inference_mode, (False, True))],
    ids=["no_grad", "inference_mode"],
)
def test_a_teleport_inside_a_no_grad_mode_works_as_outside_and_leaves_the_mode_as_found(
    mode, modes
):
    report, model, found = teleported(mode)
    assert found == modes and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    outside, reference, _ = teleported(torch.enable_grad)
    assert report.steps == outside.steps > 0 and report.step_sizes == outside.step_sizes
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    assert all(p.requires_grad and not p.is_inference() for p in model.parameters())


# -- refusals and failures ----------------------------------------------------------------------


class PerSample(Objective):
    """The loss of each sample: a vector, not a scalar."""

    def evaluate(self, batch) -> Evaluation:
        losses = F.cross_entropy(batch.model(batch.inputs), batch.targets, reduction="none")
        return Evaluation(losses, losses.mean(), grad_norm=torch.tensor(1.0))


def test_an_objective_that_is_not_a_scalar_is_refused_and_the_model_left_alone():
    model = small_mlp()
    before = snapshot(model)
    teleporter = tt.Teleporter(model, F.cross_entropy, objective=PerSample())
    with pytest.raises(
        ValueError, match=r"the objective must return a scalar tensor, got shape \(8,\)"
    ):
        teleporter.teleport(*data())
    assert_unchanged(model, before)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("error", [Interrupted, KeyboardInterrupt])
@pytest.mark.parametrize(
    ("gradient", "call"),
    [
        ("structured", 4),
        ("full", 7),
        ("closed_form", 2),
    ],  # the closed form's second forward is the last
)
def test_the_model_is_restored_exactly_when_a_teleport_is_interrupted_half_way(
    error, gradient, call
):
    model = small_mlp()
    before = snapshot(model)
    start = copy.deepcopy(model)
    calls, moved = [0], []

    def loss_fn(output, targets):
        calls[0] += 1
        if calls[0] == call:
            moved.append(
                any(
                    not torch.equal(p, q)
                    for p, q in zip(model.parameters(), start.parameters(), strict=True)
                )
            )
            raise error("interrupted")
        return F.cross_entropy(output, targets)

    teleporter = tt.Teleporter(model, loss_fn, gradient=gradient, null_space="exact")
    with pytest.raises(error, match="interrupted"):
        teleporter.teleport(*data())
    assert moved == [True]  # the weights had moved when it was interrupted
    assert_unchanged(model, before)
