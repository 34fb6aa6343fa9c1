"""The model zoo: every registered model builds, runs, and teleports with an invariant batch loss."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn import functional as F

from torch_teleport import Teleporter, default_registry
from torch_teleport.bases import NO_ROOM
from torch_teleport.lab.models.mamba_block import MambaBlock
from torch_teleport.lab.models.transformer import LearnedPositions
from torch_teleport.projectors.frozen import (
    AdditiveOffsetPolicy,
    EmbeddingPolicy,
    NormalizationPolicy,
)
from torch_teleport.projectors.mamba import FROZEN as MAMBA_FROZEN
from torch_teleport.testing import assert_structured_matches_full, assert_teleport_invariant

Make = Callable[[torch.Generator], Tensor]


def floats(*shape: int) -> Make:
    return lambda generator: torch.randn(*shape, generator=generator, dtype=torch.float64)


def labels(high: int, *shape: int) -> Make:
    return lambda generator: torch.randint(0, high, shape, generator=generator)


@dataclass(frozen=True)
class Case:
    """A zoo model with small widths and a tiny batch (fewer tokens than widths: room to move)."""

    model: str
    options: dict
    inputs: Make
    targets: Make
    loss: Callable[[Tensor, Tensor], Tensor]
    output_shape: tuple[int, ...]


SEQUENCE = dict(heads=2, head_dim=4, layers=2, ff_mult=2)
MAMBA = dict(d_model=8, layers=1, d_state=4)
CASES = {
    "mlp": Case(
        "mlp",
        dict(input_dim=6, hidden=(12,), output_dim=3),
        floats(4, 6),
        labels(3, 4),
        F.cross_entropy,
        (4, 3),
    ),
    "cnn": Case(
        "cnn",
        dict(in_channels=1, channels=(4, 8), image_size=8, num_classes=3),
        floats(2, 1, 8, 8),
        labels(3, 2),
        F.cross_entropy,
        (2, 3),
    ),
    "resnet": Case(
        "resnet",
        dict(in_channels=1, widths=(2, 3), strides=(2, 2), num_classes=3),
        floats(2, 1, 8, 8),
        labels(3, 2),
        F.cross_entropy,
        (2, 3),
    ),
    "resnet_batch_norm": Case(
        "resnet",
        dict(in_channels=1, widths=(2, 3), strides=(2, 2), num_classes=3, batch_norm=True),
        floats(2, 1, 8, 8),
        labels(3, 2),
        F.cross_entropy,
        (2, 3),
    ),
    "transformer_classifier": Case(
        "transformer_classifier",
        dict(input_dim=3, seq_len=3, num_classes=3, **SEQUENCE),
        floats(2, 3, 3),
        labels(3, 2),
        F.cross_entropy,
        (2, 3),
    ),
    "transformer_regressor": Case(
        "transformer_regressor",
        dict(n_series=3, window=3, **SEQUENCE),
        floats(2, 3, 3),
        floats(2, 3),
        F.mse_loss,
        (2, 3),
    ),
    "transformer_lm": Case(
        "transformer_lm",
        dict(vocab_size=7, seq_len=3, **SEQUENCE),
        labels(7, 2, 3),
        labels(7, 2, 3),
        F.cross_entropy,
        (2, 7, 3),
    ),
    "mamba_classifier": Case(
        "mamba_classifier",
        dict(input_dim=3, num_classes=3, **MAMBA),
        floats(2, 3, 3),
        labels(3, 2),
        F.cross_entropy,
        (2, 3),
    ),
    "mamba_lm": Case(
        "mamba_lm",
        dict(vocab_size=7, norm="layer", **MAMBA),
        labels(7, 2, 3),
        labels(7, 2, 3),
        F.cross_entropy,
        (2, 7, 3),
    ),
}


def build(case: Case, seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    """The case's model in float64 (initialised from ``seed``) and a batch drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = default_registry().get("model", case.model)(**case.options).double()
    generator = torch.Generator().manual_seed(seed)
    return model, case.inputs(generator), case.targets(generator)


def structurally_frozen(model: nn.Module) -> dict[str, str]:
    """The parameters a teleport can never move, with the reason the report must give."""
    expected = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.LayerNorm | nn.RMSNorm | nn.BatchNorm2d):
            reasons = dict.fromkeys(("weight", "bias"), NormalizationPolicy.reason)
        elif isinstance(module, LearnedPositions):
            reasons = {"weight": AdditiveOffsetPolicy.reason}
        elif isinstance(module, nn.Embedding):
            reasons = {"weight": EmbeddingPolicy.reason}
        elif isinstance(module, MambaBlock):
            reasons = dict(MAMBA_FROZEN)
        else:
            continue
        for local, _ in module.named_parameters(recurse=False):
            expected[f"{prefix}.{local}" if prefix else local] = reasons[local]
    return expected


