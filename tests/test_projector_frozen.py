"""The frozen-layer policies: normalisation, embeddings, learned offsets, layer scales,
position-bias tables and vision tokens are frozen with their reason, in toy models and in
torchvision's, timm's and Hugging Face's; dropout is off, BatchNorm statistics come back and
residual connections need nothing special."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_teleport import Teleporter, build_registry, check_coverage
from torch_teleport.coverage import UNCOVERED_REASON
from torch_teleport.coverage_table import CoverageTable
from torch_teleport.projectors.frozen import (
    LAYER_SCALE_REASON,
    LOGIT_SCALE_REASON,
    OFFSET_REASON,
    RELATIVE_POSITION_REASON,
    TOKEN_REASON,
    AdditiveOffsetPolicy,
    EmbeddingPolicy,
    NormalizationPolicy,
    VisionTokensPolicy,
)
from torch_teleport.testing import assert_teleport_invariant


class LearnedPositions(nn.Module):
    """A bare learned tensor added to the token embeddings: a module no built-in projector knows."""

    def __init__(self, length: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(length, width) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight[: x.shape[1]]


class EverythingElse(nn.Module):
    """Embedding, learned positions, LayerNorm, GroupNorm, BatchNorm, dropout, a residual block."""

    def __init__(self, vocabulary: int = 11, width: int = 8, length: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.positions = LearnedPositions(length, width)
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, width)
        self.group_norm = nn.GroupNorm(2, width)
        self.dropout = nn.Dropout(0.5)
        self.outer = nn.Linear(width, width)
        self.batch_norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.norm(self.positions(self.embedding(tokens)))
        residual = self.outer(
            self.dropout(torch.relu(self.group_norm(self.inner(x).transpose(1, 2)))).transpose(1, 2)
        )
        x = x + residual
        return self.head(self.batch_norm(x.transpose(1, 2)).mean(-1))


def _batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 11, (2, 4), generator=generator), torch.randint(
        0, 3, (2,), generator=generator
    )


def test_other_layers_are_frozen_with_their_reason_and_left_bit_identical():
    torch.manual_seed(0)
    model = EverythingElse().double()
    tokens, targets = _batch()
    frozen_names = [
        "embedding.weight",
        "norm.weight",
        "norm.bias",
        "group_norm.weight",
        "batch_norm.bias",
    ]
    frozen_before = {name: model.get_parameter(name).detach().clone() for name in frozen_names}
    statistics_before = [b.clone() for b in model.batch_norm.buffers()]
    with pytest.warns(UserWarning, match="positions.weight"):
        report = Teleporter(model, F.cross_entropy, null_space="exact", steps=8, lr=0.02).teleport(
            tokens, targets
        )
    assert report.loss_change <= 1e-10  # with dropout on, two forward passes would differ
    assert report.grad_norm_after > 1.05 * report.grad_norm_before, report.summary()
    assert report.frozen["embedding.weight"] == EmbeddingPolicy.reason
    for name in ("norm.weight", "group_norm.bias", "batch_norm.weight"):
        assert report.frozen[name] == NormalizationPolicy.reason
    assert report.frozen["positions.weight"] == "no projector for its module"
    for name, value in frozen_before.items():
        assert torch.equal(model.get_parameter(name), value), name
    for buffer, value in zip(model.batch_norm.buffers(), statistics_before, strict=True):
        assert torch.equal(buffer, value)
    assert model.training and model.dropout.training and model.batch_norm.training


def test_other_layers_keep_the_batch_loss_in_both_precisions():
    tokens, targets = _batch()
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        model = EverythingElse().to(dtype)
        assert_teleport_invariant(
            model, F.cross_entropy, tokens, targets, uncovered="freeze", null_space="exact"
        )


def test_a_registered_offset_policy_names_its_reason_without_a_warning():
    registry = build_registry()
    registry.add_projector(LearnedPositions, AdditiveOffsetPolicy)
    torch.manual_seed(0)
    model = EverythingElse().double()
    tokens, targets = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = Teleporter(model, F.cross_entropy, uncovered="error", registry=registry).teleport(
            tokens, targets
        )
    assert report.frozen["positions.weight"] == AdditiveOffsetPolicy.reason


# -- policies that claim only the tensors they name --------------------------------------------


class TokensAndProjection(nn.Module):
    """A class token, a tensor of its own no policy names, and a Linear that must keep moving."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.extra = nn.Parameter(torch.ones(4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        tokens = torch.cat([self.cls_token.expand(len(x), 1, 4), x], dim=1) * self.extra
        return self.proj(tokens).mean(1)


