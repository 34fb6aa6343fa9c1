"""Projectors for ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their single-step cells.

Every gate of every step reads two affine maps: ``W_ih x_t + b_ih`` of the
step's input and ``W_hh h_{t-1} + b_hh`` of the previous hidden state. Each
is a site: moving ``W_ih`` in the null space of the inputs and ``W_hh`` in the
null space of the hidden states keeps every gate, hence every state and
output, unchanged on the batch (GRU's reset gate multiplies ``W_hn h + b_hn``
as a whole, which stays unchanged too).

The fused kernels hide the layers' inner sequences, so they are replayed one
layer at a time with the module's own weights (single-layer modules built on
the meta device, sharing those weights: no copy, no random draws). A
layer's hidden-state inputs are taken as its initial state and all its
outputs: a superset of ``h_0 .. h_{T-1}`` (it adds ``h_T``), so the null space
is a little smaller than it could be and the update stays exact. With no
initial state the zero state is an input too: the first step reads ``b_hh``
alone, and a zero row with the folded 1 keeps it.

LSTM's ``weight_hr`` (``proj_size > 0``) stays fixed: its input, the
unprojected ``o_t * tanh(c_t)``, is internal to the kernel.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from torch_teleport import Projector, Site, hookimpl
from torch_teleport.projector import Record, append_ones

PROJECTION_REASON = (
    "LSTM's output projection acts on o_t * tanh(c_t), which the recurrent kernel never exposes, "
    "so its inputs cannot be captured"
)


class RecurrentProjector(Projector):
    """Sites ``ih_l{k}[_reverse]`` (stream: layer ``k``'s input) and ``hh_l{k}[_reverse]`` (its hidden states)."""

    def sites(self, rnn: nn.RNNBase) -> Sequence[Site]:
        sites = []
        for layer in range(rnn.num_layers):
            for suffix in _directions(rnn):
                for kind, stream in (("ih", f"input_l{layer}"), ("hh", f"hidden_l{layer}{suffix}")):
                    name = f"{kind}_l{layer}{suffix}"
                    sites.append(
                        Site(name, stream, f"weight_{name}", f"bias_{name}" if rnn.bias else None)
                    )
        return sites

    def frozen(self, rnn: nn.RNNBase) -> dict[str, str]:
        if not getattr(rnn, "proj_size", 0):
            return {}
        return {
            f"weight_hr_l{k}{s}": PROJECTION_REASON
            for k in range(rnn.num_layers)
            for s in _directions(rnn)
        }

    def capture(self, rnn: nn.RNNBase, record: Record) -> list[RemovableHandle]:
        def hook(rnn: nn.RNNBase, args: tuple, kwargs: dict) -> None:
            sequence = args[0] if args else kwargs["input"]
            initial = args[1] if len(args) > 1 else kwargs.get("hx")
            width = rnn.proj_size or rnn.hidden_size
            with torch.no_grad():
                for layer, (inputs, outputs, state) in enumerate(
                    _replay_layers(rnn, sequence, initial)
                ):
                    record(f"input_l{layer}", _vectors(inputs))
                    per_direction = _vectors(outputs).split(width, dim=-1)
                    for direction, suffix in enumerate(_directions(rnn)):
                        start = _initial_hidden(state, direction, width, per_direction[direction])
                        record(
                            f"hidden_l{layer}{suffix}", torch.cat([start, per_direction[direction]])
                        )

        return [rnn.register_forward_pre_hook(hook, with_kwargs=True)]

    def representation(self, rnn: nn.Module, site: Site, captured: Sequence[Tensor]) -> Tensor:
        return _columns(captured, site)


class RecurrentCellProjector(Projector):
    """``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``: sites ``ih`` (the input) and ``hh`` (the state)."""

    def sites(self, cell: nn.RNNCellBase) -> Sequence[Site]:
        return [
            Site(kind, stream, f"weight_{kind}", f"bias_{kind}" if cell.bias else None)
            for kind, stream in (("ih", "input"), ("hh", "hidden"))
        ]

    def capture(self, cell: nn.RNNCellBase, record: Record) -> list[RemovableHandle]:
        def hook(cell: nn.RNNCellBase, args: tuple, kwargs: dict) -> None:
            inputs = args[0] if args else kwargs["input"]
            state = args[1] if len(args) > 1 else kwargs.get("hx")
            hidden = state[0] if isinstance(state, tuple) else state
            record("input", inputs.reshape(-1, cell.input_size))
            if hidden is None:
                hidden = inputs.new_zeros(1, cell.hidden_size)
            record("hidden", hidden.reshape(-1, cell.hidden_size))

        return [cell.register_forward_pre_hook(hook, with_kwargs=True)]

    def representation(self, cell: nn.Module, site: Site, captured: Sequence[Tensor]) -> Tensor:
        return _columns(captured, site)


def _columns(captured: Sequence[Tensor], site: Site) -> Tensor:
    samples = torch.cat(list(captured))
    if site.bias is not None:
        samples = append_ones(samples)
    return samples.T.unsqueeze(0)


def _directions(rnn: nn.RNNBase) -> tuple[str, ...]:
    return ("", "_reverse") if rnn.bidirectional else ("",)


def _vectors(sequence: Tensor | PackedSequence) -> Tensor:
    """Every time step of every sequence as a row (padding never enters a packed sequence)."""
    data = sequence.data if isinstance(sequence, PackedSequence) else sequence
    return data.reshape(-1, data.shape[-1])


def _replay_layers(
    rnn: nn.RNNBase, sequence: Tensor | PackedSequence, initial: Tensor | tuple | None
) -> Iterator[tuple[Tensor | PackedSequence, Tensor | PackedSequence, Tensor | tuple | None]]:
    """Each layer's input, output and initial state, running one layer at a time (dropout off)."""
    directions = len(_directions(rnn))
    for layer in range(rnn.num_layers):
        rows = slice(layer * directions, (layer + 1) * directions)
        if initial is None:
            state = None
        elif isinstance(initial, tuple):
            state = tuple(s[rows] for s in initial)
        else:
            state = initial[rows]
        outputs, _ = _single_layer(rnn, layer)(sequence, state)
        yield sequence, outputs, state
        sequence = outputs


def _initial_hidden(
    state: Tensor | tuple | None, direction: int, width: int, like: Tensor
) -> Tensor:
    """The initial hidden state(s) of one direction as rows; a zero row when none was given."""
    if state is None:
        return like.new_zeros(1, width)
    hidden = state[0] if isinstance(state, tuple) else state
    return hidden[direction].reshape(-1, width)


def _single_layer(rnn: nn.RNNBase, layer: int) -> nn.RNNBase:
    """A one-layer module of ``rnn``'s kind that shares layer ``layer``'s parameters."""
    width = rnn.proj_size or rnn.hidden_size
    options = {
        "input_size": rnn.input_size if layer == 0 else width * len(_directions(rnn)),
        "hidden_size": rnn.hidden_size,
        "num_layers": 1,
        "bias": rnn.bias,
        "batch_first": rnn.batch_first,
        "bidirectional": rnn.bidirectional,
        "device": "meta",
    }
    if rnn.mode == "LSTM":
        replica: nn.RNNBase = nn.LSTM(**options, proj_size=rnn.proj_size)
    elif rnn.mode == "GRU":
        replica = nn.GRU(**options)
    else:
        replica = nn.RNN(**options, nonlinearity=rnn.nonlinearity)
    pattern = re.compile(rf"(\w+)_l{layer}(_reverse)?")
    shared = {}
    for name, param in rnn.named_parameters(recurse=False):
        match = pattern.fullmatch(name)
        if match:
            shared[f"{match[1]}_l0{match[2] or ''}"] = param
    replica.load_state_dict(shared, assign=True)
    return replica


@hookimpl
def teleport_register_projectors(registry) -> None:
    registry.add_projector(nn.RNNBase, RecurrentProjector)
    registry.add_projector(nn.RNNCellBase, RecurrentCellProjector)
