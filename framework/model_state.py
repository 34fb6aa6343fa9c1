"""Leaving a model exactly as it was found, and the precision a teleport computes in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from .inputs import Inputs, map_tensors
from .sharding import is_sharded

HALF_PRECISION = (torch.bfloat16, torch.float16)
"""Parameter dtypes a teleport computes in float32 and rounds its result into once (see
:func:`full_precision`)."""

TELEPORT_DTYPES = (torch.float64, torch.float32, *HALF_PRECISION)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore train/eval flags and every buffer (BatchNorm statistics) on exit, also on error.

    Inside, the model is in eval mode (dropout off) except BatchNorm layers,
    which keep their mode so the loss matches the one training sees.
    """
    modes = [(module, module.training) for module in model.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        for module, training in modes:
            module.train(training and isinstance(module, _BatchNorm))
        yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


@contextlib.contextmanager
def double_backward_safe(device_type: str) -> Iterator[None]:
    """Full precision and kernels that support second derivatives.

    Autocast is disabled, scaled-dot-product attention uses the math backend
    and cuDNN (whose RNNs have no double backward) is off.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield


@contextlib.contextmanager
def full_precision(model: nn.Module) -> Iterator[None]:
    """bfloat16 and float16 parameters and buffers as float32 while inside, then rounded once.

    A teleport's bases, projections and steps need more precision than half
    precision holds (its steps are often below a bfloat16 weight's rounding
    step): inside, each such tensor holds a float32 copy (the teleport batch
    comes in float32 too, see :func:`float32_inputs`); on exit the result is
    rounded into the tensor's own storage, so the parameter objects (the
    optimizer's references) and their memory stay those of the model.
    """
    half = [(tensor, tensor.data) for tensor in (*model.parameters(), *model.buffers()) if tensor.dtype in HALF_PRECISION]
    if not half:
        yield
        return
    try:
        for tensor, data in half:
            tensor.data = data.float()
        yield
    finally:
        with torch.no_grad():
            for tensor, data in half:
                data.copy_(tensor.data)  # round to nearest, once
                tensor.data = data


def float32_inputs(model: nn.Module, inputs: Inputs) -> Inputs:
    """``inputs`` with their half-precision floating tensors in float32 when ``model`` has half-precision
    parameters (which a teleport computes in float32, see :func:`full_precision`); else as they are."""
    if not any(p.dtype in HALF_PRECISION for p in model.parameters()):
        return inputs
    return map_tensors(inputs, lambda tensor: tensor.float() if tensor.dtype in HALF_PRECISION else tensor)


def check_dtype(name: str, param: Tensor) -> None:
    """A parameter a teleport can move: floating, of 16 to 64 bits; half precision not sharded."""
    if param.dtype not in TELEPORT_DTYPES:
        raise TypeError(
            f"teleport moves float64, float32, bfloat16 and float16 parameters; {name} is {param.dtype}"
        )
    if param.dtype in HALF_PRECISION and is_sharded(param):
        raise TypeError(
            f"{name} is a sharded {param.dtype} parameter: shard float32 parameters and compute in "
            f"{param.dtype} with fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype={param.dtype}))"
        )
