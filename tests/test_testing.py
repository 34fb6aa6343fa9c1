"""The testing kit judges the projector, not the engine's safety net: wrong projectors fail
``assert_teleport_invariant`` in float32 as in float64, the right one passes the same problems."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import torch_teleport as tt
from torch_teleport.projectors.linear import LinearProjector
from torch_teleport.testing import DEFAULT_STEPS, Problem, assert_teleport_invariant

DTYPES = (torch.float64, torch.float32)


class Dense(nn.Linear):
    """A dense layer of its own type, so that a registry can give it the projector under test."""


class DroppingSamples(LinearProjector):
    """Wrong: it keeps every other sample (of its inputs and, consistently, of its output gradients),
    so it projects onto a null space that the dropped samples' inputs do not lie in."""

    def representation(self, module, site, captured):
        return super().representation(module, site, captured)[..., ::2]

    def output_representation(self, module, site, outputs):
        return super().output_representation(module, site, outputs)[..., ::2]


class ForgettingTheBias(LinearProjector):
    """Wrong: the constant-1 row of the bias is left at zero, so the bias moves unconstrained."""

    def representation(self, module, site, captured):
        representation = super().representation(module, site, captured).clone()
        if site.bias is not None:
            representation[:, -1, :] = 0
        return representation


def registry_with(projector: type) -> tt.Registry:
    """The installed plugins, with ``projector`` for :class:`Dense`."""
    registry = tt.build_registry()
    registry.add_projector(Dense, projector)
    return registry


@st.composite
def dense_problems(draw, dtype: torch.dtype, bias: bool | None = None) -> Problem:
    """MLPs of :class:`Dense` layers whose every layer has room beyond the batch: each is wider
    than the batch plus the bias's constant 1, so dropping samples enlarges its null space."""
    seed = draw(st.integers(0, 2**31 - 1))
    batch = draw(st.integers(2, 6))
    widths = draw(st.lists(st.integers(batch + 2, 16), min_size=2, max_size=3))
    bias = draw(st.booleans()) if bias is None else bias
    activation = draw(st.sampled_from((nn.Tanh, nn.GELU, nn.LeakyReLU)))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [Dense(width_in, width_out, bias=bias), activation()]
        model = nn.Sequential(*layers, Dense(widths[-1], 3, bias=bias)).to(dtype)
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=dtype)
    targets = torch.randint(0, 3, (batch,), generator=generator)
    return Problem(model, inputs, targets, nn.functional.cross_entropy, seed)


GRADIENTS = st.sampled_from(("auto", "structured", "full"))
"""Every gradient path: the closed form (``"auto"`` on these chains), structured, double backward."""

CHANGED = r"the outputs of module '\d+' \(Dense\) on the teleport batch changed {when}"


def assert_fails(problem: Problem, projector: type, gradient: str, when: str) -> None:
    """``assert_teleport_invariant`` fails on the outputs check ``when``: that check compares real
    forward passes, so it fails only where the weights really moved."""
    with pytest.raises(AssertionError, match=CHANGED.format(when=when)):
        assert_teleport_invariant(
            problem.model, problem.loss_fn, problem.inputs, problem.targets,
            registry=registry_with(projector), uncovered="error", gradient=gradient,
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@given(data=st.data(), gradient=GRADIENTS)
def test_a_projector_that_drops_samples_fails_in_either_dtype(dtype, data, gradient):
    problem = data.draw(dense_problems(dtype), label="problem")
    assert_fails(problem, DroppingSamples, gradient, "after the teleport")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@given(data=st.data(), gradient=GRADIENTS)
def test_a_projector_that_forgets_the_bias_fails_in_either_dtype(dtype, data, gradient):
    """The full gradient has a bias part that the wrong null space lets through: the teleport moves
    the outputs. The structured paths' steps never move along the bias's constant 1, so their
    teleport stays invariant; the random projected update the kit also checks shows the fault."""
    problem = data.draw(dense_problems(dtype, bias=True), label="problem")
    when = "after the teleport" if gradient == "full" else "under a random update projected by its projector"
    assert_fails(problem, ForgettingTheBias, gradient, when)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@given(data=st.data(), gradient=GRADIENTS)
def test_the_right_projector_passes_the_same_problems(dtype, data, gradient):
    problem = data.draw(dense_problems(dtype), label="problem")
    before = {name: p.detach().clone() for name, p in problem.model.named_parameters()}
    report = assert_teleport_invariant(
        problem.model, problem.loss_fn, problem.inputs, problem.targets,
        registry=registry_with(LinearProjector), uncovered="error", gradient=gradient,
    )
    assert report.steps == DEFAULT_STEPS and report.grad_norm_after != report.grad_norm_before
    assert all(layer.null_dim > 0 for layer in report.layers)  # every layer had room: the check says something
    assert all(torch.equal(p, before[name]) for name, p in problem.model.named_parameters())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in problem.model.modules())


def small_problem() -> Problem:
    """One fixed float64 problem, for the checks of the kit's own arguments."""
    torch.manual_seed(0)
    model = nn.Sequential(Dense(6, 8), nn.Tanh(), Dense(8, 3)).double()
    inputs = torch.randn(4, 6, dtype=torch.float64)
    return Problem(model, inputs, torch.tensor([0, 1, 2, 0]), nn.functional.cross_entropy, 0)


def test_limits_are_refused_with_the_reason():
    problem = small_problem()
    with pytest.raises(TypeError, match="limits off and takes no limits=.*a wrong projector would pass"):
        assert_teleport_invariant(
            problem.model, problem.loss_fn, problem.inputs, problem.targets, limits=tt.Limits(drift=1e-3)
        )


@pytest.mark.parametrize("lr", [None, tt.LineSearch()], ids=["none", "line_search"])
def test_a_step_length_search_is_refused_with_the_reason(lr):
    problem = small_problem()
    with pytest.raises(TypeError, match="takes a fixed rate.*a wrong projector would pass"):
        assert_teleport_invariant(problem.model, problem.loss_fn, problem.inputs, problem.targets, lr=lr)
