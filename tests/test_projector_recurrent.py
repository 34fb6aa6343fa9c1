"""The recurrent projectors: RNN, GRU and LSTM layers (projections included) and cells unrolled in a
loop move where they have room and keep the batch loss."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import Tensor, nn

from torch_teleport import Teleporter
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
