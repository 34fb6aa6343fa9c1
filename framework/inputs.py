"""Model inputs as models take them: a tensor ``model(x)``, a sequence ``model(*x)`` or a mapping ``model(**x)``.

Hugging Face models take keyword tensors (``input_ids``, ``attention_mask``),
others several positional ones; the teleport batch, the guard batch and the
trainer's batches may be any of the three forms. Non-tensor entries (flags,
``None``) are passed through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Inputs = Tensor | Sequence[Any] | Mapping[str, Any]


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)``, as the form says."""
    args, kwargs = as_call(inputs)
    return model(*args, **kwargs)


def as_call(inputs: Inputs) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments ``inputs`` stands for."""
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return tuple(inputs), {}
    raise TypeError(
        f"inputs must be a tensor, a sequence of model arguments or a mapping of keyword arguments, "
        f"got {type(inputs).__name__}"
    )


def tensors(inputs: Inputs) -> list[Tensor]:
    """Every tensor among ``inputs``, in order."""
    args, kwargs = as_call(inputs)
    return [value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)]


def batch_size(inputs: Inputs) -> int:
    """The leading size of the first tensor with at least one dimension (the samples)."""
    for tensor in tensors(inputs):
        if tensor.dim() > 0:
            return tensor.shape[0]
    raise ValueError("inputs hold no tensor with a batch dimension")


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    """``inputs`` with every tensor moved to ``device``, in the same form."""
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in inputs.items()}
    return type(inputs)(value.to(device) if isinstance(value, Tensor) else value for value in inputs)


def concatenate(parts: Sequence[Inputs]) -> Inputs:
    """One batch of the samples of ``parts`` (all of one form), joined along the first dimension.

    Entries that are not batched tensors (flags, ``None``, scalars) are taken from
    the first part. Raises ``ValueError`` when the parts' tensors disagree beyond
    the first dimension (e.g. token batches padded to different lengths).
    """

    def join(values: list[Any]) -> Any:
        first = values[0]
        if not (isinstance(first, Tensor) and first.dim() > 0):
            return first
        if any(v.shape[1:] != first.shape[1:] for v in values):
            raise ValueError(f"cannot join batches of shapes {[tuple(v.shape) for v in values]}")
        return torch.cat(values)

    first = parts[0]
    if isinstance(first, Tensor):
        return join(list(parts))
    if isinstance(first, Mapping):
        return {key: join([part[key] for part in parts]) for key in first}
    return type(first)(join([part[i] for part in parts]) for i in range(len(first)))
