"""A tangent pass takes back the layer outputs the evaluation at the same weights computed.

Linear and convolution layers give their output's tangent without the output
(``Projector.output_tangent``); the pass then records the same tangents as one
that computes every output again, and falls back to computing them where the
weights moved or an output was changed in place since it was kept. Outputs
wider than their layer's input are not kept, nor any before a pass has run. The
structured path's equality with the full path (tests/test_structured.py) runs
with the outputs taken back too.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jvp
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.coverage import find_coverage
from torch_teleport.objective import Batch
from torch_teleport.output_reuse import ReusedOutputs, taking_back
from torch_teleport.structured import first_order_pass, tangent_streams


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")  # torch's own, on its first dual
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["linear", "conv1d", "conv2d"]),
    bias=st.booleans(),
    input_tangent=st.booleans(),
)
def test_a_layers_output_tangent_equals_forward_mode(seed, kind, bias, input_tangent):
    """``bilinear_tangent`` is forward mode's tangent of the layer's output, with or without an
    input tangent (the first layer's input has none), in float64."""
    generator = torch.Generator().manual_seed(seed)
    layer, inputs = _layer_and_input(kind, bias, generator)
    projector = tt.default_registry().projector_for(layer)()
    params = dict(layer.named_parameters())
    directions = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in params.items()}
    x_tangent = torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype) if input_tangent else torch.zeros_like(inputs)

    def output(x, named):
        return torch.func.functional_call(layer, named, (x,))

    _, expected = jvp(output, (inputs, params), (x_tangent, directions))
    with fwAD.dual_level():
        duals = {name: fwAD.make_dual(p.detach(), directions[name]) for name, p in params.items()}
        x = fwAD.make_dual(inputs, x_tangent) if input_tangent else inputs
        with torch.nn.utils.stateless._reparametrize_module(layer, duals):
            tangent = projector.output_tangent(layer)(x)
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-12)


def test_a_subclass_that_overrides_forward_computes_its_output_itself():
    """Only the stock forward is the map the projector knows."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    registry = tt.default_registry()
    assert registry.projector_for(Scaled(3, 2))().output_tangent(Scaled(3, 2)) is None
    assert registry.projector_for(nn.Linear(3, 2))().output_tangent(nn.Linear(3, 2)) is not None


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_pass_with_the_outputs_taken_back_records_the_same_tangents(kind):
    """Every layer the pass reaches takes its kept output; the tangents are those of a pass that
    computes the outputs again (a nonlinear model: a wrong primal would change them)."""
    model, batch, modules, direction = _problem(kind)
    outputs = _evaluated(batch, modules)
    reused = tangent_streams(batch, direction, modules, outputs=outputs)
    assert outputs.used == {id(c.module) for c in modules}
    _assert_same(reused, tangent_streams(batch, direction, modules))


def test_outputs_kept_before_the_weights_moved_are_computed_again():
    model, batch, modules, direction = _problem("linear")
    outputs = _evaluated(batch, modules)
    with torch.no_grad():
        model[2].weight.add_(0.5)
    reused = tangent_streams(batch, direction, modules, outputs=outputs)
    assert id(model[2]) not in outputs.used and id(model[0]) in outputs.used
    _assert_same(reused, tangent_streams(batch, direction, modules))


def test_an_output_an_in_place_activation_changed_is_computed_again():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model, batch, modules, direction = _problem("linear", model)
    outputs = _evaluated(batch, modules)
    reused = tangent_streams(batch, direction, modules, outputs=outputs)
    assert id(model[0]) not in outputs.used and id(model[2]) in outputs.used
    _assert_same(reused, tangent_streams(batch, direction, modules))


def test_a_layer_wider_at_its_output_than_at_its_input_keeps_nothing():
    """Its output would outgrow the input the backward holds for it anyway."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    model, batch, modules, direction = _problem("linear", model)
    outputs = _evaluated(batch, modules)
    reused = tangent_streams(batch, direction, modules, outputs=outputs)
    assert outputs.used == {id(model[2])} and outputs.reached == {id(model[0]), id(model[2])}
    _assert_same(reused, tangent_streams(batch, direction, modules))


def test_the_first_evaluation_keeps_nothing_and_its_pass_names_the_layers_it_ran():
    """A pass that ends at the last moving layer's inputs runs only the layers before it: later
    evaluations keep only their outputs (a language model's logits are never kept)."""
    model, batch, modules, direction = _problem("linear")
    outputs = ReusedOutputs(taking_back(modules), None)
    first_order_pass(batch, [(c, s) for c in modules for s in c.sites], outputs=outputs)
    moving = [c for c in modules if c.name == "2"]
    streams = {(c.name, s.stream): 1 for c in moving for s in c.sites}
    tangent_streams(batch, direction, moving, until=streams, outputs=outputs)
    assert outputs.used == set() and outputs.reached == {id(model[0])}


def _layer_and_input(kind: str, bias: bool, generator: torch.Generator):
    size = int(torch.randint(2, 6, (1,), generator=generator))
    if kind == "linear":
        layer = nn.Linear(size, size + 1, bias=bias)
        inputs = torch.randn(3, 2, size, generator=generator)
    elif kind == "conv1d":
        layer = nn.Conv1d(size, 4, 3, padding=1, stride=2, bias=bias, padding_mode="circular")
        inputs = torch.randn(2, size, 7, generator=generator)
    else:
        layer = nn.Conv2d(size, 4, 3, padding=1, groups=1, bias=bias)
        inputs = torch.randn(2, size, 5, 5, generator=generator)
    return layer.double(), inputs.double()


def _problem(kind: str, model: nn.Module | None = None):
    torch.manual_seed(0)
    if model is None and kind == "linear":
        model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    elif model is None:
        model = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.Tanh(),
            nn.Flatten(), nn.Linear(4 * 9, 3),
        ).double()  # fmt: skip
    inputs = torch.randn(7, 6, dtype=torch.float64) if kind == "linear" else torch.randn(7, 4, 5, 5, dtype=torch.float64)
    batch = Batch(model, F.cross_entropy, inputs, torch.randint(0, 3, (7,)), list(model.parameters()))
    modules = find_coverage(model, tt.default_registry()).modules
    direction = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    return model, batch, modules, direction


def _evaluated(batch: Batch, modules) -> ReusedOutputs:
    outputs = ReusedOutputs(taking_back(modules), {id(c.module) for c in modules})
    first_order_pass(batch, [(c, s) for c in modules for s in c.sites], outputs=outputs)
    return outputs


def _assert_same(reused: dict, computed: dict) -> None:
    assert reused.keys() == computed.keys()
    for key in computed:
        for a, b in zip(reused[key], computed[key], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
