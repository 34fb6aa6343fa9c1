"""Real-world models from torchvision, timm and Hugging Face transformers (random init, tiny sizes):
an exact teleport keeps the teleport-batch loss, leaves no hook and no changed buffer behind, and
every trainable parameter is either movable or listed in the report's frozen dict with a reason.

``lab/benchmarks/model_coverage.py`` runs the same teleport with the defaults on every torchvision
classifier and more; this is the fast, float64 subset with tight tolerances.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
import torchvision
import transformers
from torch import Tensor, nn
from torch.nn import functional as F

from torch_teleport import Teleporter, check_coverage, default_registry
from torch_teleport.coverage import UNCOVERED_REASON, assign_projectors
from torch_teleport.inputs import call_model
from torch_teleport.model_state import preserved_state
from torch_teleport.projectors.frozen import LAYER_SCALE_REASON, OFFSET_REASON, TOKEN_REASON

F64_RTOL = 1e-10
"""Relative change of the teleport-batch loss allowed after an exact teleport in float64 (the
library's own float64 tolerance, ``torch_teleport.testing.DEFAULT_RTOL``; these models measure
1e-16 to 4e-14)."""
STEPS = 3

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def logits_of(outputs: Any) -> Tensor:
    return outputs if isinstance(outputs, Tensor) else outputs.logits


def classification_loss(outputs: Any, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits_of(outputs), targets)


def causal_lm_loss(outputs: Any, targets: Tensor) -> Tensor:
    logits = logits_of(outputs)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1))


def images(seed: int, size: int, classes: int, batch: int = 4) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, classes, (batch,), generator=generator)


def tokens(seed: int, vocabulary: int, sequences: int = 3, length: int = 8) -> tuple[dict, Tensor]:
    """Token ids and an attention mask (the last sequence right-padded to half its length)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocabulary, (sequences, length), generator=generator)
    mask = torch.ones(sequences, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    ids[-1, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}, ids


def built(seed: int, make: Callable[[], nn.Module], mode: str) -> nn.Module:
    torch.manual_seed(seed)
    model = make().double()
    return model.train(mode == "train")


def hooks(model: nn.Module) -> dict[str, int]:
    """The forward and backward hooks on each module that has any."""
    counts = {
        name: sum(len(getattr(module, attr, {})) for attr in HOOK_DICTS)
        for name, module in model.named_modules()
    }
    return {name: count for name, count in counts.items() if count}


def batch_loss(model: nn.Module, loss_fn, inputs, targets) -> float:
    """The teleport-batch loss as the teleport sees it: dropout off, BatchNorm in its own mode
    (its running statistics restored afterwards), no grad."""
    with preserved_state(model), torch.no_grad():
        return float(loss_fn(call_model(model, inputs), targets))


def check_teleport(
    model: nn.Module,
    loss_fn,
    inputs,
    targets,
    *,
    uncovered: set[str] = frozenset(),
    rtol: float = F64_RTOL,
    guard: tuple | None = None,
    **options,
):
    """Teleport ``model`` exactly (``null_space="exact"``) and check what must hold; return the report.

    ``uncovered`` is the set of trainable parameters no projector covers (left fixed, listed in
    ``report.frozen`` with :data:`UNCOVERED_REASON`); the check fails on any other.
    """
    table = check_coverage(model, inputs)
    assert {name for m in table.modules if m.status == "uncovered" for name in m.frozen} == set(uncovered)
    assert hooks(model) == {}
    buffers_before = {name: b.detach().clone() for name, b in model.named_buffers()}
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    modes_before = [m.training for m in model.modules()]
    loss_before = batch_loss(model, loss_fn, inputs, targets)

    teleporter = Teleporter(
        model, loss_fn, null_space="exact", steps=STEPS, uncovered="freeze" if uncovered else "error", **options
    )
    report = teleporter.teleport(inputs, targets, guard=guard)

    assert report.steps > 0 and not report.rolled_back, report.summary()
    assert report.grad_norm_after > report.grad_norm_before, report.summary()
    loss_after = batch_loss(model, loss_fn, inputs, targets)
    assert abs(loss_after - loss_before) <= rtol * abs(loss_before), (loss_before, loss_after)
    assert report.loss_change <= rtol, report.summary()
    if guard is not None:  # the guard batch's loss rose by no more than the tolerance (1%)
        assert report.guard_loss_after <= report.guard_loss_before * 1.01 + 1e-12, report
    # The model is left as found: no hook, the same modes and buffers (BatchNorm's statistics).
    assert hooks(model) == {}
    assert [m.training for m in model.modules()] == modes_before
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers_before[name]), f"buffer {name} changed"
    # Every trainable parameter is movable or frozen with a reason; frozen ones did not move.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    movable = set(assign_projectors(model, default_registry()).movable())
    assert trainable == movable | set(report.frozen), trainable - movable - set(report.frozen)
    assert all(report.frozen.values())
    assert {name for name, reason in report.frozen.items() if reason == UNCOVERED_REASON} == set(uncovered)
    params = dict(model.named_parameters())
    changed = {name for name, p in params.items() if not torch.equal(p, params_before[name])}
    assert changed, "nothing moved"
    assert not changed & set(report.frozen), f"frozen parameters moved: {changed & set(report.frozen)}"
    return report


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torchvision_resnet18_with_batch_norm(mode):
    model = built(0, lambda: torchvision.models.resnet18(weights=None, num_classes=10), mode)
    inputs, targets = images(1, 32, 10)
    report = check_teleport(model, classification_loss, inputs, targets)
    assert any(layer.null_dim > 0 for layer in report.layers if layer.name.startswith("layer4"))


