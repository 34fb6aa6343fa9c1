"""The linear projector: property tests of teleports of random MLPs.

Every check is made twice over: through ``assert_teleport_invariant`` (as a
plugin author would) and against quantities measured here independently
(losses from plain forward passes, layer inputs from our own hooks).
"""

from __future__ import annotations

import pytest
import torch
from conftest import LOSS_RTOL, STEPS, batch_loss, reference_rank
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from torch_teleport import Teleporter
from torch_teleport.testing import assert_teleport_invariant, mlp_problems

ANNIHILATION_TOL = {torch.float64: 1e-11, torch.float32: 1e-5}


def linear_inputs(model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each ``nn.Linear``'s input on the batch, with the constant 1 of the bias appended."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: captured.__setitem__(name, args[0])
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    return {
        name: torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        if modules[name].bias is not None
        else x
        for name, x in captured.items()
    }


def weight_and_bias(module: nn.Linear) -> torch.Tensor:
    """``[W | b]``, the matrix that multiplies the input with a folded constant 1."""
    if module.bias is None:
        return module.weight.detach().clone()
    return torch.cat([module.weight.detach(), module.bias.detach()[:, None]], 1)


@given(mlp_problems())
def test_helper_accepts_the_builtin_linear_projector(problem):
    report = assert_teleport_invariant(
        problem.model,
        problem.loss_fn,
        problem.inputs,
        problem.targets,
        steps=STEPS,
        null_space="exact",
        lr=0.005,  # a fixed step takes every step; the step-length search stops where nothing improves
    )
    assert report.steps == STEPS or report.stopped == "no_room"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@given(data=st.data())
def test_loss_is_invariant_and_every_update_annihilates_its_inputs(dtype, data):
    problem = data.draw(mlp_problems(dtypes=(dtype,)), label="problem")
    model = problem.model
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    inputs_before = linear_inputs(model, problem.inputs)
    weights_before = {name: weight_and_bias(m) for name, m in linears.items()}
    loss_before = batch_loss(problem)

    report = Teleporter(model, problem.loss_fn, null_space="exact", steps=STEPS).teleport(
        problem.inputs, problem.targets
    )

    loss_after = batch_loss(problem)
    change = abs(loss_after - loss_before) / abs(loss_before)
    assert change <= LOSS_RTOL[dtype], f"relative loss change {change:.3e}"
    assert report.loss_before == loss_before
    assert abs(report.loss_after - loss_after) <= 1e-12 * abs(loss_after) + 1e-300
    assert report.loss_change <= LOSS_RTOL[dtype]
    assert not report.rolled_back

    # Per layer: [dW | db] X = 0, so every layer's pre-activations, hence every later input, stay put.
    inputs_after = linear_inputs(model, problem.inputs)
    for name, module in linears.items():
        before, after, x = weights_before[name], weight_and_bias(module), inputs_before[name]
        step = after - before
        scale = max(float(step.norm()), float(before.norm())) * float(x.norm())
        residual = float((step @ x.T).norm())
        assert residual <= ANNIHILATION_TOL[dtype] * scale, f"{name}: ||dW X|| = {residual:.3e}"
        torch.testing.assert_close(
            inputs_after[name], x, rtol=0, atol=ANNIHILATION_TOL[dtype] * 10 * float(x.abs().max())
        )

    # The layer report holds the exact null-space dimension of each layer's inputs.
    for layer in report.layers:
        x = inputs_before[layer.name.rsplit(".", 1)[0]]
        rank = reference_rank(x.T, dtype)
        assert (layer.input_dim, layer.null_dim, layer.samples) == (
            x.shape[1],
            x.shape[1] - rank,
            len(x),
        )
