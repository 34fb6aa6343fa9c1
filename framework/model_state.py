"""Leaving a model exactly as it was found."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm


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
