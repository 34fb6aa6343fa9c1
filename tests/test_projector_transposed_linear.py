"""The projector for weights stored ``(in, out)``: Hugging Face's ``Conv1D`` (GPT-2) is matched by
name without importing ``transformers``, its transposed weight is viewed in place, and teleports
through it keep the batch loss invariant, on the full and the structured path."""

import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from torch_teleport import Site, Teleporter, build_registry
from torch_teleport.coverage import CoveredModule
from torch_teleport.projector import site_view
from torch_teleport.projectors.transposed_linear import TransposedLinearProjector
from torch_teleport.testing import (
    TokenClassifier,
    assert_structured_matches_full,
    assert_teleport_invariant,
)
from torch_teleport.update import FactoredSite

# These tests check that nothing here imports ``transformers``.
pytestmark = pytest.mark.usefixtures("transformers_unloaded")


def _conv1d_init(self, nf: int, nx: int) -> None:
    nn.Module.__init__(self)
    self.nf = nf
    self.nx = nx
    self.weight = nn.Parameter(torch.empty(nx, nf))
    self.bias = nn.Parameter(torch.zeros(nf))
    nn.init.normal_(self.weight, std=0.02)


def _conv1d_forward(self, x: Tensor) -> Tensor:
    size_out = x.size()[:-1] + (self.nf,)
    x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
    x = x.view(size_out)
    return x


# A class called ``Conv1D`` defined under ``transformers.pytorch_utils``, with GPT-2's forward.
Conv1D = type(
    "Conv1D",
    (nn.Module,),
    {
        "__init__": _conv1d_init,
        "forward": _conv1d_forward,
        "__module__": "transformers.pytorch_utils",
    },
)


