"""The frozen-layer policies: normalisation, embeddings and learned offsets are frozen with their
reason; dropout is off, BatchNorm statistics come back and residual connections need nothing special."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_teleport import Teleporter, build_registry
from torch_teleport.projectors.frozen import (
    AdditiveOffsetPolicy,
    EmbeddingPolicy,
    NormalizationPolicy,
)
from torch_teleport.testing import assert_teleport_invariant


class LearnedPositions(nn.Module):
    """A bare learned tensor added to the token embeddings: a module no built-in projector knows."""

    def __init__(self, length: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(length, width) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight[: x.shape[1]]


class EverythingElse(nn.Module):
    """Embedding, learned positions, LayerNorm, GroupNorm, BatchNorm, dropout and a residual block."""

    def __init__(self, vocabulary: int = 11, width: int = 8, length: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.positions = LearnedPositions(length, width)
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, width)
        self.group_norm = nn.GroupNorm(2, width)
        self.dropout = nn.Dropout(0.5)
        self.outer = nn.Linear(width, width)
        self.batch_norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.norm(self.positions(self.embedding(tokens)))
        residual = self.outer(
            self.dropout(torch.relu(self.group_norm(self.inner(x).transpose(1, 2)))).transpose(1, 2)
        )
        x = x + residual
        return self.head(self.batch_norm(x.transpose(1, 2)).mean(-1))


def _batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 11, (2, 4), generator=generator), torch.randint(
        0, 3, (2,), generator=generator
    )


def test_other_layers_are_frozen_with_their_reason_and_left_bit_identical():
    torch.manual_seed(0)
    model = EverythingElse().double()
    tokens, targets = _batch()
    frozen_names = [
        "embedding.weight",
        "norm.weight",
        "norm.bias",
        "group_norm.weight",
        "batch_norm.bias",
    ]
    frozen_before = {name: model.get_parameter(name).detach().clone() for name in frozen_names}
    statistics_before = [b.clone() for b in model.batch_norm.buffers()]
    with pytest.warns(UserWarning, match="positions.weight"):
        report = Teleporter(model, F.cross_entropy, null_space="exact", steps=8, lr=0.02).teleport(
            tokens, targets
        )
    assert report.loss_change <= 1e-10  # with dropout on, two forward passes would differ
    assert report.grad_norm_after > 1.05 * report.grad_norm_before, report.summary()
    assert report.frozen["embedding.weight"] == EmbeddingPolicy.reason
    for name in ("norm.weight", "group_norm.bias", "batch_norm.weight"):
        assert report.frozen[name] == NormalizationPolicy.reason
    assert report.frozen["positions.weight"] == "no projector for its module"
    for name, value in frozen_before.items():
        assert torch.equal(model.get_parameter(name), value), name
    for buffer, value in zip(model.batch_norm.buffers(), statistics_before, strict=True):
        assert torch.equal(buffer, value)
    assert model.training and model.dropout.training and model.batch_norm.training


def test_other_layers_keep_the_batch_loss_in_both_precisions():
    tokens, targets = _batch()
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        model = EverythingElse().to(dtype)
        assert_teleport_invariant(
            model, F.cross_entropy, tokens, targets, uncovered="freeze", null_space="exact"
        )


def test_a_registered_offset_policy_names_its_reason_without_a_warning():
    registry = build_registry()
    registry.add_projector(LearnedPositions, AdditiveOffsetPolicy)
    torch.manual_seed(0)
    model = EverythingElse().double()
    tokens, targets = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = Teleporter(model, F.cross_entropy, uncovered="error", registry=registry).teleport(
            tokens, targets
        )
    assert report.frozen["positions.weight"] == AdditiveOffsetPolicy.reason
