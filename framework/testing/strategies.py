"""Hypothesis strategies of small teleport problems: a model, a batch and a loss, built from a seed.

Every strategy draws the options of one family of PyTorch layers and builds
the model from a seed that hypothesis draws, so a failing example prints
its seed and replays exactly. Needs the ``test`` extra (hypothesis).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from .models import RecurrentBody, SlicedAttention, SlicedTransformerLayer, TokenClassifier

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

_SEEDS = st.integers(0, 2**31 - 1)
"""The seed every problem's weights and batch are built from."""

_BOTH_DTYPES = (torch.float64, torch.float32)


@dataclass
class Problem:
    """A model, a batch and a loss, drawn from a seed."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    seed: int

    def __repr__(self) -> str:  # hypothesis prints this on failure
        return f"Problem(seed={self.seed}, model={self.model}, batch={tuple(self.inputs.shape)})"


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Weights initialised from ``seed``, without touching the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _classification(model: nn.Module, inputs: Tensor, classes: int, generator: torch.Generator, seed: int) -> Problem:
    """A cross-entropy problem on ``inputs`` with targets drawn from ``generator``."""
    targets = torch.randint(0, classes, (len(inputs),), generator=generator)
    return Problem(model, inputs, targets, nn.functional.cross_entropy, seed)


# -- multi-layer perceptrons -----------------------------------------------------------------------


@st.composite
def mlp_problems(
    draw,
    dtypes: tuple[torch.dtype, ...] = _BOTH_DTYPES,
    max_depth: int = 4,
    max_width: int = 48,
    max_batch: int = 64,
) -> Problem:
    """Random MLP _classification problems: depth, widths, activation, bias, batch and dtype.

    Batches are drawn both smaller and larger than the widths, so some layers
    have a large null space and some none.
    """
    seed = draw(_SEEDS)
    depth = draw(st.integers(1, max_depth))
    widths = draw(st.lists(st.integers(2, max_width), min_size=depth + 1, max_size=depth + 1))
    classes = draw(st.integers(2, 6))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, max_batch))
    dtype = draw(st.sampled_from(dtypes))
    generator = torch.Generator().manual_seed(seed)
    with _seeded(seed):
        layers: list[nn.Module] = []
        dims = [*widths, classes]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
            if i < len(dims) - 2:
                layers.append(ACTIVATIONS[activation]())
        model = nn.Sequential(*layers).to(dtype)
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=dtype)
    return _classification(model, inputs, classes, generator, seed)


# -- convolutions ----------------------------------------------------------------------------------


class _ConvShape(NamedTuple):
    """The drawn convolution's channels, input size and geometry (stride, padding, dilation, groups)."""

    channels_in: int
    channels_out: int
    kernel: tuple[int, ...]
    size: tuple[int, ...]
    geometry: dict


@st.composite
def _conv_shapes(draw, spatial: int) -> _ConvShape:
    """Groups (depthwise included), channels, kernel, dilation, padding (ints, ``'same'``,
    ``'valid'``), stride, and an input at least as large as the dilated kernel."""
    groups = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    channels_in = groups * (1 if depthwise else draw(st.integers(1, 4)))
    channels_out = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 2) if spatial == 3 else st.integers(2, 3)) for _ in range(spatial))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(spatial))
    padding_kind = draw(st.sampled_from(("int", "same", "valid")))
    if padding_kind == "int":
        padding: tuple[int, ...] | str = tuple(draw(st.integers(0, 2)) for _ in range(spatial))
    else:
        padding = padding_kind
    stride = tuple(1 if padding_kind == "same" else draw(st.integers(1, 3)) for _ in range(spatial))
    spans = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    size = tuple(draw(st.integers(max(span, 3), max(span, 3) + 1)) for span in spans)
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    return _ConvShape(channels_in, channels_out, kernel, size, geometry)


