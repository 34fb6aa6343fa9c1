"""Projector for Mamba-1 blocks: the lab's ``MambaBlock`` and ``mamba_ssm``'s ``Mamba``.

Five of the block's maps are affine in their input: ``in_proj``, ``x_proj``,
``dt_proj``, ``out_proj`` (``nn.Linear``) and the depthwise causal ``conv1d``.
Each moves in the null space of its own inputs, through the linear and
convolution projectors' representations. ``A_log`` and ``D`` stay fixed.

``mamba_ssm``'s block bypasses its submodules' forward hooks (its fused and
reference paths multiply ``in_proj.weight`` and ``dt_proj.weight`` directly),
so the inputs of all five maps are recomputed from the block's input, with
the block's own weights, by :func:`mamba_mixer` in a no-grad pass (the
lab's block runs the same function as its forward). Both blocks are matched
by string keys, so neither ``mamba_ssm`` nor the lab is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torch_teleport import Projector, Site, hookimpl
from torch_teleport.projector import Record, output_hook
from torch_teleport.projectors.conv import ConvProjector
from torch_teleport.projectors.linear import LinearProjector

AFFINE_MAPS = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")
"""The block's submodules that are affine maps of an input, in the order the data meets them."""

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


def mamba_mixer(
    block: nn.Module, hidden_states: Tensor, affine_inputs: dict[str, Tensor] | None = None
) -> Tensor:
    """The Mamba-1 mixer of ``block`` (the lab's ``MambaBlock`` or ``mamba_ssm``'s ``Mamba``).

    When ``affine_inputs`` is given, the input of each of :data:`AFFINE_MAPS`
    is stored in it under the submodule's name, as that submodule receives it.
    """
    seen = affine_inputs if affine_inputs is not None else {}
    length = hidden_states.shape[1]
    seen["in_proj"] = hidden_states
    x, z = block.in_proj(hidden_states).chunk(2, dim=-1)
    seen["conv1d"] = x = rearrange(x, "b l d -> b d l")
    x = F.silu(block.conv1d(x)[..., :length])
    seen["x_proj"] = x = rearrange(x, "b d l -> b l d")
    dt, B, C = block.x_proj(x).split([block.dt_rank, block.d_state, block.d_state], dim=-1)
    seen["dt_proj"] = dt
    delta = F.softplus(block.dt_proj(dt))
    y = selective_scan(x, delta, -torch.exp(block.A_log), B, C, block.D)
    seen["out_proj"] = y = y * F.silu(z)
    return block.out_proj(y)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor:
    """The selective scan, one step at a time.

    Shapes: ``u, delta`` ``(b, l, d)``; ``A`` ``(d, n)``; ``B, C`` ``(b, l, n)``;
    ``D`` ``(d,)``. Returns ``y`` ``(b, l, d)`` with ``h_t = exp(delta_t A) h_{t-1}
    + delta_t B_t u_t`` (``h_0 = 0``) and ``y_t = C_t h_t + D u_t``.
    """
    decay = torch.exp(torch.einsum("bld,dn->bldn", delta, A))
    drive = torch.einsum("bld,bln,bld->bldn", delta, B, u)
    state = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    outputs = []
    for step in range(u.shape[1]):
        state = decay[:, step] * state + drive[:, step]
        outputs.append(torch.einsum("bdn,bn->bd", state, C[:, step]))
    return torch.stack(outputs, dim=1) + u * D


@hookimpl
def teleport_register_projectors(registry) -> None:
    registry.add_projector("torch_teleport.lab.models.mamba_block.MambaBlock", MambaProjector)
    registry.add_projector("mamba_ssm.Mamba", MambaProjector)