class BiaslessConv1D(Conv1D):
    """The same map without a bias (matched through its base class)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__(nf, nx)
        self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        return (x.reshape(-1, x.size(-1)) @ self.weight).view(*x.shape[:-1], self.nf)


def conv1d(nf: int, nx: int, bias: bool) -> nn.Module:
    return Conv1D(nf, nx) if bias else BiaslessConv1D(nf, nx)


class MLPBlock(nn.Module):
    """GPT-2's MLP: ``c_fc`` (width to hidden), GELU, ``c_proj`` (hidden to width)."""

    def __init__(self, width: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.c_fc = conv1d(hidden, width, bias)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = conv1d(width, hidden, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


def gpt2_mlp_model(seed: int, width: int, hidden: int, bias: bool, dtype: torch.dtype) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = MLPBlock(width, hidden, bias)
        for layer in (block.c_fc, block.c_proj):
            nn.init.normal_(layer.weight, std=layer.nx**-0.5)
            if layer.bias is not None:
                nn.init.normal_(layer.bias, std=0.1)
        return TokenClassifier(block, width, width, 3).to(dtype)


def batch(
    seed: int, size: int, tokens: int, width: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, tokens, width, generator=generator, dtype=dtype)
    return inputs, torch.randint(0, 3, (size,), generator=generator)


problems = {
    "seed": st.integers(0, 2**31 - 1),
    "width": st.integers(2, 6),
    "hidden": st.integers(2, 8),
    "size": st.integers(1, 2),
    "tokens": st.integers(1, 4),
    "bias": st.booleans(),
}


def test_the_stand_in_is_matched_by_the_string_key():
    registry = build_registry()
    assert registry.projector_for(Conv1D(3, 2)) is TransposedLinearProjector
    assert registry.projector_for(BiaslessConv1D(3, 2)) is TransposedLinearProjector
    assert registry.projector_for(nn.Linear(2, 3)) is not TransposedLinearProjector


@given(**problems)
def test_weight_times_representation_is_the_layer(seed, width, hidden, size, tokens, bias):
    model = gpt2_mlp_model(seed, width, hidden, bias, torch.float64)
    inputs, _ = batch(seed, size, tokens, width, torch.float64)
    layer, projector = model.body.c_fc, TransposedLinearProjector()
    (site,) = projector.sites(layer)
    assert site.layout == "in_out" and (site.bias is not None) == bias
    assert projector.input_dim(layer, site) == width + bias
    weight = site_view(layer.weight, site)
    assert weight.shape == (1, hidden, width)
    if bias:
        weight = torch.cat([weight, site_view(layer.bias, site, bias=True)], dim=-1)
    with torch.no_grad():
        output = layer(inputs)
        product = weight @ projector.representation(layer, site, [inputs])
    expected = projector.output_representation(layer, site, [output])
    assert expected.shape == (1, hidden, size * tokens)
    torch.testing.assert_close(product, expected, rtol=1e-12, atol=1e-12)


@given(**problems, dtype=st.sampled_from([torch.float64, torch.float32]))
def test_teleport_keeps_the_batch_loss(seed, width, hidden, size, tokens, bias, dtype):
    model = gpt2_mlp_model(seed, width, hidden, bias, dtype)
    inputs, targets = batch(seed, size, tokens, width, dtype)
    report = assert_teleport_invariant(
        model, nn.functional.cross_entropy, inputs, targets, uncovered="error", steps=8
    )
    assert {"body.c_fc.weight", "body.c_proj.weight"} <= {layer.name for layer in report.layers}
    assert "transformers" not in sys.modules


@given(**problems)
def test_the_structured_step_equals_the_projected_full_step(
    seed, width, hidden, size, tokens, bias
):
    model = gpt2_mlp_model(seed, width, hidden, bias, torch.float64)
    inputs, targets = batch(seed, size, tokens, width, torch.float64)
    report = assert_structured_matches_full(model, nn.functional.cross_entropy, inputs, targets)
    for layer in report.layers:
        if layer.name.startswith("body."):
            assert layer.gradient == "structured", layer
    assert "transformers" not in sys.modules


def test_the_view_is_the_parameter_transposed_and_shares_its_storage():
    layer = Conv1D(4, 3).double()
    (site,) = TransposedLinearProjector().sites(layer)
    view = site_view(layer.weight, site)
    assert view.shape == (1, 4, 3)
    assert view.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(view[0], layer.weight.T, rtol=0, atol=0)
    rows = site_view(layer.weight, Site("weight", "input", "weight", rows=(1, 3), layout="in_out"))
    torch.testing.assert_close(rows[0], layer.weight.T[1:3], rtol=0, atol=0)
    assert site_view(layer.bias, site, bias=True).shape == (1, 4, 1)


def test_a_factored_update_is_added_to_the_parameter_in_place():
    torch.manual_seed(0)
    layer = Conv1D(4, 3).double()
    projector = TransposedLinearProjector()
    (site,) = projector.sites(layer)
    left = torch.randn(1, 4, 2, dtype=torch.float64)
    right = torch.randn(1, 2, 4, dtype=torch.float64)  # 3 inputs and the folded bias
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    with torch.no_grad():
        FactoredSite(
            CoveredModule("c_fc", layer, projector, [site]), site, left, right
        ).add_to_weights(0.5)
    update = 0.5 * (left @ right)[0]
    torch.testing.assert_close(
        layer.weight.detach(), weight + update[:, :3].T, rtol=1e-14, atol=1e-14
    )
    torch.testing.assert_close(layer.bias.detach(), bias + update[:, 3], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("gradient", ["structured", "full"])
def test_a_teleport_moves_the_weights_it_views(gradient):
    """Few samples (two tokens): the structured update stays factored and is added through the view."""
    model = gpt2_mlp_model(0, 6, 8, True, torch.float64)
    inputs, targets = batch(0, 1, 2, 6, torch.float64)
    block = model.body
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    report = Teleporter(
        model, nn.functional.cross_entropy, steps=4, gradient=gradient, null_space="exact"
    ).teleport(inputs, targets)
    assert report.loss_change <= 1e-10, report.summary()
    for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"):
        assert not torch.equal(block.get_parameter(name), before[name]), name
    assert report.grad_norm_after > report.grad_norm_before, report.summary()
    assert "transformers" not in sys.modules


def test_a_bad_layout_is_refused():
    with pytest.raises(ValueError, match="layout must be one of 'out_in', 'in_out', got 'bogus'"):
        Site("weight", "input", "weight", layout="bogus")
    with pytest.raises(ValueError, match=r"stored \(in, out\).*one group, got groups=2"):
        Site("weight", "input", "weight", layout="in_out", groups=2)


def test_transformers_is_never_imported():
    assert "transformers" not in sys.modules
