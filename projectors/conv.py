"""Projector for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``: the CNN case of eqs. 9 and 12.

A convolution multiplies its weight, flattened to ``out x (in/groups * prod(kernel))``,
with every patch of its padded input: per group it is ``y = W R + b`` with ``R``
the unfolded patches (eq. 9). The patches are cut from the input exactly as the
convolution sees it: padded the same way (zeros, ``'same'``, reflect, replicate,
circular) and strided and dilated the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torch_teleport import Projector, Site, hookimpl
from torch_teleport.projector import Record, bilinear_tangent, first_input_hook, output_hook

ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


class ConvProjector(Projector):
    """One grouped site per convolution; the samples are the patches (all positions, all images)."""

    def sites(self, module: ConvNd) -> Sequence[Site]:
        bias = "bias" if module.bias is not None else None
        return [Site("weight", "input", "weight", bias, groups=module.groups)]

    def capture(self, module: ConvNd, record: Record) -> list[RemovableHandle]:
        return [module.register_forward_pre_hook(first_input_hook("input", record))]

    def representation(self, module: ConvNd, site: Site, captured: Sequence[Tensor]) -> Tensor:
        """Every call's patches per group, with a row of ones for the bias, written straight into one
        ``(groups, dims, samples)`` tensor: the unfolded patches are the largest thing a teleport
        builds, so they are cut a few samples at a time (:data:`PATCH_BLOCK`), never a whole call's."""
        groups, folded = module.groups, int(site.bias is not None)
        dims = module.in_channels // groups * math.prod(module.kernel_size)
        spatial = len(module.kernel_size)
        batches = [x.unsqueeze(0) if x.dim() == spatial + 1 else x for x in captured]  # (unbatched calls)
        positions = [_positions(module, x) for x in batches]
        out = captured[0].new_empty(groups, dims + folded, sum(len(x) * p for x, p in zip(batches, positions, strict=True)))
        if folded:
            out[:, dims].fill_(1)
        start = 0
        for x, per_sample in zip(batches, positions, strict=True):
            for part in x.split(max(1, PATCH_BLOCK // max(groups * dims * per_sample, 1))):
                patches = unfolded_patches(module, part)
                end = start + patches.shape[0] * patches.shape[2]
                target = out[:, :dims, start:end].unflatten(-1, (patches.shape[0], patches.shape[2]))
                target.copy_(rearrange(patches, "n (g d) p -> g d n p", g=groups))
                start = end
        return out

    def capture_outputs(self, module: ConvNd, record: Record) -> list[RemovableHandle]:
        return [module.register_forward_hook(output_hook("weight", record))]

    def structured_gradient(
        self, module: ConvNd, site: Site, output_grads: Sequence[Tensor], input_tangents: Sequence[Tensor]
    ) -> Tensor:
        """The convolution's own weight gradient with the tangents as inputs: no unfolded patches."""
        spatial = len(module.kernel_size)
        weight_grad = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}[spatial]
        total = torch.zeros(module.weight.shape, dtype=output_grads[0].dtype, device=output_grads[0].device)
        for grad, tangent in zip(output_grads, input_tangents, strict=True):
            if tangent.dim() == spatial + 1:
                grad, tangent = grad.unsqueeze(0), tangent.unsqueeze(0)
            padded = F.pad(tangent, _pad_widths(module), mode=_pad_mode(module))
            total += weight_grad(
                padded, module.weight.shape, grad, module.stride, 0, module.dilation, module.groups
            )
        columns = rearrange(total, "(g r) c ... -> g r (c ...)", g=module.groups)
        if site.bias is not None:
            columns = F.pad(columns, (0, 1))  # the folded 1 has no tangent: a zero bias column
        return columns

    def output_tangent(self, module: ConvNd) -> Callable[[Tensor], Tensor] | None:
        if type(module).forward not in _STOCK_FORWARDS or "forward" in vars(module):
            return None
        return lambda inputs: bilinear_tangent(module._conv_forward, inputs, module.weight, module.bias)

    def output_representation(self, module: ConvNd, site: Site, outputs: Sequence[Tensor]) -> Tensor:
        """Per group ``(rows, batch * positions)``, in the order of :meth:`representation`'s columns."""
        spatial = len(module.kernel_size)
        columns = []
        for y in outputs:
            if y.dim() == spatial + 1:
                y = y.unsqueeze(0)
            columns.append(rearrange(y.flatten(2), "n (g r) p -> g r (n p)", g=module.groups))
        return torch.cat(columns, dim=-1)


_STOCK_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
"""The forwards that compute ``_conv_forward(input, weight, bias)`` and nothing else."""

PATCH_BLOCK = 2**18
"""Elements of unfolded patches cut at a time for a representation (1 MiB in float32; at least one
sample's)."""


def unfolded_patches(module: ConvNd, inputs: Tensor) -> Tensor:
    """The patches ``module`` multiplies with its weight: ``(batch, in * prod(kernel), positions)``.

    Rows are ordered like the flattened weight ``(channel, kernel...)``, so for
    every group ``g`` the convolution's output is ``W_g @ patches_g + b_g``.
    """
    spatial = len(module.kernel_size)
    padded = F.pad(inputs, _pad_widths(module), mode=_pad_mode(module))
    if spatial == 2:
        return F.unfold(padded, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return _unfold_nd(padded, module.kernel_size, module.dilation, module.stride)


def _positions(module: ConvNd, inputs: Tensor) -> int:
    """How many patches (output positions) the convolution cuts from each sample of ``inputs``."""
    spatial = len(module.kernel_size)
    widths = _pad_widths(module)  # last axis first
    count = 1
    for axis in range(spatial):
        padded = inputs.shape[-spatial + axis] + sum(widths[2 * (spatial - 1 - axis) : 2 * (spatial - axis)])
        span = module.dilation[axis] * (module.kernel_size[axis] - 1) + 1
        count *= (padded - span) // module.stride[axis] + 1
    return count


def _unfold_nd(padded: Tensor, kernel: tuple, dilation: tuple, stride: tuple) -> Tensor:
    """``F.unfold`` for any number of spatial axes: ``(batch, channels * prod(kernel), positions)``."""
    windows = padded
    for axis, (size, step, spacing) in enumerate(zip(kernel, stride, dilation, strict=True)):
        span = spacing * (size - 1) + 1
        windows = windows.unfold(2 + axis, span, step)[..., ::spacing]
    # windows: (batch, channels, *positions, *kernel) -- each unfold appended its kernel axis.
    batch, channels = windows.shape[:2]
    positions = math.prod(windows.shape[2 : 2 + len(kernel)])
    windows = windows.reshape(batch, channels, positions, math.prod(kernel))
    return rearrange(windows, "n c p k -> n (c k) p")


def _pad_widths(module: ConvNd) -> list[int]:
    """``F.pad`` widths (last axis first) of the padding the convolution applies.

    ``'same'`` puts the odd extra element on the right, as PyTorch does.
    """
    widths: list[int] = []
    for axis in reversed(range(len(module.kernel_size))):
        if module.padding == "valid":
            left = right = 0
        elif module.padding == "same":
            total = module.dilation[axis] * (module.kernel_size[axis] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[axis]
        widths += [left, right]
    return widths


def _pad_mode(module: ConvNd) -> str:
    return "constant" if module.padding_mode == "zeros" else module.padding_mode


@hookimpl
def teleport_register_projectors(registry) -> None:
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        registry.add_projector(conv, ConvProjector)
