"""Coverage: which projector moves which parameter (``assign_projectors``), the clear errors of a
projector that names what a module lacks or of a parametrized layer, and the table
(``check_coverage``): covered / frozen / uncovered per module and each site's room on a batch,
judged with the teleport's own core space, rounding and LayerNorm's mean direction told apart."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal, weight_norm

from torch_teleport import Site, Teleporter, build_registry, check_coverage
from torch_teleport.core_space import DEFAULT_NULL_SPACE
from torch_teleport.coverage import UNCOVERED_REASON, ProjectorSiteError, assign_projectors
from torch_teleport.coverage_table import CoverageTable
from torch_teleport.plugins.null_spaces.threshold import ThresholdNullSpace
from torch_teleport.projectors.frozen import EmbeddingPolicy, NormalizationPolicy
from torch_teleport.projectors.linear import LinearProjector

DEFAULT_TAU = ThresholdNullSpace().tau

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
    """Embedding, a hidden Linear(20, 16), BatchNorm, LayerNorm, a Gain, dropout, a head, and a
    spare Linear the forward never calls."""

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
    """``BATCH`` distinct tokens (distinct embedding rows): the hidden layer sees rank ``BATCH``."""
    return torch.randperm(VOCABULARY, generator=torch.Generator().manual_seed(0))[:BATCH]


@pytest.fixture
def model() -> Mixed:
    torch.manual_seed(0)
    return Mixed()


def null_dims(table: CoverageTable) -> dict[str, int]:
    """Each site's null dimension, named as a teleport report names its layers."""
    return {
        f"{m.name}.{site.name}": site.null_dim
        for m in table.modules
        for site in m.sites
        if site.null_dim is not None
    }


def test_statuses_reasons_and_null_dimensions(model):
    table = check_coverage(model, tokens(), null_space="exact")
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
    assert table["norm"].frozen == dict.fromkeys(
        ["norm.weight", "norm.bias"], NormalizationPolicy.reason
    )
    assert table["gain"].reason == UNCOVERED_REASON
    assert table["gain"].parameters == ("gain.gain", "gain.shift")
    assert table["hidden"].reason is None and table["hidden"].frozen == {}

    (hidden,) = table["hidden"].sites
    # Linear(20, ...) with a bias on 8 independent samples: 21 inputs, rank 8, so 21 - 8 = 13.
    assert (hidden.input_dim, hidden.null_dim, hidden.samples) == (
        WIDTH + 1,
        WIDTH + 1 - BATCH,
        BATCH,
    )
    (spare,) = table["spare"].sites
    assert spare.null_dim is None and spare.input_dim == 5 and spare.samples == 0
    assert (table.count("covered"), table.count("frozen"), table.count("uncovered")) == (3, 3, 1)
    with pytest.raises(KeyError, match="dropout"):
        table["dropout"]


@pytest.mark.parametrize(
    "options", [{}, {"null_space": "exact"}, {"null_space": "svd", "tau": 0.99}]
)
def test_null_dimensions_agree_with_a_teleport_of_the_same_options(model, options):
    table = check_coverage(model, tokens(), **options)
    targets = torch.zeros(BATCH, dtype=torch.long)
    report = Teleporter(model, F.cross_entropy, uncovered="freeze", steps=1, **options).teleport(
        tokens(), targets
    )
    assert null_dims(table) == {layer.name: layer.null_dim for layer in report.layers}


