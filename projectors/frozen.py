"""The policies for parameters that have no input null space to move in: frozen, with the reason.

Registering one is an explicit decision (an unregistered layer would be
frozen too, but with a warning and no reason). The normalisation, embedding
and offset policies claim every parameter of their module; the others claim
only the tensors they name, so a block that also holds projected layers
(a ConvNeXt block's convolutions, a window attention's ``qkv``) keeps them
moving. Third-party classes are matched by string keys, so ``torchvision``,
``timm`` and ``transformers`` are never imported here. A model author can
register :class:`AdditiveOffsetPolicy` for a module that adds a learned
tensor (e.g. positional embeddings) to its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.hooks import RemovableHandle

from torch_teleport import Projector, Site, hookimpl
from torch_teleport.projector import Record

OFFSET_REASON = (
    "a learned offset added to the activations: each entry's only input is the constant 1, "
    "so it has no null space"
)
TOKEN_REASON = (
    "a learned token joined to every sample's sequence: as a map it takes the constant 1 (the same "
    "token for every sample), so it has no null space"
)
LAYER_SCALE_REASON = (
    "a layer scale multiplies each channel of a residual branch by its own gain: a channel's gain "
    "sees one input, the branch's output in that channel, so it has a null space only where that "
    "output is zero on the whole batch"
)
RELATIVE_POSITION_REASON = (
    "a relative position bias is added to the attention logits before the softmax, the same entry "
    "for every sample and window: each entry's only input is the constant 1, so it has no null "
    "space"
)
LOGIT_SCALE_REASON = (
    "a head's logit scale enters as exp(logit_scale) times its cosine similarities, not as an "
    "affine map of an input, and as a gain on similarities that are never all zero it has no "
    "null space"
)


class FrozenPolicy(Projector):
    """Claims every parameter of the module itself and keeps it fixed for :attr:`reason` (a
    parametrized one for its parametrization's reason, given where coverage is assigned)."""

    reason: ClassVar[str] = ""

    def sites(self, module: nn.Module) -> Sequence[Site]:
        return []

    def frozen(self, module: nn.Module) -> dict[str, str]:
        names = [name for name, _ in module.named_parameters(recurse=False)]
        names += list(getattr(module, "parametrizations", {}))
        return dict.fromkeys(names, self.reason)

    def capture(self, module: nn.Module, record: Record) -> list[RemovableHandle]:
        return []

    def representation(self, module: nn.Module, site: Site, captured: Sequence[Tensor]) -> Tensor:
        raise TypeError(f"{type(self).__name__} has no sites, so no representation")


class NamedTensorsPolicy(FrozenPolicy):
    """Claims only the module's own parameters named in :attr:`tensors`, each with its reason."""

    tensors: ClassVar[dict[str, str]] = {}

    def frozen(self, module: nn.Module) -> dict[str, str]:
        own = dict(module.named_parameters(recurse=False))
        return {name: reason for name, reason in self.tensors.items() if name in own}


class NormalizationPolicy(FrozenPolicy):
    """LayerNorm, GroupNorm, RMSNorm, BatchNorm and InstanceNorm affine parameters, and the
    normalisations of Hugging Face transformers that are not ``nn.LayerNorm`` (its RMS norms)."""

    reason = (
        "elementwise affine map of normalised features: the scale and shift of a channel see the "
        "inputs (x_hat, 1), which are independent unless that channel is constant over the whole "
        "batch (never, for BatchNorm in training mode), so there is no null space"
    )


class EmbeddingPolicy(FrozenPolicy):
    """``nn.Embedding`` and ``nn.EmbeddingBag``: a linear map of one-hot token inputs."""

    reason = (
        "an embedding is a linear map of one-hot tokens: the rows of tokens in the batch have no "
        "null space, and the rows of absent tokens, which form it, affect neither the batch loss "
        "nor its gradient, so the projected ascent direction is exactly zero there"
    )


class AdditiveOffsetPolicy(FrozenPolicy):
    """A learned tensor added to the activations (positional embeddings, a bare bias)."""

    reason = OFFSET_REASON


class LayerScalePolicy(NamedTensorsPolicy):
    """The per-channel gain of a residual branch: ConvNeXt's layer scale, timm's LayerScale."""

    tensors = {"layer_scale": LAYER_SCALE_REASON, "gamma": LAYER_SCALE_REASON}


class AttentionBiasPolicy(NamedTensorsPolicy):
    """What windowed attention adds to its logits: a relative position-bias table (Swin,
    MaxViT) or a per-head logit scale (Swin V2); the projections beside them keep moving."""

    tensors = {
        "relative_position_bias_table": RELATIVE_POSITION_REASON,
        "logit_scale": LOGIT_SCALE_REASON,
    }


class VisionTokensPolicy(NamedTensorsPolicy):
    """A vision transformer's class, register and distillation tokens and positional embedding."""

    tensors = {
        **dict.fromkeys(("class_token", "cls_token", "reg_token", "dist_token"), TOKEN_REASON),
        **dict.fromkeys(("pos_embedding", "pos_embed"), OFFSET_REASON),
    }


HUGGING_FACE_NORMS = (
    # Every class of transformers 5.24 whose name contains RMSNorm (213, gated and unweighted
    # variants included) holds a per-channel weight (one also a bias) or nothing.
    "transformers.*RMSNorm*",
    # RMS norms named LayerNorm: T5's and the copies transformers keeps of it.
    *(
        f"transformers.{name}LayerNorm"
        for name in (
            "T5",
            "MT5",
            "LongT5",
            "UMT5",
            "SwitchTransformers",
            "Pop2Piano",
            "Pix2Struct",
            "Udop",
        )
    ),
)

NAMED_TENSOR_POLICIES: dict[str, type[NamedTensorsPolicy]] = {
    "torchvision.models.convnext.CNBlock": LayerScalePolicy,
    "timm.models.convnext.ConvNeXtBlock": LayerScalePolicy,
    "timm.layers.LayerScale": LayerScalePolicy,
    "timm.layers.LayerScale2d": LayerScalePolicy,
    "torchvision.models.swin_transformer.ShiftedWindowAttention": AttentionBiasPolicy,
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": AttentionBiasPolicy,
    "timm.models.swin_transformer.WindowAttention": AttentionBiasPolicy,
    "timm.models.swin_transformer_v2.WindowAttention": AttentionBiasPolicy,
    "timm.layers.RelPosBias": AttentionBiasPolicy,
    "timm.layers.RelPosBiasTf": AttentionBiasPolicy,
    "torchvision.models.vision_transformer.VisionTransformer": VisionTokensPolicy,
    "torchvision.models.vision_transformer.Encoder": VisionTokensPolicy,
    "timm.models.vision_transformer.VisionTransformer": VisionTokensPolicy,
}
"""Third-party modules holding tensors without a null space beside layers that move, by key."""


@hookimpl
def teleport_register_projectors(registry) -> None:
    # _NormBase is the base of every BatchNorm and InstanceNorm variant (lazy and sync included).
    for norm in (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, _NormBase, *HUGGING_FACE_NORMS):
        registry.add_projector(norm, NormalizationPolicy)
    for embedding in (nn.Embedding, nn.EmbeddingBag):
        registry.add_projector(embedding, EmbeddingPolicy)
    # The lab's positional embeddings, by name: the library never imports the lab.
    registry.add_projector(
        "torch_teleport.lab.models.transformer.LearnedPositions", AdditiveOffsetPolicy
    )
    for key, policy in NAMED_TENSOR_POLICIES.items():
        registry.add_projector(key, policy)
