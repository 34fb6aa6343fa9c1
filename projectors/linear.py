"""Projector for ``nn.Linear`` (and its subclasses): the MLP case of eq. 11."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torch_teleport import Projector, Site, hookimpl
from torch_teleport.projector import (
    Record,
    append_ones,
    bilinear_tangent,
    first_input_hook,
    output_hook,
)


class LinearProjector(Projector):
    """``y = W x + b`` on the last axis; every leading axis (batch, tokens) is a sample."""

    def sites(self, module: nn.Linear) -> Sequence[Site]:
        return [Site("weight", "input", "weight", "bias" if module.bias is not None else None)]

    def capture(self, module: nn.Linear, record: Record) -> list[RemovableHandle]:
        return [module.register_forward_pre_hook(first_input_hook("input", record))]

    def representation(self, module: nn.Linear, site: Site, captured: Sequence[Tensor]) -> Tensor:
        samples = torch.cat([x.reshape(-1, module.in_features) for x in captured])
        if site.bias is not None:
            samples = append_ones(samples)
        return samples.T.unsqueeze(0)

    def capture_outputs(self, module: nn.Linear, record: Record) -> list[RemovableHandle]:
        return [module.register_forward_hook(output_hook("weight", record))]

    def output_representation(self, module: nn.Linear, site: Site, outputs: Sequence[Tensor]) -> Tensor:
        return torch.cat([y.reshape(-1, module.out_features) for y in outputs]).T.unsqueeze(0)

    def output_tangent(self, module: nn.Linear) -> Callable[[Tensor], Tensor] | None:
        if type(module).forward is not nn.Linear.forward or "forward" in vars(module):
            return None
        return lambda inputs: bilinear_tangent(F.linear, inputs, module.weight, module.bias)


@hookimpl
def teleport_register_projectors(registry) -> None:
    registry.add_projector(nn.Linear, LinearProjector)
