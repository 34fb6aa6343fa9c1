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