def relu_mlp(seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    """A 3-32-2 ReLU network on 64 samples: its head's inputs hold most of their energy in a few
    directions, so the default core space (energy 0.999) leaves it more room than the exact one."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 2))
    generator = torch.Generator().manual_seed(seed)
    return (
        model,
        torch.randn(64, 3, generator=generator),
        torch.randint(0, 2, (64,), generator=generator),
    )


def test_the_default_table_shows_the_room_of_the_default_teleport():
    model, inputs, targets = relu_mlp(0)
    table = check_coverage(model, inputs)
    assert table.null_space == f"{DEFAULT_NULL_SPACE} (tau = {DEFAULT_TAU:g})"
    exact = check_coverage(model, inputs, null_space="exact")
    assert exact.null_space == "exact (tau = 1)"
    # The exact null space shows (next to) no room where the default teleport has plenty.
    assert null_dims(table)["2.weight"] > null_dims(exact)["2.weight"]
    report = Teleporter(model, F.cross_entropy, steps=1).teleport(inputs, targets)
    assert null_dims(table) == {layer.name: layer.null_dim for layer in report.layers}


def test_a_basis_sample_joins_the_core_space_as_in_a_teleport():
    model, inputs, targets = relu_mlp(1)
    basis = torch.randn(40, 3, generator=torch.Generator().manual_seed(9))
    table = check_coverage(model, inputs, null_space="exact", basis=basis)
    assert table["2"].sites[0].samples == len(inputs) + len(basis)
    assert (
        null_dims(table)["2.weight"]
        <= null_dims(check_coverage(model, inputs, null_space="exact"))["2.weight"]
    )
    teleporter = Teleporter(model, F.cross_entropy, null_space="exact", steps=1)
    report = teleporter.teleport(inputs, targets, basis=basis)
    assert null_dims(table) == {layer.name: layer.null_dim for layer in report.layers}


def test_a_null_space_object_is_taken_as_it_is():
    model, inputs, _ = relu_mlp(2)
    space = build_registry().get("null_space", "svd")(tau=0.9)
    table = check_coverage(model, inputs, null_space=space)
    assert table.null_space == f"{type(space).__name__} (tau = 0.9)"
    assert null_dims(table) == null_dims(check_coverage(model, inputs, null_space="svd", tau=0.9))


def test_the_model_is_left_as_it_was(model):
    model.train()
    model.dropout.eval()  # a mixed state must come back too
    state = {name: value.clone() for name, value in model.state_dict().items()}
    modes = {name: module.training for name, module in model.named_modules()}
    check_coverage(model, tokens(), basis=tokens().flip(0))
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
    table = check_coverage(model, tokens(), null_space="exact")
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
    assert (
        data["batch"] == BATCH
        and data["model"] == "Mixed"
        and data["null_space"] == "exact (tau = 1)"
    )
    hidden = next(m for m in data["modules"] if m["name"] == "hidden")
    assert hidden["sites"] == [
        {
            "name": "weight",
            "input_dim": 21,
            "null_dim": 13,
            "samples": 8,
            "groups": 1,
            "rounding_dim": 0,
            "layer_norm_dim": 0,
            "room": 13,
            "note": "",
        }
    ]
    assert next(m for m in data["modules"] if m["name"] == "embed")["frozen"] == {
        "embed.weight": EmbeddingPolicy.reason
    }


# -- LayerNorm's mean direction and rounding: null directions that are no room ----------------


def after_layer_norm(seed: int, width: int, *, affine: bool = True, bias: bool = True) -> nn.Module:
    """Linear(width + 2, width) -> LayerNorm(width) -> Linear(width, 3), the norm's gain and shift
    drawn away from their initial values."""
    torch.manual_seed(seed)
    norm = nn.LayerNorm(width, elementwise_affine=affine, bias=bias)
    model = nn.Sequential(nn.Linear(width + 2, width), norm, nn.Linear(width, 3)).double()
    with torch.no_grad():
        if affine:
            norm.weight.uniform_(0.5, 2.0).mul_(torch.sign(torch.randn(width)).double())
        if affine and bias:
            norm.bias.normal_()
    return model


@given(seed=st.integers(0, 2**16), width=st.integers(3, 12))
def test_the_only_room_after_a_layer_norm_is_its_mean_direction_and_it_moves_nothing(seed, width):
    model = after_layer_norm(seed, width)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(3 * (width + 1), width + 2, generator=generator, dtype=torch.float64)
    (head,) = check_coverage(model, inputs, null_space="exact")["2"].sites
    assert (head.null_dim, head.layer_norm_dim, head.room) == (1, 1, 0)
    assert head.rounding_dim == 0  # float64: nothing hides below its precision here

    # The direction [1 / gamma, -sum(beta / gamma)] changes the head's output for no input at all.
    gamma, beta = model[1].weight.detach(), model[1].bias.detach()
    direction = torch.cat([1 / gamma, -(beta / gamma).sum().reshape(1)])
    fresh = torch.randn(50, width + 2, generator=generator, dtype=torch.float64) * 10
    before = model(fresh)
    with torch.no_grad():
        step = torch.randn(3, 1, generator=generator, dtype=torch.float64) * direction
        model[2].weight += step[:, :-1]
        model[2].bias += step[:, -1]
    torch.testing.assert_close(model(fresh), before, rtol=1e-10, atol=1e-10)


def test_the_table_says_when_the_only_room_is_layer_norms_mean_direction():
    model = after_layer_norm(0, 6)
    inputs = torch.randn(40, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    table = check_coverage(model, inputs, null_space="exact")
    row = next(line for line in str(table).splitlines() if line.startswith("2 "))
    assert row.endswith("no real room: only LayerNorm's mean direction (moves nothing)")
    assert table.summary().endswith(
        "0 of 2 sites have room on this batch of 40 "
        "(1 more only LayerNorm's mean direction or rounding)"
    )
    site = table.to_dict()["modules"][-1]["sites"][0]
    assert (site["layer_norm_dim"], site["room"]) == (1, 0) and site["note"].startswith(
        "no real room"
    )
    # With more room than the mean direction (fewer samples than inputs), the rest is real room.
    few = check_coverage(model, inputs[:4], null_space="exact")["2"].sites[0]
    assert (few.null_dim, few.layer_norm_dim, few.room) == (7 - 4, 1, 7 - 4 - 1)
    assert "real room 2; the rest: LayerNorm's mean direction" in str(
        check_coverage(model, inputs[:4], null_space="exact")
    )


@pytest.mark.parametrize(("affine", "bias", "found"), [(False, False, 1), (True, False, 1)])
def test_the_mean_direction_of_a_layer_norm_without_gain_or_shift(affine, bias, found):
    model = after_layer_norm(1, 5, affine=affine, bias=bias)
    inputs = torch.randn(30, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (head,) = check_coverage(model, inputs, null_space="exact")["2"].sites
    assert (head.null_dim, head.layer_norm_dim, head.room) == (1, found, 0)


def test_a_head_without_bias_has_the_mean_direction_only_when_the_shift_is_zero():
    for bias, expected in ((True, 0), (False, 1)):
        model = after_layer_norm(2, 5, bias=bias)
        model[2] = nn.Linear(5, 3, bias=False).double()
        inputs = torch.randn(30, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        (head,) = check_coverage(model, inputs, null_space="exact")["2"].sites
        assert (head.null_dim, head.layer_norm_dim) == (expected, expected)


@given(seed=st.integers(0, 2**16), scale=st.floats(1e-12, 1e-8))
def test_room_that_exists_only_below_float32_precision_is_rounding(seed, scale):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 3))
    inputs = torch.randn(200, 8, generator=torch.Generator().manual_seed(seed))
    inputs[:, 0] *= scale  # the batch reaches into this input only far below float32 precision
    (site,) = check_coverage(model, inputs, null_space="exact")["0"].sites
    assert (site.null_dim, site.rounding_dim, site.room) == (1, 1, 0)
    # The same batch in float64 has no null direction at all; the energy rule's room is real.
    assert (
        check_coverage(model.double(), inputs.double(), null_space="exact")["0"].sites[0].null_dim
        == 0
    )
    (energy,) = check_coverage(model.float(), inputs, null_space="svd", tau=0.999)["0"].sites
    assert energy.null_dim >= 1 and energy.rounding_dim == 0 and energy.room == energy.null_dim


def test_the_table_says_when_the_only_room_is_rounding():
    model = nn.Sequential(nn.Linear(8, 3))
    inputs = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    inputs[:, 0] *= 1e-10
    text = str(check_coverage(model, inputs, null_space="exact"))
    assert "no real room: only 1 below the inputs' precision (rounding)" in text
    assert "(1 more only LayerNorm's mean direction or rounding)" in text


class Float32Only(nn.Module):
    """A module whose kernel runs in float32 only."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32:
            raise RuntimeError("this kernel runs in float32 only")
        return self.linear(x)


def test_a_model_that_cannot_run_in_float64_still_gets_its_table_with_a_warning():
    torch.manual_seed(0)
    model = Float32Only()
    inputs = torch.randn(4, 8)
    with pytest.warns(
        RuntimeWarning,
        match=r"could not run a float64 copy of Float32Only \(RuntimeError: this kernel runs in "
        r"float32 only\), so rounding is not told apart from room",
    ):
        table = check_coverage(model, inputs, null_space="exact")
    assert table["linear"].sites[0].null_dim == 9 - 4 and table["linear"].sites[0].rounding_dim == 0


# -- parametrized layers and projectors that name what a module lacks --------------------------


@pytest.mark.filterwarnings("ignore:teleport takes the full")  # weight norm: no forward-mode AD
@pytest.mark.parametrize(
    ("parametrization", "kind"), [(weight_norm, "_WeightNorm"), (orthogonal, "_Orthogonal")]
)
def test_a_parametrized_layer_stays_fixed_with_its_reason_and_the_rest_teleports(
    parametrization, kind
):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), parametrization(nn.Linear(8, 8)), nn.Tanh(), nn.Linear(8, 3)
    ).double()
    reason = (
        f"weight is parametrized by {kind} (torch.nn.utils.parametrize): a teleport step in weight "
        "space cannot be mapped through it"
    )
    fixed = [name for name, _ in model.named_parameters() if name.startswith("2.")]
    assert "2.bias" in fixed and any(".parametrizations.weight.original" in name for name in fixed)
    generator = torch.Generator().manual_seed(0)
    inputs, targets = (
        torch.randn(4, 6, generator=generator, dtype=torch.float64),
        torch.tensor([0, 1, 2, 0]),
    )
    table = check_coverage(model, inputs)
    assert table["2"].status == "frozen" and table["2"].frozen == dict.fromkeys(fixed, reason)
    assert table["4"].status == "covered"
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = Teleporter(model, F.cross_entropy, uncovered="error").teleport(inputs, targets)
    assert {name: report.frozen[name] for name in fixed} == dict.fromkeys(fixed, reason)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], before[name]) for name in fixed)
    assert not torch.equal(params["4.weight"], before["4.weight"]), report.summary()


