"""Plugin registry (entry points, overrides, misspelt hooks, lookup) and the coverage policy."""

from __future__ import annotations

import importlib.metadata
import sys
import types
import warnings
from dataclasses import dataclass

import pluggy
import pytest
import torch
from torch import nn

from torch_teleport import Registry, Teleporter, UnknownPluginError, build_registry, hookimpl
from torch_teleport.coverage import UncoveredParametersError
from torch_teleport.hookspecs import ENTRY_POINT_GROUP
from torch_teleport.objectives.grad_norm import GradNorm
from torch_teleport.projectors.linear import LinearProjector
from torch_teleport.registry import BUILTIN_ORIGIN, KINDS, build_plugin_manager
from torch_teleport.testing import assert_teleport_invariant

# -- fake installed distributions, as pluggy's own tests make them ---------------------------


@dataclass
class FakeEntryPoint:
    name: str
    group: str
    plugin: object

    def load(self) -> object:
        return self.plugin


class FakeDistribution:
    def __init__(self, name: str, version: str, plugin: object, entry_point: str | None = None) -> None:
        self.metadata = {"name": name}
        self.version = version
        self.entry_points = [FakeEntryPoint(entry_point or name.replace("-", "_"), ENTRY_POINT_GROUP, plugin)]


@pytest.fixture
def install(monkeypatch):
    """``install(name, version, plugin[, entry_point])`` makes ``plugin`` look installed through an
    entry point (named after the distribution unless ``entry_point`` names it)."""
    fakes: list[FakeDistribution] = []
    real = importlib.metadata.distributions
    monkeypatch.setattr(
        importlib.metadata, "distributions", lambda **kwargs: [*real(**kwargs), *fakes]
    )
    return lambda *args: fakes.append(FakeDistribution(*args))


def plugin_module(name: str, **hooks) -> types.ModuleType:
    """A plugin module whose attributes are the given hook implementations."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


class RecordingLinearProjector(LinearProjector):
    """The linear projector, counting the representations it builds."""

    built = 0

    def representation(self, module, site, captured):
        type(self).built += 1
        return super().representation(module, site, captured)


class DescendingGradNorm(GradNorm):
    default_direction = "descend"


def mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).to(dtype)


def batch(dtype=torch.float64, size=5):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 6, generator=generator, dtype=dtype), torch.randint(
        0, 3, (size,), generator=generator
    )


# -- entry points --------------------------------------------------------------------------


def test_entry_point_plugin_replaces_and_extends_builtins(install):
    plugin = plugin_module(
        "fake_teleport_plugin",
        teleport_register_projectors=lambda registry: registry.add_projector(
            nn.Linear, RecordingLinearProjector
        ),
        teleport_register_objectives=lambda registry: registry.add_objective(
            "descending_grad_norm", DescendingGradNorm
        ),
    )
    install("fake-teleport-plugin", "1.2.3", plugin)
    registry = build_registry(build_plugin_manager())

    assert registry.projector_for(nn.Linear(2, 2)) is RecordingLinearProjector  # replaced
    assert registry.get("objective", "descending_grad_norm") is DescendingGradNorm  # extended
    assert registry.get("objective", "grad_norm") is GradNorm  # the rest stays
    origins = {(entry.kind, entry.name): entry.origin for entry in registry.entries()}
    assert origins[("projector", "torch.nn.modules.linear.Linear")] == "fake-teleport-plugin 1.2.3"
    assert origins[("objective", "descending_grad_norm")] == "fake-teleport-plugin 1.2.3"
    assert origins[("objective", "grad_norm")] == BUILTIN_ORIGIN

    RecordingLinearProjector.built = 0
    model, (inputs, targets) = mlp(), batch()
    report = assert_teleport_invariant(
        model, nn.functional.cross_entropy, inputs, targets, registry=registry
    )
    assert RecordingLinearProjector.built >= 3 and report.steps > 0
    descending = Teleporter(
        model, nn.functional.cross_entropy, objective="descending_grad_norm", registry=registry
    )
    report = descending.teleport(inputs, targets)
    assert report.grad_norm_after < report.grad_norm_before


def test_a_third_party_entry_wins_over_a_builtin_that_loads_after_it(install):
    """An entry point of no kind loads with the first lookup, before the lab's models: the built-in
    model registered later still leaves the third party's in place."""

    def factory(**options):
        return nn.Linear(2, 2)

    plugin = plugin_module("fake_zoo", teleport_register_models=lambda registry: registry.add_model("mlp", factory))
    install("fake-zoo", "0.1", plugin)
    registry = build_registry()
    assert registry.get("method", "null_space") is not None
    assert registry.get("model", "mlp") is factory
    assert "cnn" in registry.names("model")
    origins = {(entry.kind, entry.name): entry.origin for entry in registry.entries()}
    assert origins[("model", "mlp")] == "fake-zoo 0.1"
    assert origins[("model", "cnn")] == BUILTIN_ORIGIN