def test_every_registered_model_has_a_case():
    assert set(default_registry().names("model")) == {case.model for case in CASES.values()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_shape(name):
    case = CASES[name]
    model, inputs, _ = build(case, 0)
    assert model(inputs).shape == case.output_shape


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1))
def test_teleport_keeps_the_batch_loss_and_explains_what_stays_fixed(name, seed):
    """Exact null space (the helper's), float64: loss invariant, frozen list fully explained, gradient norm up."""
    case = CASES[name]
    model, inputs, targets = build(case, seed)
    report = assert_teleport_invariant(model, case.loss, inputs, targets)
    no_room = {layer.name for layer in report.layers if layer.null_dim == 0}
    expected = structurally_frozen(model)
    for parameter, reason in report.frozen.items():
        if reason == NO_ROOM:  # a moved site's weight and bias are named after the site, or are it
            assert any(
                parameter == site or parameter.startswith(site.rsplit(".", 1)[0] + ".")
                for site in no_room
            )
        else:
            assert expected.get(parameter) == reason, f"{parameter} frozen for {reason!r}"
    assert set(expected) <= set(report.frozen)
    assert any(layer.null_dim > 0 for layer in report.layers)
    assert report.grad_norm_after > report.grad_norm_before


@pytest.mark.parametrize("name", sorted(CASES))
def test_frozen_parameters_are_bit_identical_after_a_teleport(name):
    case = CASES[name]
    model, inputs, targets = build(case, 1)
    before = copy.deepcopy(model.state_dict())
    report = Teleporter(model, case.loss, uncovered="error").teleport(inputs, targets)
    after = model.state_dict()
    for parameter in report.frozen:
        assert torch.equal(after[parameter], before[parameter]), parameter
    moved = [key for key in before if not torch.equal(after[key], before[key])]
    assert moved and not set(moved) & set(report.frozen)


# -- the paper's architectures at their default sizes ------------------------------------------
def conv_channels(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_channels, m.out_channels) for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_cnn_defaults_are_the_papers_cifar_network():
    model = default_registry().get("model", "cnn")()
    assert conv_channels(model) == [(3, 16), (16, 32), (32, 64)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="too small"):
        default_registry().get("model", "cnn")(image_size=4)


def test_resnet_defaults_are_the_papers_tiny_imagenet_network():
    model = default_registry().get("model", "resnet")()
    assert conv_channels(model) == [
        (3, 64),
        (64, 64),
        (64, 64),
        (64, 128),
        (128, 128),
        (128, 128),
        (128, 256),
        (256, 256),
        (256, 256),
    ]
    assert not any(isinstance(m, nn.MaxPool2d | nn.BatchNorm2d) for m in model.modules())
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 200)
    with pytest.raises(ValueError, match="one stride per stage"):
        default_registry().get("model", "resnet")(strides=(2, 2))


def test_resnet_blocks_are_residual():
    """With the second conv of a block zeroed, ``relu(x + 0) = x``: the skip path carries x."""
    model = default_registry().get("model", "resnet")(
        in_channels=1, widths=(2, 3), strides=(1, 1), num_classes=3
    )
    stage = model[0]
    x = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stage.blocks[0][1][0].weight.zero_()
        stage.blocks[0][1][0].bias.zero_()
        torch.testing.assert_close(stage(x), stage.entry(x))


@pytest.mark.parametrize(
    ("name", "inputs", "output", "layers", "heads", "d_model"),
    [
        ("transformer_classifier", torch.zeros(1, 784, 1), (1, 10), 2, 2, 128),
        ("transformer_regressor", torch.zeros(1, 168, 321), (1, 321), 4, 4, 256),
        ("transformer_lm", torch.zeros(1, 256, dtype=torch.long), (1, 10000, 256), 4, 4, 256),
    ],
)
def test_transformer_defaults_follow_the_paper(name, inputs, output, layers, heads, d_model):
    model = default_registry().get("model", name)()
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attention) == layers
    assert all(m.num_heads == heads and m.embed_dim == d_model for m in attention)
    with torch.no_grad():
        assert model(inputs).shape == output


def test_transformer_lm_is_causal():
    """Changing the last token leaves every earlier position's logits unchanged."""
    model = (
        default_registry()
        .get("model", "transformer_lm")(vocab_size=11, seq_len=6, **SEQUENCE)
        .eval()
    )
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 11
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[..., :-1], model(changed)[..., :-1])
        assert not torch.allclose(model(tokens)[..., -1], model(changed)[..., -1])


def test_mamba_lm_is_causal():
    model = default_registry().get("model", "mamba_lm")(vocab_size=11, **MAMBA)
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 11
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[..., :-1], model(changed)[..., :-1])


def test_bad_options_are_rejected():
    registry = default_registry()
    with pytest.raises(ValueError, match="readout"):
        registry.get("model", "transformer_regressor")(readout="first")
    with pytest.raises(ValueError, match="norm"):
        registry.get("model", "mamba_classifier")(norm="batch")
    with pytest.raises(ValueError, match="longer than max_len"):
        registry.get("model", "transformer_classifier")(seq_len=4, **SEQUENCE)(torch.zeros(1, 5, 1))


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=3)
@given(seed=st.integers(0, 2**31 - 1))
def test_every_zoo_model(name, seed):
    case = CASES[name]
    model, inputs, targets = build(case, seed)
    assert_structured_matches_full(model, case.loss, inputs, targets)