def test_torchvision_mobilenet_v3_small_with_hardsigmoid_squeeze_excitation():
    model = built(0, lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), "train")
    inputs, targets = images(2, 32, 10)
    check_teleport(model, classification_loss, inputs, targets)


def test_torchvision_vision_transformer_with_multihead_attention():
    def make() -> nn.Module:
        vit = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        )
        # torchvision zeroes the head: a stationary point of the gradient norm (nothing to ascend).
        nn.init.normal_(vit.heads.head.weight, std=0.2)
        return vit

    model = built(0, make, "eval")
    inputs, targets = images(3, 32, 10)
    report = check_teleport(model, classification_loss, inputs, targets)
    assert report.frozen["class_token"] == TOKEN_REASON
    assert report.frozen["encoder.pos_embedding"] == OFFSET_REASON
    moved = {layer.name for layer in report.layers if layer.null_dim > 0}
    assert any("self_attention" in name for name in moved), moved


def test_timm_convnext_with_layer_norm_2d_and_layer_scale():
    model = built(0, lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10), "train")
    inputs, targets = images(4, 32, 10, batch=2)
    gammas = {name for name, _ in model.named_parameters() if name.endswith(".gamma")}
    assert gammas  # the layer scales: elementwise gains, frozen with their reason
    report = check_teleport(model, classification_loss, inputs, targets)
    assert {name: report.frozen[name] for name in gammas} == dict.fromkeys(gammas, LAYER_SCALE_REASON)


VOCABULARY = 50


def test_hugging_face_gpt2_with_attention_mask():
    config = transformers.GPT2Config(
        vocab_size=VOCABULARY, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2
    )
    model = built(0, lambda: transformers.GPT2LMHeadModel(config), "train")
    inputs, ids = tokens(5, VOCABULARY)
    targets = ids.masked_fill(inputs["attention_mask"] == 0, -100)
    guard, guard_ids = tokens(7, VOCABULARY)
    guard_targets = guard_ids.masked_fill(guard["attention_mask"] == 0, -100)
    report = check_teleport(model, causal_lm_loss, inputs, targets, guard=(guard, guard_targets))
    # The lm head shares the token embedding: fixed, with the reason.
    assert "transformer.wte.weight" in report.frozen
    assert any("c_attn" in layer.name and layer.null_dim > 0 for layer in report.layers)


def test_hugging_face_bert_with_attention_mask():
    config = transformers.BertConfig(
        vocab_size=VOCABULARY, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    model = built(0, lambda: transformers.BertForSequenceClassification(config), "train")
    inputs, _ = tokens(6, VOCABULARY)
    targets = torch.tensor([0, 2, 1])
    guard = (tokens(8, VOCABULARY)[0], torch.tensor([1, 1, 0]))
    check_teleport(model, classification_loss, inputs, targets, guard=guard)