def test_an_entry_point_named_for_a_kind_loads_with_that_kind(install):
    """``"objective:..."`` loads on the first objective lookup, and then its other hooks run too."""
    plugin = plugin_module(
        "fake_objectives",
        teleport_register_objectives=lambda registry: registry.add_objective("fake", DescendingGradNorm),
        teleport_register_methods=lambda registry: registry.add_method("fake", object),
    )
    install("fake-objectives", "0.1", plugin, "objective:fake")
    registry = build_registry()
    assert "fake" not in registry.names("method")
    assert registry.get("objective", "fake") is DescendingGradNorm
    assert "fake" in registry.names("method")


def test_misspelt_hook_fails_when_the_registry_is_built(install):
    typo = plugin_module("typo_plugin", teleport_register_projector=lambda registry: None)
    install("typo-plugin", "0.1", typo)
    with pytest.raises(
        pluggy.PluginValidationError, match="unknown hook 'teleport_register_projector'"
    ):
        build_plugin_manager()


def test_misspelt_hook_in_a_builtin_list_fails_too(monkeypatch):
    typo = plugin_module("typo_builtin", teleport_register_nullspaces=lambda registry: None)
    monkeypatch.setitem(sys.modules, "typo_builtin", typo)
    with pytest.raises(pluggy.PluginValidationError, match="teleport_register_nullspaces"):
        build_plugin_manager(("typo_builtin",), entry_points=False)


def test_later_registration_replaces_a_name():
    registry = Registry()
    registry.add_objective("grad_norm", GradNorm)
    registry.add_objective("grad_norm", DescendingGradNorm)
    assert registry.get("objective", "grad_norm") is DescendingGradNorm
    assert registry.names("objective") == ["grad_norm"]


@pytest.mark.parametrize(
    "kind", ["method", "projector", "objective", "null_space", "schedule", "model", "dataset"]
)
def test_unknown_names_list_the_registered_ones(kind):
    registry = build_registry(build_plugin_manager(entry_points=False))
    known = registry.names(kind)
    assert known, f"no built-in {kind}"
    with pytest.raises(UnknownPluginError) as raised:
        registry.get(kind, "no-such-plugin")
    message = str(raised.value)
    assert message.startswith(f"unknown {kind.replace('_', ' ')} 'no-such-plugin'; registered: ")
    assert all(name in message for name in known)
    assert isinstance(raised.value, KeyError)


def test_every_kind_has_a_registration_hook():
    registry = Registry()
    for kind in KINDS:
        getattr(registry, f"add_{kind}")("x", object)
        assert registry.names(kind) == ["x"]


# -- lookup by module type -------------------------------------------------------------------


class MyLinear(nn.Linear):
    """A user's subclass: found through the MRO."""


def test_subclasses_of_linear_are_covered():
    registry = build_registry(build_plugin_manager(entry_points=False))
    assert registry.projector_for(MyLinear(2, 2)) is LinearProjector
    torch.manual_seed(0)
    model = nn.Sequential(
        MyLinear(6, 16), nn.Tanh(), MyLinear(16, 16), nn.Tanh(), MyLinear(16, 3)
    ).double()
    inputs, targets = batch()
    report = assert_teleport_invariant(
        model, nn.functional.cross_entropy, inputs, targets, registry=registry
    )
    assert [layer.name for layer in report.layers] == ["0.weight", "2.weight", "4.weight"]