def test_a_named_tensors_policy_claims_only_the_tensors_it_names():
    registry = build_registry()
    registry.add_projector(TokensAndProjection, VisionTokensPolicy)
    model = TokensAndProjection()
    table = check_coverage(model, torch.randn(3, 2, 4), registry=registry)
    assert table[""].frozen == {"cls_token": TOKEN_REASON, "extra": UNCOVERED_REASON}
    assert table["proj"].status == "covered"


# -- third-party classes, by string key and by pattern -----------------------------------------


def hugging_face_class(name: str) -> type[nn.Module]:
    """A module class that says it was defined in a Hugging Face transformers model file."""

    def init(self: nn.Module) -> None:
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.ones(4))

    cls = type(name, (nn.Module,), {"__init__": init, "forward": lambda self, x: x * self.weight})
    cls.__module__ = "transformers.models.fake.modeling_fake"
    return cls


@pytest.mark.parametrize(
    ("name", "policy"),
    [
        ("FakeRMSNorm", NormalizationPolicy),
        ("FakeTextRMSNormGated", NormalizationPolicy),
        ("T5LayerNorm", NormalizationPolicy),
        ("FakeLayerNorm", None),
        ("FakeNorm", None),
    ],
)
def test_hugging_face_rms_norms_are_matched_by_pattern_without_importing_transformers(name, policy):
    assert build_registry().projector_for(hugging_face_class(name)()) is policy


def test_a_pattern_matches_only_under_its_package_and_an_exact_key_wins():
    outside = hugging_face_class("FakeRMSNorm")
    outside.__module__ = "transformers_lookalike.modeling"
    registry = build_registry()
    assert registry.projector_for(outside()) is None
    registry.add_projector("transformers.FakeRMSNorm", AdditiveOffsetPolicy)
    assert registry.projector_for(hugging_face_class("FakeRMSNorm")()) is AdditiveOffsetPolicy


# -- the real models (random init, tiny configurations) ----------------------------------------


def images(size: int) -> Tensor:
    return torch.randn(
        2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )


def token_ids(*names: str) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randint(1, 50, (2, 6), generator=generator) for name in names}


def torchvision_models() -> list[tuple[str, Callable[[], nn.Module], Any, dict[str, str]]]:
    tv = pytest.importorskip("torchvision")
    from torchvision.models import convnext, maxvit
    from torchvision.models import swin_transformer as swin

    def swin_v2() -> nn.Module:
        return swin.SwinTransformer(
            [4, 4],
            8,
            [1, 1],
            [1, 2],
            [2, 2],
            num_classes=10,
            block=swin.SwinTransformerBlockV2,
            downsample_layer=swin.PatchMergingV2,
        )

    return [
        (
            "torchvision ConvNeXt",
            lambda: convnext.ConvNeXt(
                [convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)],
                num_classes=10,
            ),
            images(32),
            {"layer_scale": LAYER_SCALE_REASON},
        ),
        (
            "torchvision Swin",
            lambda: swin.SwinTransformer([4, 4], 8, [1, 1], [1, 2], [2, 2], num_classes=10),
            images(32),
            {"relative_position_bias_table": RELATIVE_POSITION_REASON},
        ),
        ("torchvision Swin V2", swin_v2, images(32), {"logit_scale": LOGIT_SCALE_REASON}),
        (
            "torchvision MaxViT",
            lambda: maxvit.MaxVit(
                input_size=(32, 32),
                stem_channels=8,
                partition_size=2,
                block_channels=[8, 16],
                block_layers=[1, 1],
                head_dim=4,
                stochastic_depth_prob=0.0,
                num_classes=10,
            ),
            images(32),
            {"relative_position_bias_table": RELATIVE_POSITION_REASON},
        ),
        (
            "torchvision ViT",
            lambda: tv.models.VisionTransformer(
                image_size=32,
                patch_size=8,
                num_layers=1,
                num_heads=2,
                hidden_dim=16,
                mlp_dim=32,
                num_classes=10,
            ),
            images(32),
            {"class_token": TOKEN_REASON, "pos_embedding": OFFSET_REASON},
        ),
    ]