@st.composite
def conv_problems(
    draw,
    dims: tuple[int, ...] = (1, 2, 3),
    dtypes: tuple[torch.dtype, ...] = _BOTH_DTYPES,
    max_batch: int = 2,
) -> Problem:
    """Random small CNN classifiers: a 1x1 stem, a convolution with drawn options, a ``'same'`` one, a head.

    The drawn convolution (``model[1]``) draws its spatial rank, kernel, stride,
    padding (ints, ``'same'``, ``'valid'``), padding mode, dilation, groups
    (depthwise included) and bias; the stem makes it an inner layer (see
    :class:`TokenClassifier`). An optional BatchNorm (training mode) and a
    Dropout check that the teleport keeps their state and turns dropout off.
    """
    seed = draw(_SEEDS)
    spatial = draw(st.sampled_from(dims))
    shape = draw(_conv_shapes(spatial))
    batch = draw(st.integers(1, max_batch))
    classes = draw(st.integers(2, 4))
    options = {
        **shape.geometry,
        "bias": draw(st.booleans()),
        "padding_mode": draw(st.sampled_from(PADDING_MODES)),
    }
    head = {
        "kernel": draw(st.integers(1, 2)),
        "batch_norm": draw(st.booleans()),
        "activation": draw(st.sampled_from(sorted(ACTIVATIONS))),
    }
    dtype = draw(st.sampled_from(dtypes))
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, shape.channels_in, *shape.size, generator=generator, dtype=dtype)
    with _seeded(seed):
        model = _conv_classifier(spatial, shape, options, head, inputs, classes)
    return _classification(model, inputs, classes, generator, seed)


def _conv_classifier(spatial: int, shape: _ConvShape, options: dict, head: dict, inputs: Tensor, classes: int) -> nn.Sequential:
    """Stem, the drawn convolution, an optional BatchNorm, activation, a ``'same'`` convolution, head."""
    conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial - 1]
    norm_type = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial - 1]
    layers: list[nn.Module] = [
        conv_type(shape.channels_in, shape.channels_in, 1),
        conv_type(shape.channels_in, shape.channels_out, shape.kernel, **options),
    ]
    with torch.no_grad():
        output_size = layers[1].to(inputs.dtype)(inputs).shape[2:]
    positions = output_size.numel()
    # Reflect padding needs more elements than it pads (one, for the 'same' padding below).
    second_mode = options["padding_mode"] if min(output_size) > 1 else "zeros"
    if head["batch_norm"] and len(inputs) * positions > 1:
        layers.append(norm_type(shape.channels_out))
    layers += [
        ACTIVATIONS[head["activation"]](),
        conv_type(shape.channels_out, 2, head["kernel"], padding="same", padding_mode=second_mode),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(2 * positions, classes),
    ]
    return nn.Sequential(*layers).to(inputs.dtype)


# -- attention -------------------------------------------------------------------------------------


class _Masking(NamedTuple):
    """Which masks an attention call gets: their dtype (``"none"``, ``"bool"``, ``"float"``),
    the attention mask's kind (``"none"``, ``"2d"``, ``"3d"``, ``"causal"``) and a key-padding mask."""

    dtype: str
    attn_mask: str
    key_padding: bool


class _Tokens(NamedTuple):
    """The token layout of one attention call."""

    batch: int
    heads: int
    query_len: int
    key_len: int
    unbatched: bool


@st.composite
def _maskings(draw, cross: bool) -> _Masking:
    """Mask kinds; cross-attention gets a 2-d mask where a causal one was drawn."""
    dtype = draw(st.sampled_from(("none", "bool", "float")))
    attn_mask = "none" if dtype == "none" else draw(st.sampled_from(("none", "2d", "3d", "causal")))
    if attn_mask == "causal" and cross:
        attn_mask = "2d"
    return _Masking(dtype, attn_mask, dtype != "none" and draw(st.booleans()))


@st.composite
def _attention_calls(draw) -> dict:
    """Positional or keyword arguments, ``need_weights`` and ``average_attn_weights``."""
    return {
        "positional": draw(st.booleans()),
        "kwargs": {"need_weights": draw(st.booleans()), "average_attn_weights": draw(st.booleans())},
    }


