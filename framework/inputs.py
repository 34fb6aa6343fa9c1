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
    return map_tensors(inputs, lambda tensor: tensor.to(device))


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


def usable(inputs: Inputs) -> Inputs:
    """``inputs`` with every tensor made in ``torch.inference_mode`` copied into a normal one: autograd,
    which a teleport needs, cannot save inference tensors. Others are passed through as they are."""
    if not any(t.is_inference() for t in tensors(inputs)):
        return inputs
    with torch.inference_mode(False):
        return map_tensors(inputs, lambda t: t.clone() if t.is_inference() else t)


def map_tensors(inputs: Inputs, function: Any) -> Inputs:
    """``inputs`` with ``function`` applied to every tensor, in the same form."""
    if isinstance(inputs, Tensor):
        return function(inputs)
    if isinstance(inputs, Mapping):
        return {key: function(value) if isinstance(value, Tensor) else value for key, value in inputs.items()}
    return type(inputs)(function(value) if isinstance(value, Tensor) else value for value in inputs)


def check_inputs(inputs: Inputs, label: str = "inputs") -> None:
    """A clear error unless ``inputs`` hold a tensor with at least one sample and finite floating values."""
    given = tensors(inputs)  # raises for a form that is none of tensor, sequence, mapping
    if not given:
        raise TypeError(f"{label} hold no tensor")
    for tensor in given:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{label} contain non-finite values")
    _check_samples(given[0], label)


def check_batch(inputs: Inputs, targets: Tensor) -> None:
    """A clear error unless ``(inputs, targets)`` is a batch a teleport can take."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    check_inputs(inputs)
    if targets.is_floating_point() and not torch.isfinite(targets).all():
        raise ValueError("targets contain non-finite values")
    _check_samples(targets, "targets")
    samples = batch_size(inputs)
    if samples != targets.shape[0]:
        raise ValueError(f"inputs and targets disagree on the batch size: {samples} vs {targets.shape[0]}")


def _check_samples(tensor: Tensor, label: str) -> None:
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise ValueError(f"{label} must hold at least one sample, got shape {tuple(tensor.shape)}")