def test_a_parametrized_norm_is_kept_fixed_by_its_policy_with_the_parametrization_named():
    model = nn.Sequential(nn.Linear(4, 4), weight_norm(nn.LayerNorm(4)))
    coverage = assign_projectors(model, build_registry())
    assert coverage.frozen["1.bias"] == NormalizationPolicy.reason
    for original in ("original0", "original1"):
        name = f"1.parametrizations.weight.{original}"
        assert coverage.frozen[name].startswith("weight is parametrized by _WeightNorm")
        assert coverage.owners[name] == "1"


def test_the_tensors_of_a_parametrized_module_without_a_projector_belong_to_it():
    model = nn.Sequential(nn.Linear(4, 4), weight_norm(Gain(4), name="gain"))
    coverage = assign_projectors(model, build_registry())
    assert coverage.owners["1.parametrizations.gain.original0"] == "1"
    assert coverage.frozen["1.parametrizations.gain.original1"] == UNCOVERED_REASON


class BiasAlways(LinearProjector):
    """A projector that names a bias whether or not the layer has one."""

    def sites(self, module: nn.Linear):
        return [Site("weight", "input", "weight", "bias")]


class FreezesAGhost(LinearProjector):
    def frozen(self, module: nn.Linear) -> dict[str, str]:
        return {"scale": "a tensor this layer never had"}


