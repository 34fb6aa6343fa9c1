"""The fixture models the strategies build: PyTorch's layers wrapped so that one input tensor
``(batch, tokens, features)`` drives them, and a classifier around them that makes them inner
layers (a network's first layer never moves under the gradient-norm objective)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import Tensor, nn


class SlicedAttention(nn.Module):
    """``nn.MultiheadAttention`` on slices of one input ``(batch, tokens, width)``.

    Queries are the first ``query_len`` tokens (all tokens for self-attention);
    keys and values are the remaining tokens, ``key_width`` and ``value_width``
    features wide. Masks are buffers, so they follow the model's dtype.
    """

    def __init__(
        self,
        attention: nn.MultiheadAttention,
        query_len: int,
        cross: bool,
        call_options: dict,
        masks: dict[str, Tensor],
        unbatched: bool,
    ) -> None:
        super().__init__()
        self.attention = attention
        self.query_len = query_len
        self.cross = cross
        self.call_options = call_options
        self.unbatched = unbatched
        for name, mask in masks.items():
            self.register_buffer(name, mask, persistent=False)
        self.mask_names = sorted(masks)

    def forward(self, x: Tensor) -> Tensor:
        mha = self.attention
        width = mha.embed_dim
        if not self.cross:
            query = key = value = x[..., :width]
        else:
            query = x[:, : self.query_len, :width]
            key = x[:, self.query_len :, : mha.kdim]
            value = key if mha.kdim == mha.vdim == width else x[:, self.query_len :, -mha.vdim :]
        if self.unbatched:
            query, key, value = _same_identity((query, key, value), lambda t: t[0])
        elif not mha.batch_first:
            query, key, value = _same_identity((query, key, value), lambda t: t.transpose(0, 1))
        arguments = {name: getattr(self, name) for name in self.mask_names}
        arguments.update(self.call_options["kwargs"])
        if self.call_options["positional"]:
            call = inspect.signature(mha.forward).bind(query, key, value, **arguments)
            call.apply_defaults()
            output = mha(*call.args)[0]
        else:
            output = mha(query=query, key=key, value=value, **arguments)[0]
        if self.unbatched:
            return output.unsqueeze(0)
        return output if mha.batch_first else output.transpose(0, 1)


def _same_identity(tensors: tuple[Tensor, ...], transform: Callable[[Tensor], Tensor]) -> tuple[Tensor, ...]:
    """``transform`` each tensor, keeping which of them are the same object (self-attention)."""
    done: dict[int, Tensor] = {}
    return tuple(done.setdefault(id(t), transform(t)) for t in tensors)


class TokenClassifier(nn.Module):
    """Linear embedding, ``body``, mean over the output tokens, linear head.

    The embedding (input width to itself) makes the body an inner layer: a
    network's first layer never moves under the gradient-norm objective, which
    depends on that layer's weights only through its outputs, so its gradient
    lies in the span of its inputs.
    """

    def __init__(self, body: nn.Module, input_width: int, width: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(input_width, input_width)
        self.body = body
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.embed(x)).mean(dim=1))



class SlicedTransformerLayer(nn.Module):
    """A Transformer encoder (stack) or decoder layer on one input ``(batch, tokens, d_model)``.

    The encoder reads every token; the decoder's target is the first
    ``target_len`` tokens and its memory the rest.
    """

    def __init__(self, layer: nn.Module, target_len: int, masks: dict[str, Tensor], call_options: dict) -> None:
        super().__init__()
        self.layer = layer
        self.target_len = target_len
        self.call_options = call_options
        for name, mask in masks.items():
            self.register_buffer(name, mask, persistent=False)
        self.mask_names = sorted(masks)

    def forward(self, x: Tensor) -> Tensor:
        masks = {name: getattr(self, name) for name in self.mask_names}
        batch_first = self.call_options["batch_first"]
        if not batch_first:
            x = x.transpose(0, 1)
        if isinstance(self.layer, nn.TransformerDecoderLayer):
            split = (slice(None, self.target_len), slice(self.target_len, None))
            target, memory = (x[:, part] if batch_first else x[part] for part in split)
            output = self.layer(target, memory, **masks, **self.call_options["kwargs"])
        else:
            output = self.layer(x, **masks, **self.call_options["kwargs"])
        return output if batch_first else output.transpose(0, 1)



class RecurrentBody(nn.Module):
    """A recurrent layer on ``(batch, time, features)``, returning its outputs ``(batch, time, width)``.

    Optionally with a fixed initial state (a buffer), packed sequences of the
    given ``lengths``, time-first layout, or unbatched calls (batch of one).
    """

    def __init__(self, rnn: nn.RNNBase, initial: Tensor | None, lengths: Tensor | None, unbatched: bool) -> None:
        super().__init__()
        self.rnn = rnn
        self.unbatched = unbatched
        self.register_buffer("initial", initial, persistent=False)
        self.register_buffer("lengths", lengths, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        rnn = self.rnn
        hx = self.initial
        if hx is not None and rnn.mode == "LSTM":
            width = rnn.proj_size or rnn.hidden_size
            hx = (hx[..., :width], hx)
        if self.unbatched:
            if hx is not None:
                hx = _same_identity(hx, lambda t: t[:, 0]) if isinstance(hx, tuple) else hx[:, 0]
            return rnn(x[0], hx)[0].unsqueeze(0)
        sequence = x if rnn.batch_first else x.transpose(0, 1)
        if self.lengths is not None:
            sequence = nn.utils.rnn.pack_padded_sequence(
                sequence, self.lengths, batch_first=rnn.batch_first, enforce_sorted=False
            )
        output = rnn(sequence, hx)[0]
        if self.lengths is not None:
            output = nn.utils.rnn.pad_packed_sequence(output, batch_first=rnn.batch_first)[0]
        return output if rnn.batch_first else output.transpose(0, 1)



class PreNormResidual(nn.Module):
    """``x + block(norm(x))``, the way Mamba and pre-norm Transformer stacks use their blocks."""

    def __init__(self, block: nn.Module, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(self.norm(x))