@st.composite
def attention_problems(
    draw, dtypes: tuple[torch.dtype, ...] = _BOTH_DTYPES, max_batch: int = 2
) -> Problem:
    """Random ``nn.MultiheadAttention`` classifiers.

    Draws heads, head width, self- or cross-attention, ``kdim``/``vdim``
    (separate projection weights), ``batch_first``, biases, ``add_bias_kv``,
    ``add_zero_attn``, unbatched calls, positional or keyword arguments,
    ``need_weights`` and masks: boolean or float key-padding masks, 2-d, 3-d
    or causal attention masks. Every query keeps at least one key.
    """
    seed = draw(_SEEDS)
    heads = draw(st.integers(1, 3))
    width = heads * draw(st.integers(1, 3))
    cross = draw(st.booleans())
    separate = cross and draw(st.booleans())
    key_width = draw(st.integers(1, 4)) if separate else width
    value_width = draw(st.integers(1, 4)) if separate else width
    batch = draw(st.integers(1, max_batch))
    query_len = draw(st.integers(1, 4))
    key_len = draw(st.integers(1, 4)) if cross else query_len
    tokens = _Tokens(batch, heads, query_len, key_len, batch == 1 and draw(st.booleans()))
    batch_first = draw(st.booleans())
    masking = draw(_maskings(cross))
    call_options = draw(_attention_calls())
    module_options = {
        "bias": draw(st.booleans()),
        "add_bias_kv": draw(st.booleans()),
        "add_zero_attn": draw(st.booleans()),
        "batch_first": batch_first,
    }
    dtype = draw(st.sampled_from(dtypes))
    classes = draw(st.integers(2, 4))
    generator = torch.Generator().manual_seed(seed)
    masks = _attention_masks(generator, masking, tokens)
    if masking.attn_mask == "causal":
        call_options["kwargs"]["is_causal"] = True
    input_width = max(width, key_width + value_width)
    shape = (batch, query_len + key_len if cross else query_len, input_width)
    inputs = torch.randn(shape, generator=generator, dtype=dtype)
    with _seeded(seed):
        attention = nn.MultiheadAttention(
            width, heads, dropout=0.3, kdim=key_width, vdim=value_width, **module_options
        )
        body = SlicedAttention(attention, query_len, cross, call_options, masks, tokens.unbatched)
        model = TokenClassifier(body, input_width, width, classes).to(dtype)
    return _classification(model, inputs, classes, generator, seed)


def _attention_masks(generator: torch.Generator, masking: _Masking, tokens: _Tokens) -> dict[str, Tensor]:
    """Masks of the drawn kinds; key 0 is never masked, so no query loses every key."""
    masks: dict[str, Tensor] = {}

    def blocked(*shape: int) -> Tensor:
        mask = torch.rand(*shape, generator=generator) < 0.4
        mask[..., 0] = False
        return mask

    def as_dtype(mask: Tensor) -> Tensor:
        if masking.dtype == "bool":
            return mask
        return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, float("-inf"))

    batch, heads, query_len, key_len, unbatched = tokens
    if masking.key_padding:
        masks["key_padding_mask"] = as_dtype(blocked(key_len) if unbatched else blocked(batch, key_len))
    if masking.attn_mask == "causal":
        masks["attn_mask"] = as_dtype(torch.ones(query_len, key_len, dtype=torch.bool).triu(1))
    elif masking.attn_mask != "none":
        leading = () if masking.attn_mask == "2d" else ((heads,) if unbatched else (batch * heads,))
        shape = (*leading, query_len, key_len)
        if masking.dtype == "float":
            scores = torch.randn(shape, generator=generator, dtype=torch.float64)
            masks["attn_mask"] = scores.masked_fill(blocked(*shape), float("-inf"))
        else:
            masks["attn_mask"] = blocked(*shape)
    return masks


# -- Transformer layers ----------------------------------------------------------------------------

_TRANSFORMER_MASK_NAMES = {
    "encoder_layer": ("src_mask", "src_key_padding_mask", "is_causal"),
    "encoder": ("mask", "src_key_padding_mask", "is_causal"),
    "decoder_layer": ("tgt_mask", "memory_key_padding_mask", "tgt_is_causal"),
}
"""Per kind of layer: the names of its attention mask, key-padding mask and causal flag."""