def test_string_keys_match_without_importing():
    widget = type("Widget", (nn.Linear,), {"__module__": "fake_layers_pkg.blocks.widget"})
    elsewhere = type("Widget", (nn.Module,), {"__module__": "fake_layers_pkgs.widget"})
    registry = Registry()
    registry.add_projector("fake_layers_pkg.Widget", RecordingLinearProjector)
    assert registry.projector_for(widget(2, 2)) is RecordingLinearProjector
    assert registry.projector_for(elsewhere()) is None
    assert "fake_layers_pkg" not in sys.modules

    for key in ("fake_layers_pkg.blocks.Widget", "fake_layers_pkg.blocks.widget.Widget"):
        registry = Registry()
        registry.add_projector(key, RecordingLinearProjector)
        assert registry.projector_for(widget(2, 2)) is RecordingLinearProjector, key
    registry = Registry()
    registry.add_projector("torch.nn.Linear", RecordingLinearProjector)
    assert registry.projector_for(nn.Linear(2, 2)) is RecordingLinearProjector


def test_closest_class_in_the_mro_wins():
    registry = Registry()
    registry.add_projector(nn.Linear, LinearProjector)
    registry.add_projector(MyLinear, RecordingLinearProjector)
    assert registry.projector_for(MyLinear(2, 2)) is RecordingLinearProjector
    assert registry.projector_for(nn.Linear(2, 2)) is LinearProjector
    with pytest.raises(TypeError, match="nn.Module subclass or a dotted string"):
        registry.add_projector(int, LinearProjector)


# -- coverage: parameters no projector moves -------------------------------------------------


class Scale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))

    def forward(self, x):
        return x * self.scale


def prelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.PReLU(16), nn.Linear(16, 3)).double()


def scale_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), Scale(16), nn.Linear(16, 3)).double()


UNCOVERED = {"prelu": (prelu_mlp, ["1.weight"]), "bare_parameter": (scale_mlp, ["2.scale"])}
"""Models with a module no registered projector claims, and its parameters."""


@pytest.mark.parametrize("case", sorted(UNCOVERED))
def test_uncovered_parameters_under_error(case):
    build, uncovered = UNCOVERED[case]
    with pytest.raises(
        UncoveredParametersError,
        match="no projector covers these parameters: " + ", ".join(uncovered),
    ):
        Teleporter(build(), nn.functional.cross_entropy, uncovered="error")


@pytest.mark.parametrize("case", sorted(UNCOVERED))
def test_uncovered_parameters_under_warn(case):
    build, uncovered = UNCOVERED[case]
    model = build()
    with pytest.warns(UserWarning, match="leaves these parameters fixed.*" + ", ".join(uncovered)):
        teleporter = Teleporter(model, nn.functional.cross_entropy, null_space="exact", uncovered="warn")
    before = {name: model.get_parameter(name).detach().clone() for name in uncovered}
    report = teleporter.teleport(*batch())
    assert {name: report.frozen[name] for name in uncovered} == dict.fromkeys(
        uncovered, "no projector for its module"
    )
    assert all(torch.equal(model.get_parameter(name), before[name]) for name in uncovered)
    assert report.steps > 0 and report.loss_change <= 1e-10


@pytest.mark.parametrize("case", sorted(UNCOVERED))
def test_uncovered_parameters_under_freeze(case):
    build, uncovered = UNCOVERED[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = Teleporter(build(), nn.functional.cross_entropy, uncovered="freeze").teleport(
            *batch()
        )
    assert {name: report.frozen[name] for name in uncovered} == dict.fromkeys(
        uncovered, "no projector for its module"
    )


class EmbeddingMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4, dtype=torch.float64)
        self.norm = nn.LayerNorm(12, dtype=torch.float64)
        self.head = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).double()

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens).flatten(1)))


