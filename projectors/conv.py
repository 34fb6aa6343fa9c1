"""Projector for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``: the CNN case of eqs. 9 and 12.

A convolution multiplies its weight, flattened to ``out x (in/groups * prod(kernel))``,
with every patch of its padded input: per group it is ``y = W R + b`` with ``R``
the unfolded patches (eq. 9). The patches are cut from the input exactly as the
convolution sees it: padded the same way (zeros, ``'same'``, reflect, replicate,
circular) and strided and dilated the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torch_teleport import Projector, Site, hookimpl
from torch_teleport.projector import Record, append_ones, first_input_hook, output_hook

ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


class ConvProjector(Projector):
    """One grouped site per convolution; the samples are the patches (all positions, all images)."""

    def sites(self, module: ConvNd) -> Sequence[Site]:
        bias = "bias" if module.bias is not None else None
        return [Site("weight", "input", "weight", bias, groups=module.groups)]

    def capture(self, module: ConvNd, record: Record) -> list[RemovableHandle]:
        return [module.register_forward_pre_hook(first_input_hook("input", record))]

    def representation(self, module: ConvNd, site: Site, captured: Sequence[Tensor]) -> Tensor:
        patches = torch.cat([conv_patches(module, x) for x in captured], dim=-1)
        columns = rearrange(patches, "(g d) s -> g s d", g=module.groups)
        if site.bias is not None:
            columns = append_ones(columns)
        return columns.transpose(-1, -2)

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

    def output_representation(self, module: ConvNd, site: Site, outputs: Sequence[Tensor]) -> Tensor:
        """Per group ``(rows, positions * batch)``, in the order of :func:`conv_patches`' columns."""
        spatial = len(module.kernel_size)
        columns = []
        for y in outputs:
            if y.dim() == spatial + 1:
                y = y.unsqueeze(0)
            columns.append(rearrange(y.flatten(2), "n (g r) p -> g r (n p)", g=module.groups))
        return torch.cat(columns, dim=-1)


def conv_patches(module: ConvNd, inputs: Tensor) -> Tensor:
    """The patches ``module`` multiplies with its weight: ``(in * prod(kernel), positions * batch)``.

    Rows are ordered like the flattened weight ``(channel, kernel...)``, so for
    every group ``g`` the convolution's output is ``W_g @ patches_g + b_g``.
    Unbatched inputs (no batch axis) are accepted like the convolution accepts them.
    """
    spatial = len(module.kernel_size)
    if inputs.dim() == spatial + 1:
        inputs = inputs.unsqueeze(0)
    padded = F.pad(inputs, _pad_widths(module), mode=_pad_mode(module))
    if spatial == 2:
        patches = F.unfold(
            padded, module.kernel_size, dilation=module.dilation, stride=module.stride
        )
    else:
        patches = _unfold_nd(padded, module.kernel_size, module.dilation, module.stride)
    return rearrange(patches, "n d p -> d (n p)")


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
