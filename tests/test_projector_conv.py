"""The convolution projector: its representation is exactly what the convolution multiplies,
and teleports through convolutions keep the batch loss invariant."""

import pytest
import torch
from einops import rearrange
from hypothesis import given
from torch import nn

from torch_teleport import Teleporter
from torch_teleport.projector import site_view
from torch_teleport.projectors import conv as conv_module
from torch_teleport.projectors.conv import ConvProjector
from torch_teleport.testing import assert_teleport_invariant, conv_problems

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


def _dense_product(conv: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[W | b] @ R`` per group, and the convolution's own output in the same layout."""
    projector = ConvProjector()
    (site,) = projector.sites(conv)
    representation = projector.representation(conv, site, [inputs])
    weight = site_view(conv.weight, site)
    if site.bias is not None:
        weight = torch.cat([weight, site_view(conv.bias, site, bias=True)], dim=-1)
    output = conv(inputs)
    if output.dim() == conv.weight.dim() - 1:  # unbatched
        output = output.unsqueeze(0)
    expected = rearrange(output.flatten(2), "n (g r) p -> g r (n p)", g=conv.groups)
    return weight @ representation, expected


@given(conv_problems(dtypes=(torch.float64,)))
def test_representation_times_weight_is_the_convolution(problem):
    stem, conv = problem.model[:2]
    with torch.no_grad():
        product, expected = _dense_product(conv, stem(problem.inputs))
    torch.testing.assert_close(product, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv_type", [nn.Conv1d, nn.Conv2d, nn.Conv3d])
def test_unbatched_inputs_are_unfolded_like_batched_ones(conv_type):
    torch.manual_seed(0)
    conv = conv_type(2, 4, 2, padding=1, padding_mode="circular", groups=2).double()
    inputs = torch.randn(2, *([4] * (conv.weight.dim() - 2)), dtype=torch.float64)
    with torch.no_grad():
        product, expected = _dense_product(conv, inputs)
    torch.testing.assert_close(product, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv_type", [nn.Conv1d, nn.Conv2d])
def test_a_module_called_twice_has_both_calls_patches_in_call_order(conv_type):
    """Two calls of different batch sizes (a shared module, or a batch split in two): the columns are
    the first call's patches, then the second's, each ``[W | b]`` times its own output."""
    torch.manual_seed(0)
    conv = conv_type(4, 6, 3, stride=2, padding=1, groups=2).double()
    shape = [5] * (conv.weight.dim() - 2)
    first, second = torch.randn(3, 4, *shape, dtype=torch.float64), torch.randn(2, 4, *shape, dtype=torch.float64)
    projector = ConvProjector()
    (site,) = projector.sites(conv)
    both = projector.representation(conv, site, [first, second])
    parts = [projector.representation(conv, site, [x]) for x in (first, second)]
    torch.testing.assert_close(both, torch.cat(parts, dim=-1), rtol=0, atol=0)
    with torch.no_grad():
        product, expected = _dense_product(conv, torch.cat([first, second]))
    torch.testing.assert_close(product, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [1, 200])
@given(problem=conv_problems(dtypes=(torch.float64,)))
def test_patches_cut_a_few_samples_at_a_time_are_the_whole_calls(problem, block):
    """The representation built from patches cut a sample at a time (or a few) equals the one built
    from the whole call's: the same columns in the same order."""
    stem, conv = problem.model[:2]
    projector = ConvProjector()
    (site,) = projector.sites(conv)
    with torch.no_grad():
        inputs = stem(problem.inputs)
    whole = projector.representation(conv, site, [inputs])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv_module, "PATCH_BLOCK", block)
        cut = projector.representation(conv, site, [inputs])
    torch.testing.assert_close(cut, whole, rtol=0, atol=0)


@given(conv_problems())
def test_teleport_keeps_the_batch_loss(problem):
    assert_teleport_invariant(problem.model, problem.loss_fn, problem.inputs, problem.targets)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_depthwise_strided_dilated_conv_has_room_and_moves(padding_mode):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 3, 1),
        nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2, groups=3, padding_mode=padding_mode),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding="same"),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).double()
    inputs = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    targets = torch.tensor([1])
    before = model[1].weight.detach().clone()
    report = Teleporter(model, nn.functional.cross_entropy, null_space="exact").teleport(inputs, targets)
    assert report.loss_change <= 1e-10
    layers = {layer.name: layer for layer in report.layers}
    assert layers["1.weight"].groups == 3
    assert layers["1.weight"].input_dim == 3 * (9 + 1)  # per group: 1 channel x 3x3 kernel + bias
    assert layers["1.weight"].samples == 9  # 3x3 output positions x 1 image
    assert layers["1.weight"].null_dim > 0 and layers["3.weight"].null_dim > 0
    assert not torch.equal(model[1].weight, before)


def test_gradient_norm_grows_on_a_small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    inputs, targets = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    report = Teleporter(model, nn.functional.cross_entropy, steps=8).teleport(inputs, targets)
    assert report.loss_change <= 1e-5
    assert report.grad_norm_after > 1.05 * report.grad_norm_before, report.summary()
    assert "1.weight" in report.frozen and "1.bias" in report.frozen