@pytest.mark.parametrize("nested", [True, False])
def test_a_site_naming_a_missing_bias_names_projector_module_site_and_parameter(nested):
    registry = build_registry()
    registry.add_projector(nn.Linear, BiasAlways)
    layer = nn.Linear(3, 3, bias=False)
    model = nn.Sequential(nn.Tanh(), layer) if nested else layer
    where = "module '1'" if nested else "the model itself"
    message = (
        f"BiasAlways names parameter 'bias' as the bias of site 'weight' of {where} (Linear), "
        "but it is None (the module was built without it); a site names only parameters its "
        "module has (bias=None for a module without a bias)"
    )
    with pytest.raises(ProjectorSiteError) as raised:
        check_coverage(model, torch.randn(2, 3), registry=registry)
    assert str(raised.value) == message
    with pytest.raises(ProjectorSiteError, match="as the bias of site 'weight'"):
        Teleporter(model, F.cross_entropy, registry=registry)


def test_a_frozen_parameter_the_module_lacks_is_named_too():
    registry = build_registry()
    registry.add_projector(nn.Linear, FreezesAGhost)
    with pytest.raises(ProjectorSiteError) as raised:
        assign_projectors(nn.Sequential(nn.Linear(3, 3)), registry)
    assert str(raised.value).startswith(
        "FreezesAGhost names parameter 'scale' as a frozen parameter of module '0' (Linear), "
        "but the module has no such attribute;"
    )


# -- what a teleport says about the parameters no projector covers ----------------------------


def gains(count: int, width: int = 4) -> list[nn.Module]:
    return [Gain(width) for _ in range(count)]


def test_nothing_to_move_names_the_uncovered_types_apart_from_the_frozen_ones():
    model = nn.Sequential(nn.Embedding(5, 4), *gains(12), nn.LayerNorm(4))
    with pytest.raises(ValueError) as raised:
        Teleporter(model, F.cross_entropy, uncovered="freeze")
    message = str(raised.value)
    assert message.startswith("no parameter of Sequential can be teleported (27 trainable: ")
    assert (
        "No projector for the module types Gain x12 (1.gain, 1.shift, 2.gain, ... (24 in all))"
        in message
    )
    assert f"Kept fixed: Embedding x1 (0.weight), reason: {EmbeddingPolicy.reason}" in message
    assert f"LayerNorm x1 (13.weight, 13.bias), reason: {NormalizationPolicy.reason}" in message
    assert message.index("No projector") < message.index("Kept fixed")
    assert "Embedding" not in message[message.index("No projector") : message.index("Kept fixed")]
    assert "registry.add_projector(ModuleType, ProjectorClass)" in message
    assert "teleport_register_projectors" in message and "docs/plugins.md" in message
    assert "7.gain" not in message  # counted, not listed


def test_a_model_without_trainable_parameters_says_so():
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(
        ValueError, match="no parameter of Linear can be teleported: it has no trainable parameters"
    ):
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
    uncovered = [
        name for name, reason in report.frozen.items() if reason == "no projector for its module"
    ]
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
