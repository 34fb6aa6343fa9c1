"""Projector for Mamba-1 blocks: this project's :class:`MambaBlock` and ``mamba_ssm``'s ``Mamba``.

Five of the block's maps are affine in their input: ``in_proj``, ``x_proj``,
``dt_proj``, ``out_proj`` (``nn.Linear``) and the depthwise causal ``conv1d``.
Each moves in the null space of its own inputs, through the linear and
convolution projectors' representations. ``A_log`` and ``D`` stay fixed.

``mamba_ssm``'s block bypasses its submodules' forward hooks (its fused and
reference paths multiply ``in_proj.weight`` and ``dt_proj.weight`` directly),
so the inputs of all five maps are recomputed from the block's input, with
the block's own weights, by :func:`mamba_mixer` in a no-grad pass. It is
matched by the string key ``"mamba_ssm.Mamba"``, so ``mamba_ssm`` is never
imported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torch_teleport import Projector, Site, hookimpl
from torch_teleport.plugins.mamba_block import AFFINE_MAPS, MambaBlock, mamba_mixer
from torch_teleport.projector import Record, output_hook
from torch_teleport.projectors.conv import ConvProjector
from torch_teleport.projectors.linear import LinearProjector

FROZEN = {
    "A_log": (
        "A = -exp(A_log) enters the scan through exp(delta * A), which is not an affine map of any "
        "input, so it has no input null space"
    ),
    "D": (
        "D scales each channel's skip input u_d, a one-input map whose null space is empty unless "
        "u_d is zero on every token of the batch"
    ),
}


class MambaProjector(Projector):
    """One site per affine map, named after its submodule; ``A_log`` and ``D`` frozen."""

    def sites(self, block: nn.Module) -> Sequence[Site]:
        sites = []
        for name in AFFINE_MAPS:
            child = block.get_submodule(name)
            (site,) = _child_projector(child).sites(child)
            bias = f"{name}.{site.bias}" if site.bias else None
            sites.append(Site(name, name, f"{name}.{site.weight}", bias, groups=site.groups))
        return sites

    def frozen(self, block: nn.Module) -> dict[str, str]:
        return dict(FROZEN)

    def capture(self, block: nn.Module, record: Record) -> list[RemovableHandle]:
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            if "hidden_states" in kwargs:
                hidden_states = kwargs["hidden_states"]
                rest = [*args, *(value for key, value in kwargs.items() if key != "hidden_states")]
            else:
                hidden_states, rest = args[0], [*args[1:], *kwargs.values()]
            if any(value is not None for value in rest):
                raise ValueError(
                    "the Mamba projector replays full-sequence forwards only; call the block with "
                    "the hidden states alone (no inference_params / step-by-step decoding)"
                )
            affine_inputs: dict[str, Tensor] = {}
            with torch.no_grad():
                mamba_mixer(block, hidden_states, affine_inputs)
            for name, tensor in affine_inputs.items():
                record(name, tensor)

        return [block.register_forward_pre_hook(hook, with_kwargs=True)]

    def representation(self, block: nn.Module, site: Site, captured: Sequence[Tensor]) -> Tensor:
        child = block.get_submodule(site.stream)
        projector = _child_projector(child)
        (child_site,) = projector.sites(child)
        return projector.representation(child, child_site, captured)


    def capture_outputs(self, block: nn.Module, record: Record) -> list[RemovableHandle]:
        """Hooks on the five submodules; ``mamba_ssm``'s block never calls them, so its sites
        record nothing and take the general path."""
        return [
            block.get_submodule(name).register_forward_hook(output_hook(name, record))
            for name in AFFINE_MAPS
        ]

    def output_representation(self, block: nn.Module, site: Site, outputs: Sequence[Tensor]) -> Tensor:
        child = block.get_submodule(site.stream)
        projector = _child_projector(child)
        (child_site,) = projector.sites(child)
        return projector.output_representation(child, child_site, outputs)


def _child_projector(child: nn.Module) -> Projector:
    if isinstance(child, nn.Conv1d):
        return ConvProjector()
    if isinstance(child, nn.Linear):
        return LinearProjector()
    raise TypeError(
        f"a Mamba block's affine maps are nn.Linear or nn.Conv1d, got {type(child).__name__}"
    )


@hookimpl
def teleport_register_projectors(registry) -> None:
    registry.add_projector(MambaBlock, MambaProjector)
    registry.add_projector("mamba_ssm.Mamba", MambaProjector)
