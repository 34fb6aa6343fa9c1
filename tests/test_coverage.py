"""Coverage: ``check_coverage`` per module (covered / frozen / uncovered, each site's room on a batch),
and what a teleport says about the parameters no projector covers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_teleport import Teleporter, build_registry
from torch_teleport.coverage import UNCOVERED_REASON, CoverageTable, check_coverage
from torch_teleport.projectors.frozen import EmbeddingPolicy, NormalizationPolicy

VOCABULARY, WIDTH, BATCH = 30, 20, 8


class Gain(nn.Module):
    """An elementwise gain and shift: a module with parameters that no projector knows."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(features))
        self.shift = nn.Parameter(torch.zeros(features))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain + self.shift


class Mixed(nn.Module):
    """Embedding, a hidden Linear(20, 16), BatchNorm, LayerNorm, a Gain, dropout, a head, and a spare
    Linear the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH)
        self.hidden = nn.Linear(WIDTH, 16)
        self.batch_norm = nn.BatchNorm1d(16)
        self.norm = nn.LayerNorm(16)
        self.gain = Gain(16)
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(16, 3)
        self.spare = nn.Linear(4, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        x = torch.relu(self.hidden(self.embed(tokens)))
        return self.head(self.dropout(self.gain(self.norm(self.batch_norm(x)))))


def tokens() -> Tensor:
    """``BATCH`` distinct tokens: distinct embedding rows, so the hidden layer sees rank ``BATCH``."""
    return torch.randperm(VOCABULARY, generator=torch.Generator().manual_seed(0))[:BATCH]


@pytest.fixture
def model() -> Mixed:
    torch.manual_seed(0)
    return Mixed()


def test_statuses_reasons_and_null_dimensions(model):
    table = check_coverage(model, tokens())
    assert isinstance(table, CoverageTable) and table.batch == BATCH
    assert [m.name for m in table.modules] == [
        "embed",
        "hidden",
        "batch_norm",
        "norm",
        "gain",
        "head",
        "spare",
    ]
    statuses = {m.name: m.status for m in table.modules}
    assert statuses == {
        "embed": "frozen",
        "hidden": "covered",
        "batch_norm": "frozen",
        "norm": "frozen",
        "gain": "uncovered",
        "head": "covered",
        "spare": "covered",
    }
    assert table["embed"].reason == EmbeddingPolicy.reason
    assert table["norm"].reason == table["batch_norm"].reason == NormalizationPolicy.reason
    assert table["norm"].frozen == dict.fromkeys(["norm.weight", "norm.bias"], NormalizationPolicy.reason)
    assert table["gain"].reason == UNCOVERED_REASON
    assert table["gain"].parameters == ("gain.gain", "gain.shift")
    assert table["hidden"].reason is None and table["hidden"].frozen == {}

    (hidden,) = table["hidden"].sites
    # Linear(20, ...) with a bias on 8 independent samples: 21 inputs, rank 8, so 21 - 8 = 13.
    assert (hidden.input_dim, hidden.null_dim, hidden.samples) == (WIDTH + 1, WIDTH + 1 - BATCH, BATCH)
    (spare,) = table["spare"].sites
    assert spare.null_dim is None and spare.input_dim == 5 and spare.samples == 0
    assert (table.count("covered"), table.count("frozen"), table.count("uncovered")) == (3, 3, 1)
    with pytest.raises(KeyError, match="dropout"):
        table["dropout"]


def test_null_dimensions_agree_with_a_teleport(model):
    table = check_coverage(model, tokens())
    checked = {
        f"{m.name}.{site.name}": site.null_dim
        for m in table.modules
        for site in m.sites
        if site.null_dim is not None
    }
    targets = torch.zeros(BATCH, dtype=torch.long)
    # check_coverage reports the exact null space (tau = 1): compare with an exact teleport
    report = Teleporter(model, F.cross_entropy, null_space="exact", uncovered="freeze", steps=1).teleport(
        tokens(), targets
    )
    assert checked == {layer.name: layer.null_dim for layer in report.layers}


def test_the_model_is_left_as_it_was(model):
    model.train()
    model.dropout.eval()  # a mixed state must come back too
    state = {name: value.clone() for name, value in model.state_dict().items()}
    modes = {name: module.training for name, module in model.named_modules()}
    check_coverage(model, tokens())
    after = model.state_dict()
    assert state.keys() == after.keys()
    for name, value in state.items():
        assert torch.equal(after[name], value), name  # BatchNorm statistics included
    assert {name: module.training for name, module in model.named_modules()} == modes
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert all(p.grad is None for p in model.parameters())


def test_hooks_are_removed_when_the_forward_fails(model):
    with pytest.raises(IndexError):
        check_coverage(model, torch.tensor([VOCABULARY + 5]))
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_shared_and_non_trainable_parameters():
    torch.manual_seed(0)
    first, second, fixed = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
    second.weight = first.weight
    fixed.bias.requires_grad_(False)
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), fixed)
    table = check_coverage(model, torch.randn(4, 6))
    assert table["0"].status == "frozen" and table["0"].reason == "shared between modules"
    assert table["0"].parameters == ("0.weight", "0.bias")
    assert table["2"].status == "frozen" and table["2"].parameters == ("2.bias",)
    assert table["4"].status == "frozen"
    assert table["4"].reason == "its site has a parameter with requires_grad=False"
    assert table["4"].parameters == ("4.weight",)  # the bias is not trainable: not listed


def test_a_model_that_cannot_move_gets_a_table_not_an_error():
    model = nn.Sequential(Gain(5), nn.LayerNorm(5))
    table = check_coverage(model, torch.randn(3, 5))
    assert [(m.name, m.status) for m in table.modules] == [("0", "uncovered"), ("1", "frozen")]
    assert "0 covered, 1 frozen, 1 uncovered; 0 of 0 sites" in table.summary()


def test_a_registered_projector_changes_the_status(model):
    registry = build_registry()
    registry.add_projector(Gain, NormalizationPolicy)
    table = check_coverage(model, tokens(), registry=registry)
    assert table["gain"].status == "frozen" and table["gain"].reason == NormalizationPolicy.reason


def test_the_printed_table_is_aligned_and_the_dict_is_plain_data(model):
    table = check_coverage(model, tokens())
    text = str(table)
    lines = text.splitlines()
    header = lines[0].split()
    assert header == ["module", "type", "status", "site", "inputs", "null", "samples", "note"]
    rows = {line.split()[0]: line for line in lines[1:] if line and not line.startswith(" ")}
    assert set(table.modules[i].name for i in range(len(table.modules))) <= set(rows)
    status_column = lines[0].index("status")
    for name, status in (("hidden", "covered"), ("gain", "uncovered"), ("embed", "frozen")):
        assert rows[name].index(status) == status_column, rows[name]
    assert rows["hidden"].split()[3:7] == ["weight", "21", "13", "8"]
    assert "did not run on the batch" in rows["spare"]
    assert "no projector for its module" in rows["gain"]
    assert "elementwise affine map of normalised features" in rows["norm"]
    assert lines[-1] == table.summary()
    assert table.summary().startswith("Mixed: 7 modules with trainable parameters: 3 covered")

    data = json.loads(json.dumps(table.to_dict()))
    assert data["batch"] == BATCH and data["model"] == "Mixed"
    hidden = next(m for m in data["modules"] if m["name"] == "hidden")
    assert hidden["sites"] == [
        {"name": "weight", "input_dim": 21, "null_dim": 13, "samples": 8, "groups": 1}
    ]
    assert next(m for m in data["modules"] if m["name"] == "embed")["frozen"] == {
        "embed.weight": EmbeddingPolicy.reason
    }


def gains(count: int, width: int = 4) -> list[nn.Module]:
    return [Gain(width) for _ in range(count)]


def test_nothing_to_move_names_the_uncovered_types_apart_from_the_frozen_ones():
    model = nn.Sequential(nn.Embedding(5, 4), *gains(12), nn.LayerNorm(4))
    with pytest.raises(ValueError) as raised:
        Teleporter(model, F.cross_entropy, uncovered="freeze")
    message = str(raised.value)
    assert message.startswith("no parameter of Sequential can be teleported (27 trainable: ")
    assert "No projector for the module types Gain x12 (1.gain, 1.shift, 2.gain, ... (24 in all))" in message
    assert f"Kept fixed: Embedding x1 (0.weight), reason: {EmbeddingPolicy.reason}" in message
    assert f"LayerNorm x1 (13.weight, 13.bias), reason: {NormalizationPolicy.reason}" in message
    assert message.index("No projector") < message.index("Kept fixed")
    assert "Embedding" not in message[message.index("No projector") : message.index("Kept fixed")]
    assert "registry.add_projector(ModuleType, ProjectorClass)" in message
    assert "teleport_register_projectors" in message and "docs/plugins.md" in message
    assert "7.gain" not in message  # counted, not listed


def test_a_model_without_trainable_parameters_says_so():
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of Linear can be teleported: it has no trainable parameters"):
        Teleporter(model, F.cross_entropy)


def test_the_warning_groups_uncovered_parameters_by_module_type():
    model = nn.Sequential(nn.Linear(4, 4), *gains(10), nn.Linear(4, 3))
    with pytest.warns(UserWarning) as warned:
        teleporter = Teleporter(model, F.cross_entropy)
    (warning,) = [w for w in warned if "leaves these parameters fixed" in str(w.message)]
    message = str(warning.message)
    assert (
        "teleport leaves these parameters fixed (no projector for their module): "
        "Gain x10 (1.gain, 1.shift, 2.gain, ... (20 in all))" in message
    )
    assert "registry.add_projector" in message and "5.gain" not in message
    inputs, targets = torch.randn(2, 4), torch.tensor([0, 2])
    report = teleporter.teleport(inputs, targets)
    uncovered = [name for name, reason in report.frozen.items() if reason == "no projector for its module"]
    assert uncovered == [f"{i}.{p}" for i in range(1, 11) for p in ("gain", "shift")]


def test_the_error_policy_names_parameters_and_counts_module_types():
    model = nn.Sequential(nn.Linear(4, 4), *gains(3), nn.PReLU(4))
    with pytest.raises(ValueError) as raised:
        Teleporter(model, F.cross_entropy, uncovered="error")
    message = str(raised.value)
    assert message.startswith(
        "no projector covers these parameters: 1.gain, 1.shift, 2.gain, 2.shift, 3.gain, 3.shift, "
        "... (7 in all); by module type: Gain x3 (6 parameters); PReLU x1 (1 parameter)."
    )
    assert 'uncovered policy "warn" or "freeze"' in message
