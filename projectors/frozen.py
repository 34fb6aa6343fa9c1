"""The policy for layers whose parameters have no input null space to move in: frozen, with the reason.

Each class claims every parameter of its module type, moves none, and names
the reason in ``TeleportReport.frozen``; registering one is an explicit
decision (an unregistered layer would be frozen too, but with a warning and
no reason). A model author can register :class:`AdditiveOffsetPolicy` for a
module that adds a learned tensor (e.g. positional embeddings) to its input.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.hooks import RemovableHandle

from torch_teleport import Projector, Site, hookimpl
from torch_teleport.projector import Record


class FrozenPolicy(Projector):
    """Claims every parameter of the module and keeps it fixed for :attr:`reason`."""

    reason: str = ""

    def sites(self, module: nn.Module) -> Sequence[Site]:
        return []

    def frozen(self, module: nn.Module) -> dict[str, str]:
        return {name: self.reason for name, _ in module.named_parameters(recurse=False)}

    def capture(self, module: nn.Module, record: Record) -> list[RemovableHandle]:
        return []

    def representation(self, module: nn.Module, site: Site, captured: Sequence[Tensor]) -> Tensor:
        raise TypeError(f"{type(self).__name__} has no sites, so no representation")


class NormalizationPolicy(FrozenPolicy):
    """LayerNorm, GroupNorm, RMSNorm, BatchNorm and InstanceNorm affine parameters."""

    reason = (
        "elementwise affine map of normalised features: the scale and shift of a channel see the "
        "inputs (x_hat, 1), which are independent unless that channel is constant over the whole "
        "batch (never, for BatchNorm in training mode), so there is no null space"
    )


class EmbeddingPolicy(FrozenPolicy):
    """``nn.Embedding`` and ``nn.EmbeddingBag``: a linear map of one-hot token inputs."""

    reason = (
        "an embedding is a linear map of one-hot tokens: the rows of tokens in the batch have no "
        "null space, and the rows of absent tokens, which form it, affect neither the batch loss nor "
        "its gradient, so the projected ascent direction is exactly zero there"
    )


class AdditiveOffsetPolicy(FrozenPolicy):
    """A learned tensor added to the activations (positional embeddings, a bare bias)."""

    reason = (
        "a learned offset added to the activations: each entry's only input is the constant 1, "
        "so it has no null space"
    )


@hookimpl
def teleport_register_projectors(registry) -> None:
    # _NormBase is the common base of every BatchNorm and InstanceNorm variant (lazy and sync included).
    for norm in (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, _NormBase):
        registry.add_projector(norm, NormalizationPolicy)
    for embedding in (nn.Embedding, nn.EmbeddingBag):
        registry.add_projector(embedding, EmbeddingPolicy)
    # The lab's positional embeddings, by name: the library never imports the lab.
    registry.add_projector("torch_teleport.lab.models.transformer.LearnedPositions", AdditiveOffsetPolicy)