def test_every_trainable_parameter_is_moved_or_listed():
    """Layers claimed by a freezing policy are no error: they are listed, with the policy's reason."""
    model = EmbeddingMLP()
    tokens = torch.randint(0, 10, (5, 3), generator=torch.Generator().manual_seed(0))
    teleporter = Teleporter(model, nn.functional.cross_entropy, null_space="exact", uncovered="error")
    report = teleporter.teleport(tokens, torch.arange(5) % 3)
    movable = set(teleporter.method.coverage.movable())
    assert set(report.frozen) == {"embed.weight", "norm.weight", "norm.bias"}
    assert all(report.frozen.values())
    assert movable | set(report.frozen) == {name for name, _ in model.named_parameters()}
    assert report.loss_change <= 1e-10 and report.steps > 0


def test_unknown_coverage_policy():
    with pytest.raises(ValueError, match="policy must be one of"):
        Teleporter(mlp(), nn.functional.cross_entropy, uncovered="ignore")


class SharedMLP(nn.Module):
    """One hidden layer applied twice, and a second layer tied to the first."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 16)
        self.hidden = nn.Linear(16, 16)
        self.tied = nn.Linear(16, 16)
        self.tied.weight = self.hidden.weight
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        x = torch.tanh(self.hidden(x))
        x = torch.tanh(self.hidden(x))
        return self.out(torch.tanh(self.tied(x)))


def test_shared_parameters_are_frozen_and_the_loss_stays_put():
    model = SharedMLP().double()
    inputs, targets = batch()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = Teleporter(model, nn.functional.cross_entropy, null_space="exact", uncovered="error").teleport(
        inputs, targets
    )
    # the biases sit in the same sites as the shared weight, so they stay too
    assert report.frozen == dict.fromkeys(
        ["hidden.weight", "hidden.bias", "tied.bias"], "shared between modules"
    )
    for name in report.frozen:
        assert torch.equal(model.get_parameter(name), before[name]), name
    assert not torch.equal(model.out.weight, before["out.weight"])
    assert report.loss_change <= 1e-10
    assert_teleport_invariant(
        model, nn.functional.cross_entropy, inputs, targets, uncovered="error"
    )


def test_site_with_a_frozen_parameter_stays_fixed_and_says_why():
    model = mlp()
    model[0].bias.requires_grad_(False)
    model[4].requires_grad_(False)
    report = Teleporter(model, nn.functional.cross_entropy, uncovered="error").teleport(*batch())
    assert report.frozen == {"0.weight": "its site has a parameter with requires_grad=False"}
    assert [layer.name for layer in report.layers] == ["2.weight"]


def test_a_linear_listed_twice_is_frozen():
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(16, 3)
    ).double()
    inputs, targets = batch()
    parameters = dict(shared.named_parameters())
    report = Teleporter(model, nn.functional.cross_entropy, null_space="exact", uncovered="error").teleport(
        inputs, targets
    )
    assert report.frozen == dict.fromkeys(["2.weight", "2.bias"], "shared between modules")
    # the frozen layer keeps its own Parameter objects (an optimizer holding them still trains it)
    assert all(getattr(shared, name) is parameter for name, parameter in parameters.items())
    assert report.steps > 0 and report.loss_change <= 1e-10


class Reused(nn.Module):
    """One layer called twice: its representation holds the inputs of both calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.hidden, self.out = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))))


def test_a_layer_called_twice_moves_in_the_null_space_of_both_inputs():
    model = Reused().double()
    inputs, targets = batch()
    hidden = model.hidden.weight.detach().clone()
    report = assert_teleport_invariant(
        model, nn.functional.cross_entropy, inputs, targets, uncovered="error"
    )
    layer = next(layer for layer in report.layers if layer.name == "hidden.weight")
    assert layer.samples == 2 * len(inputs) and layer.null_dim == 17 - 2 * len(inputs)
    report = Teleporter(model, nn.functional.cross_entropy, null_space="exact").teleport(inputs, targets)
    assert not torch.equal(model.hidden.weight, hidden) and report.loss_change <= 1e-10
