"""Teleport batches in the forms models take: a tensor, a tuple of arguments, a mapping of keywords."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.inputs import batch_size, call_model, to_device
from torch_teleport.testing import assert_structured_matches_full, assert_teleport_invariant


class Tagger(nn.Module):
    """A Hugging Face-shaped model: keyword tensors in (ids, mask), a dict-like output out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None, *, scale=1.0):
        hidden = torch.tanh(self.mix(self.embed(input_ids))) * scale
        if attention_mask is not None:
            hidden = hidden * attention_mask[..., None]
        pooled = hidden.sum(1) / hidden.shape[1]
        return {"logits": self.head(pooled), "hidden": hidden}


def logits_loss(output, labels):
    return F.cross_entropy(output["logits"], labels)


def tagging_batch(seed: int = 0, size: int = 4):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (size, 5), generator=generator)
    mask = (torch.rand(size, 5, generator=generator) > 0.2).float()
    return {"input_ids": ids, "attention_mask": mask, "scale": 2.0}, torch.randint(0, 3, (size,), generator=generator)


@pytest.mark.parametrize("gradient", ["structured", "full"])
def test_mapping_inputs_and_dict_outputs(gradient):
    torch.manual_seed(0)
    model = Tagger().double()
    inputs, labels = tagging_batch()
    inputs["attention_mask"] = inputs["attention_mask"].double()
    report = assert_teleport_invariant(model, logits_loss, inputs, labels, gradient=gradient, steps=8)
    assert report.steps > 0 and report.grad_norm_after > report.grad_norm_before


def test_tuple_inputs_and_a_guard_of_the_same_form():
    torch.manual_seed(0)
    model = Tagger()
    inputs, labels = tagging_batch()
    guard_inputs, guard_labels = tagging_batch(seed=1, size=6)
    as_tuple = (inputs["input_ids"], inputs["attention_mask"])
    report = tt.Teleporter(model, logits_loss).teleport(as_tuple, labels, guard=((guard_inputs["input_ids"],), guard_labels))
    assert report.loss_change <= 1e-5 and report.guard_loss_before is not None


def test_the_structured_path_matches_the_full_one_with_keyword_inputs():
    torch.manual_seed(0)
    inputs, labels = tagging_batch()
    inputs["attention_mask"] = inputs["attention_mask"].double()
    assert_structured_matches_full(Tagger().double(), logits_loss, inputs, labels)


def test_bad_forms_and_sizes_are_named():
    model = Tagger()
    inputs, labels = tagging_batch()
    with pytest.raises(TypeError, match="inputs must be a tensor, a sequence of model arguments or a mapping"):
        tt.Teleporter(model, logits_loss).teleport(42, labels)
    with pytest.raises(ValueError, match="inputs and targets disagree on the batch size: 4 vs 3"):
        tt.Teleporter(model, logits_loss).teleport(inputs, labels[:3])
    broken = {**inputs, "attention_mask": inputs["attention_mask"].clone()}
    broken["attention_mask"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="inputs contain non-finite values"):
        tt.Teleporter(model, logits_loss).teleport(broken, labels)


def test_the_trainer_takes_mapping_batches():
    torch.manual_seed(0)
    model = Tagger()
    data = [tagging_batch(seed) for seed in range(3)]
    trainer = tt.TeleportTrainer(
        model, logits_loss, torch.optim.SGD(model.parameters(), lr=0.1), teleport_data=data, device="cpu"
    )
    before = copy.deepcopy(model.state_dict())
    result = trainer.step(*data[0])
    assert result.teleports and not any(r.rolled_back for r in result.teleports)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_helpers():
    inputs, _ = tagging_batch()
    assert batch_size(inputs) == 4 and batch_size((None, inputs["input_ids"])) == 4
    moved = to_device(inputs, "cpu")
    assert set(moved) == set(inputs) and moved["scale"] == 2.0
    assert call_model(Tagger(), inputs)["logits"].shape == (4, 3)