@st.composite
def transformer_problems(
    draw, dtypes: tuple[torch.dtype, ...] = _BOTH_DTYPES, max_batch: int = 2
) -> Problem:
    """Random ``nn.TransformerEncoder``/``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer`` classifiers.

    Draws heads, head width, feed-forward width, activation, pre- or post-norm,
    ``batch_first``, biases, dropout (must be off during teleport), causal
    masks and key-padding masks.
    """
    seed = draw(_SEEDS)
    kind = draw(st.sampled_from(tuple(_TRANSFORMER_MASK_NAMES)))
    heads = draw(st.integers(1, 2))
    width = heads * draw(st.integers(1, 3))
    batch = draw(st.integers(1, max_batch))
    target_len = draw(st.integers(1, 3))
    memory_len = draw(st.integers(1, 3)) if kind == "decoder_layer" else 0
    batch_first = draw(st.booleans())
    causal = draw(st.booleans())
    key_padding = draw(st.booleans())
    layer_options = {
        "dim_feedforward": draw(st.integers(2, 6)),
        "dropout": 0.2,
        "activation": draw(st.sampled_from(("relu", "gelu"))),
        "norm_first": draw(st.booleans()),
        "batch_first": batch_first,
        "bias": draw(st.booleans()),
    }
    dtype = draw(st.sampled_from(dtypes))
    classes = draw(st.integers(2, 4))
    generator = torch.Generator().manual_seed(seed)
    mask_name, padding_name, causal_name = _TRANSFORMER_MASK_NAMES[kind]
    masks: dict[str, Tensor] = {}
    kwargs: dict = {}
    if causal:
        masks[mask_name] = nn.Transformer.generate_square_subsequent_mask(target_len, dtype=torch.float64)
        kwargs[causal_name] = True
    if key_padding:
        padded = torch.rand(batch, memory_len or target_len, generator=generator) < 0.4
        padded[:, 0] = False
        masks[padding_name] = torch.zeros(padded.shape, dtype=torch.float64).masked_fill(padded, float("-inf"))
    inputs = torch.randn(batch, target_len + memory_len, width, generator=generator, dtype=dtype)
    with _seeded(seed):
        layer = _transformer_layer(kind, width, heads, layer_options)
        body = SlicedTransformerLayer(layer, target_len, masks, {"batch_first": batch_first, "kwargs": kwargs})
        model = TokenClassifier(body, width, width, classes).to(dtype)
    return _classification(model, inputs, classes, generator, seed)


def _transformer_layer(kind: str, width: int, heads: int, options: dict) -> nn.Module:
    """A decoder layer, an encoder layer or a stack of two encoder layers."""
    if kind == "decoder_layer":
        return nn.TransformerDecoderLayer(width, heads, **options)
    layer = nn.TransformerEncoderLayer(width, heads, **options)
    if kind == "encoder":
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    return layer


# -- recurrent layers ------------------------------------------------------------------------------


@st.composite
def sequence_problems(
    draw, dtypes: tuple[torch.dtype, ...] = _BOTH_DTYPES, max_batch: int = 2
) -> Problem:
    """Random ``nn.RNN``/``nn.LSTM``/``nn.GRU`` classifiers.

    Draws the kind (and RNN nonlinearity), layers, bidirectionality,
    ``batch_first``, bias, LSTM ``proj_size``, a given or zero initial state,
    packed variable-length sequences and unbatched calls.
    """
    seed = draw(_SEEDS)
    kind = draw(st.sampled_from(("RNN_TANH", "RNN_RELU", "LSTM", "GRU")))
    features, hidden = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    layers = draw(st.integers(1, 2))
    options = {
        "num_layers": layers,
        "bias": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bidirectional": draw(st.booleans()),
        "dropout": 0.3 if layers > 1 else 0.0,  # between layers: must be off during teleport
    }
    proj_size = draw(st.integers(0, hidden - 1)) if kind == "LSTM" else 0
    batch, time = draw(st.integers(1, max_batch)), draw(st.integers(1, 4))
    unbatched = batch == 1 and draw(st.booleans())
    packed = not unbatched and draw(st.booleans())
    given_state = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    generator = torch.Generator().manual_seed(seed)
    directions = 2 if options["bidirectional"] else 1
    initial = None
    if given_state:
        initial = torch.randn(layers * directions, batch, hidden, generator=generator)
    lengths = torch.randint(1, time + 1, (batch,), generator=generator) if packed else None
    if lengths is not None:
        lengths[0] = time  # the padded output keeps all time steps
    inputs = torch.randn(batch, time, features, generator=generator, dtype=dtype)
    with _seeded(seed):
        rnn = _recurrent_layer(kind, features, hidden, proj_size, options)
        width = (proj_size or hidden) * directions
        model = TokenClassifier(RecurrentBody(rnn, initial, lengths, unbatched), features, width, 3).to(dtype)
    return _classification(model, inputs, 3, generator, seed)


def _recurrent_layer(kind: str, features: int, hidden: int, proj_size: int, options: dict) -> nn.RNNBase:
    """An ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (``kind`` ``"RNN_TANH"``/``"RNN_RELU"``)."""
    if kind == "LSTM":
        return nn.LSTM(features, hidden, proj_size=proj_size, **options)
    if kind == "GRU":
        return nn.GRU(features, hidden, **options)
    return nn.RNN(features, hidden, nonlinearity=kind[4:].lower(), **options)
