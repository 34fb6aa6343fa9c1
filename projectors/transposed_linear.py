"""Projector for linear maps whose weight is stored ``(in, out)``: ``y = x @ W + b``.

Hugging Face transformers' ``Conv1D`` (GPT-2's attention and MLP
projections; ``nx`` inputs, ``nf`` outputs) computes
``addmm(bias, x, weight)`` with ``weight`` of shape ``(nx, nf)``. Its sites
say ``layout="in_out"``, so the inherited projection, input width and
structured step see the weight transposed. It is matched by the string key
``"transformers.pytorch_utils.Conv1D"``, so ``transformers`` is never
imported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torch_teleport import Projector, Site, hookimpl
from torch_teleport.projector import Record, append_ones, first_input_hook, output_hook


class TransposedLinearProjector(Projector):
    """``y = x @ W + b`` on the last axis, ``W`` of shape ``(in, out)``; every leading axis is a sample."""

    def sites(self, module: nn.Module) -> Sequence[Site]:
        bias = "bias" if module.bias is not None else None
        return [Site("weight", "input", "weight", bias, layout="in_out")]

    def capture(self, module: nn.Module, record: Record) -> list[RemovableHandle]:
        return [module.register_forward_pre_hook(first_input_hook("input", record))]

    def representation(self, module: nn.Module, site: Site, captured: Sequence[Tensor]) -> Tensor:
        samples = torch.cat([x.reshape(-1, module.weight.shape[0]) for x in captured])
        if site.bias is not None:
            samples = append_ones(samples)
        return samples.T.unsqueeze(0)  # (groups, inputs, samples)

    def capture_outputs(self, module: nn.Module, record: Record) -> list[RemovableHandle]:
        return [module.register_forward_hook(output_hook("weight", record))]

    def output_representation(self, module: nn.Module, site: Site, outputs: Sequence[Tensor]) -> Tensor:
        return torch.cat([y.reshape(-1, module.weight.shape[1]) for y in outputs]).T.unsqueeze(0)


@hookimpl
def teleport_register_projectors(registry) -> None:
    registry.add_projector("transformers.pytorch_utils.Conv1D", TransposedLinearProjector)
