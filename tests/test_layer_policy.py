"""The policy for every other parameterised layer: recurrent layers move where they have room;
normalisation, embeddings and learned offsets are frozen with their reason; dropout is off,
BatchNorm statistics come back and residual connections need nothing special."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import Tensor, nn

from torch_teleport import Teleporter, build_registry
from torch_teleport.projectors.frozen import (
    AdditiveOffsetPolicy,
    EmbeddingPolicy,
    NormalizationPolicy,
)
from torch_teleport.projectors.recurrent import PROJECTION_REASON
from torch_teleport.testing import (
    RecurrentBody,
    TokenClassifier,
    assert_teleport_invariant,
    sequence_problems,
)

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


@given(sequence_problems())
def test_recurrent_teleport_keeps_the_batch_loss(problem):
    assert_teleport_invariant(
        problem.model, problem.loss_fn, problem.inputs, problem.targets, null_space="exact"
    )


@pytest.mark.parametrize(
    "make_rnn",
    [
        lambda: nn.RNN(3, 6, num_layers=2, bidirectional=True),
        lambda: nn.GRU(3, 6, num_layers=2, bidirectional=True, batch_first=True),
        lambda: nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=5),
    ],
    ids=["rnn", "gru", "lstm-proj"],
)
def test_recurrent_weights_move_where_there_is_room(make_rnn):
    torch.manual_seed(0)  # before the module is built: its weights must not depend on collection order
    rnn = make_rnn().double()
    directions, width = 2, rnn.proj_size or rnn.hidden_size
    initial = torch.randn(2 * directions, 1, rnn.hidden_size, dtype=torch.float64)
    model = TokenClassifier(
        RecurrentBody(rnn, initial, None, False), 3, width * directions, 3
    ).double()
    inputs, targets = torch.randn(1, 2, 3, dtype=torch.float64), torch.tensor([1])
    before = {name: p.detach().clone() for name, p in rnn.named_parameters()}
    report = Teleporter(model, F.cross_entropy, null_space="exact", steps=8).teleport(inputs, targets)
    assert report.loss_change <= 1e-10
    assert report.grad_norm_after > 1.05 * report.grad_norm_before, report.summary()
    moved = {name for name, p in rnn.named_parameters() if not torch.equal(p, before[name])}
    assert {"weight_ih_l1", "weight_hh_l1", "weight_hh_l1_reverse", "weight_hh_l0"} <= moved, moved
    if rnn.proj_size:
        assert report.frozen["body.rnn.weight_hr_l0"] == PROJECTION_REASON
        assert not any(name.startswith("weight_hr") for name in moved)


@pytest.mark.parametrize("cell_type", [nn.RNNCell, nn.GRUCell, nn.LSTMCell])
def test_recurrent_cells_unrolled_in_a_loop_keep_the_batch_loss(cell_type):
    class Unrolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 3)
            self.cell = cell_type(3, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            state = None
            for step in self.embed(x).unbind(1):
                state = self.cell(step, state)
            return self.head(state[0] if isinstance(state, tuple) else state)

    torch.manual_seed(0)
    model = Unrolled().double()
    inputs, targets = torch.randn(1, 3, 3, dtype=torch.float64), torch.tensor([2])
    report = assert_teleport_invariant(model, F.cross_entropy, inputs, targets, null_space="exact")
    layers = {layer.name: layer for layer in report.layers}
    assert layers["cell.ih"].samples == 3 and layers["cell.hh"].samples == 3  # zero state, h_1, h_2
    assert layers["cell.hh"].null_dim > 0


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


class Gain(nn.Module):
    """An elementwise gain and shift, standing for a layer type no projector knows."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))
        self.shift = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain + self.shift


def gains(count: int, width: int = 4) -> list[nn.Module]:
    return [Gain(width) for _ in range(count)]


def test_nothing_to_move_names_the_uncovered_types_apart_from_the_frozen_ones():
    model = nn.Sequential(nn.Embedding(5, 4), *gains(12), nn.LayerNorm(4))
    with pytest.raises(ValueError) as raised:
        Teleporter(model, F.cross_entropy, uncovered="freeze")
    message = str(raised.value)
    assert message.startswith("no parameter of Sequential can be teleported (27 trainable: ")
    assert "No projector for the module types Gain x12 (1.gain, 1.shift, 2.gain, ... (24 in all))" in message
    assert f"Kept fixed: Embedding x1 (0.weight), reason: {EmbeddingPolicy.reason}" in message
    assert f"LayerNorm x1 (13.weight, 13.bias), reason: {NormalizationPolicy.reason}" in message
    assert message.index("No projector") < message.index("Kept fixed")
    assert "Embedding" not in message[message.index("No projector") : message.index("Kept fixed")]
    assert "registry.add_projector(ModuleType, ProjectorClass)" in message
    assert "teleport_register_projectors" in message and "docs/plugins.md" in message
    assert "7.gain" not in message  # counted, not listed


def test_a_model_without_trainable_parameters_says_so():
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of Linear can be teleported: it has no trainable parameters"):
        Teleporter(model, F.cross_entropy)


def test_the_warning_groups_uncovered_parameters_by_module_type():
    model = nn.Sequential(nn.Linear(4, 4), *gains(10), nn.Linear(4, 3))
    with pytest.warns(UserWarning) as warned:
        teleporter = Teleporter(model, F.cross_entropy)
    (warning,) = [w for w in warned if "leaves these parameters fixed" in str(w.message)]
    message = str(warning.message)
    assert (
        "teleport leaves these parameters fixed (no projector for their module): "
        "Gain x10 (1.gain, 1.shift, 2.gain, ... (20 in all))" in message
    )
    assert "registry.add_projector" in message and "5.gain" not in message
    inputs, targets = torch.randn(2, 4), torch.tensor([0, 2])
    report = teleporter.teleport(inputs, targets)
    uncovered = [name for name, reason in report.frozen.items() if reason == "no projector for its module"]
    assert uncovered == [f"{i}.{p}" for i in range(1, 11) for p in ("gain", "shift")]


def test_the_error_policy_names_parameters_and_counts_module_types():
    model = nn.Sequential(nn.Linear(4, 4), *gains(3), nn.PReLU(4))
    with pytest.raises(ValueError) as raised:
        Teleporter(model, F.cross_entropy, uncovered="error")
    message = str(raised.value)
    assert message.startswith(
        "no projector covers these parameters: 1.gain, 1.shift, 2.gain, 2.shift, 3.gain, 3.shift, "
        "... (7 in all); by module type: Gain x3 (6 parameters); PReLU x1 (1 parameter)."
    )
    assert 'uncovered policy "warn" or "freeze"' in message