def timm_models() -> list[tuple[str, Callable[[], nn.Module], Any, dict[str, str]]]:
    timm = pytest.importorskip("timm")
    return [
        (
            "timm ConvNeXt",
            lambda: timm.create_model("convnext_atto", num_classes=10),
            images(32),
            {"gamma": LAYER_SCALE_REASON},
        ),
        (
            "timm ViT with registers and layer scale",
            lambda: timm.create_model(
                "vit_tiny_patch16_224",
                img_size=32,
                patch_size=8,
                depth=1,
                embed_dim=16,
                num_heads=2,
                num_classes=10,
                init_values=1e-5,
                reg_tokens=2,
            ),
            images(32),
            {
                "cls_token": TOKEN_REASON,
                "reg_token": TOKEN_REASON,
                "pos_embed": OFFSET_REASON,
                "gamma": LAYER_SCALE_REASON,
            },
        ),
        (
            "timm Swin",
            lambda: timm.create_model(
                "swin_tiny_patch4_window7_224",
                img_size=32,
                window_size=4,
                embed_dim=8,
                depths=(1, 1),
                num_heads=(1, 2),
                num_classes=10,
            ),
            images(32),
            {"relative_position_bias_table": RELATIVE_POSITION_REASON},
        ),
        (
            "timm MaxViT (TensorFlow position bias)",
            lambda: timm.create_model("maxvit_tiny_tf_224", img_size=64, num_classes=10),
            images(64),
            {"relative_position_bias_table": RELATIVE_POSITION_REASON},
        ),
        (
            "timm MaxViT (position bias)",
            lambda: timm.create_model("maxvit_pico_rw_256", img_size=64, num_classes=10),
            images(64),
            {"relative_position_bias_table": RELATIVE_POSITION_REASON},
        ),
    ]


def hugging_face_models() -> list[tuple[str, Callable[[], nn.Module], Any, dict[str, str]]]:
    transformers = pytest.importorskip("transformers")
    decoder = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    heads = dict(num_attention_heads=2, num_key_value_heads=1)
    t5 = dict(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    norm = {"norm.weight": NormalizationPolicy.reason}
    return [
        (
            "Llama",
            lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**decoder, **heads)),
            token_ids("input_ids"),
            norm,
        ),
        (
            "Gemma",
            lambda: transformers.GemmaForCausalLM(
                transformers.GemmaConfig(**decoder, **heads, head_dim=8)
            ),
            token_ids("input_ids"),
            norm,
        ),
        (
            "T5",
            lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(**t5)),
            token_ids("input_ids", "decoder_input_ids"),
            {"layer_norm.weight": NormalizationPolicy.reason},
        ),
        (
            "MT5",
            lambda: transformers.MT5ForConditionalGeneration(transformers.MT5Config(**t5)),
            token_ids("input_ids", "decoder_input_ids"),
            {"layer_norm.weight": NormalizationPolicy.reason},
        ),
    ]


def frozen_of(table: CoverageTable) -> dict[str, str]:
    return {name: reason for module in table.modules for name, reason in module.frozen.items()}


@pytest.mark.parametrize("family", [torchvision_models, timm_models, hugging_face_models])
def test_real_models_freeze_these_parameters_with_their_reason_and_leave_none_uncovered(family):
    for label, build, inputs, reasons in family():
        torch.manual_seed(0)
        model = build().double().eval()
        table = check_coverage(model, inputs)
        frozen = frozen_of(table)
        assert UNCOVERED_REASON not in frozen.values(), (label, frozen)
        expected = {
            name: reason
            for name, _ in model.named_parameters()
            for suffix, reason in reasons.items()
            if name.endswith(suffix)
        }
        found = {suffix for suffix in reasons if any(name.endswith(suffix) for name in expected)}
        assert found == set(reasons), label  # every listed kind of tensor is in the model
        assert {name: frozen.get(name) for name in expected} == expected, label
        assert table.count("covered") > 0, label
