"""Built-in Transformers: sequence classifier (sMNIST), time-series regressor, causal language model.

All three share :class:`TransformerBody`: learned positional embeddings added
to the token embeddings, then ``nn.TransformerEncoder`` (post-norm, as
PyTorch's default). The model width is ``heads * head_dim`` (the paper
states heads and their dimension).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torch_teleport import hookimpl


class LearnedPositions(nn.Module):
    """A learned vector per position, added to the input sequence ``(batch, time, d_model)``.

    A teleport keeps it fixed (an additive offset has no input null space):
    the frozen-layer projectors register it by name, so the report says so
    instead of warning.
    """

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_len, d_model) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] > self.weight.shape[0]:
            raise ValueError(
                f"sequence of length {x.shape[1]} is longer than max_len {self.weight.shape[0]}"
            )
        return x + self.weight[: x.shape[1]]


class TransformerBody(nn.Module):
    """Positions plus a stack of ``nn.TransformerEncoderLayer`` (batch first), optionally causal."""

    def __init__(
        self,
        max_len: int,
        heads: int,
        head_dim: int,
        layers: int,
        ff_mult: int,
        dropout: float,
        causal: bool,
    ) -> None:
        super().__init__()
        d_model = heads * head_dim
        self.causal = causal
        self.positions = LearnedPositions(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=ff_mult * d_model, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.positions(x)
        if not self.causal:
            return self.encoder(x)
        mask = nn.Transformer.generate_square_subsequent_mask(
            x.shape[1], device=x.device, dtype=x.dtype
        )
        return self.encoder(x, mask=mask, is_causal=True)


class TransformerClassifier(nn.Module):
    """Linear embedding of each step, Transformer, average over time, linear head.

    Input ``(batch, time, input_dim)``: pixel-level sequential MNIST is
    ``(B, 784, 1)``, row-level ``(B, 28, 28)``.
    """

    def __init__(self, input_dim: int, num_classes: int, body: TransformerBody) -> None:
        super().__init__()
        d_model = body.positions.weight.shape[1]
        self.embed = nn.Linear(input_dim, d_model)
        self.body = body
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.embed(x)).mean(dim=1))


class TransformerRegressor(nn.Module):
    """Multivariate forecaster: ``(batch, window, n_series)`` -> ``(batch, n_series)``.

    The paper uses no pooling; the prediction is read from the last time
    step (``readout="last"``, which attends to the whole window) or, with
    ``readout="mean"``, from the average over time.
    """

    def __init__(self, n_series: int, body: TransformerBody, readout: str) -> None:
        super().__init__()
        if readout not in ("last", "mean"):
            raise ValueError(f"readout must be 'last' or 'mean', got {readout!r}")
        d_model = body.positions.weight.shape[1]
        self.readout = readout
        self.embed = nn.Linear(n_series, d_model)
        self.body = body
        self.head = nn.Linear(d_model, n_series)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(self.embed(x))
        return self.head(h[:, -1] if self.readout == "last" else h.mean(dim=1))


class TransformerLanguageModel(nn.Module):
    """Token embedding, causal Transformer, vocabulary head.

    Input ``(batch, time)`` token ids; output logits ``(batch, vocab, time)``,
    the layout ``F.cross_entropy`` expects with targets ``(batch, time)``.
    """

    def __init__(self, vocab_size: int, body: TransformerBody) -> None:
        super().__init__()
        d_model = body.positions.weight.shape[1]
        self.embed = nn.Embedding(vocab_size, d_model)
        self.body = body
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.body(self.embed(tokens))).transpose(1, 2)


def transformer_classifier(
    input_dim: int = 1,
    seq_len: int = 784,
    num_classes: int = 10,
    layers: int = 2,
    heads: int = 2,
    head_dim: int = 64,
    ff_mult: int = 4,
    dropout: float = 0.0,
) -> TransformerClassifier:
    """The paper's sMNIST Transformer: 2 layers, 2 heads of dim 64, average pooling, linear head."""
    body = TransformerBody(seq_len, heads, head_dim, layers, ff_mult, dropout, causal=False)
    return TransformerClassifier(input_dim, num_classes, body)


def transformer_regressor(
    n_series: int = 321,
    window: int = 7 * 24,
    layers: int = 4,
    heads: int = 4,
    head_dim: int = 64,
    ff_mult: int = 4,
    dropout: float = 0.0,
    readout: str = "last",
) -> TransformerRegressor:
    """The paper's electricity/traffic Transformer: 4 layers, 4 heads of dim 64, one output per series."""
    body = TransformerBody(window, heads, head_dim, layers, ff_mult, dropout, causal=False)
    return TransformerRegressor(n_series, body, readout)


def transformer_lm(
    vocab_size: int = 10000,
    seq_len: int = 256,
    layers: int = 4,
    heads: int = 4,
    head_dim: int = 64,
    ff_mult: int = 4,
    dropout: float = 0.0,
) -> TransformerLanguageModel:
    """The paper's PTB Transformer: the regressor's stack with an embedding in and the vocabulary out."""
    body = TransformerBody(seq_len, heads, head_dim, layers, ff_mult, dropout, causal=True)
    return TransformerLanguageModel(vocab_size, body)


@hookimpl
def teleport_register_models(registry) -> None:
    registry.add_model("transformer_classifier", transformer_classifier)
    registry.add_model("transformer_regressor", transformer_regressor)
    registry.add_model("transformer_lm", transformer_lm)
