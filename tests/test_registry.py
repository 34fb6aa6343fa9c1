"""Plugin registry (entry points, precedence, the lab's hooks, misspelt hooks, lookup) and the
coverage policy."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pluggy
import pytest
import torch
from torch import nn

from torch_teleport import Registry, Teleporter, UnknownPluginError, build_registry, hookimpl
from torch_teleport import hookspecs as core_hookspecs
from torch_teleport import registry as registry_module
from torch_teleport.coverage import UncoveredParametersError
from torch_teleport.hookspecs import ENTRY_POINT_GROUP, Registrar
from torch_teleport.lab import hookspecs as lab_hookspecs
from torch_teleport.objectives.grad_norm import GradNorm
from torch_teleport.plugin_manager import (
    BUILTIN_ORIGIN,
    CORE_KINDS,
    PluginManager,
    build_plugin_manager,
    hook_name,
)
from torch_teleport.projectors.linear import LinearProjector
from torch_teleport.registry import BY_HAND_ORIGIN, Precedence
from torch_teleport.testing import assert_teleport_invariant

LAB_KINDS = ("model", "dataset", "experiment")

# -- fake installed distributions, as pluggy's own tests make them ---------------------------


@dataclass
class FakeEntryPoint:
    name: str
    group: str
    plugin: object

    def load(self) -> object:
        return self.plugin


class FakeDistribution:
    def __init__(
        self, name: str, version: str, plugin: object, entry_point: str | None = None
    ) -> None:
        self.metadata = {"name": name}
        self.version = version
        self.entry_points = [
            FakeEntryPoint(entry_point or name.replace("-", "_"), ENTRY_POINT_GROUP, plugin)
        ]


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
    for attribute, function in hooks.items():
        setattr(module, attribute, hookimpl(function))
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


def test_entry_points_load_through_pluggys_loader_with_their_distribution(install):
    """pluggy keeps each plugin it loaded with its distribution; ours count as built-ins."""
    plugin = plugin_module(
        "fake_objectives",
        teleport_register_objectives=lambda registry: registry.add_objective(
            "fake", DescendingGradNorm
        ),
    )
    install("fake-objectives", "0.3", plugin)
    manager = build_plugin_manager()
    loaded = {manager.get_name(plugin): dist for plugin, dist in manager.list_plugin_distinfo()}
    assert (loaded["fake_objectives"].project_name, loaded["fake_objectives"].version) == (
        "fake-objectives",
        "0.3",
    )
    assert loaded["model:feedforward"].project_name == "torch-teleport"
    assert manager.origin("fake_objectives") == "fake-objectives 0.3"
    assert not manager.is_builtin("fake_objectives")
    assert manager.is_builtin("model:feedforward")
    assert manager.origin("model:feedforward") == BUILTIN_ORIGIN


def test_a_third_party_entry_wins_over_a_builtin_that_loads_after_it(install):
    """An entry point of no kind loads with the first lookup, before the lab's models: the built-in
    model registered later still leaves the third party's in place."""

    def factory(**options):
        return nn.Linear(2, 2)

    plugin = plugin_module(
        "fake_zoo", teleport_register_models=lambda registry: registry.add_model("mlp", factory)
    )
    install("fake-zoo", "0.1", plugin)
    registry = build_registry()
    assert registry.get("method", "null_space") is not None
    assert registry.get("model", "mlp") is factory
    assert "cnn" in registry.names("model")
    origins = {(entry.kind, entry.name): entry.origin for entry in registry.entries()}
    assert origins[("model", "mlp")] == "fake-zoo 0.1"
    assert origins[("model", "cnn")] == BUILTIN_ORIGIN


def test_a_third_party_string_key_wins_over_a_builtin_type():
    """A distribution naming ``"torch.nn.Linear"`` replaces the built-in registered by the class."""
    manager = build_plugin_manager(entry_points=False)
    manager.register(
        plugin_module(
            "linear_by_name",
            teleport_register_projectors=lambda registry: registry.add_projector(
                "torch.nn.Linear", RecordingLinearProjector
            ),
        )
    )
    registry = build_registry(manager)
    assert registry.projector_for(nn.Linear(2, 2)) is RecordingLinearProjector
    origins = {(entry.kind, entry.name): entry.origin for entry in registry.entries()}
    assert origins[("projector", "torch.nn.Linear")] == "linear_by_name (registered by hand)"


def test_an_entry_point_named_for_a_kind_loads_with_that_kind(install):
    """``"objective:..."`` loads on the first objective lookup, and then its other hooks run too."""
    plugin = plugin_module(
        "fake_objectives",
        teleport_register_objectives=lambda registry: registry.add_objective(
            "fake", DescendingGradNorm
        ),
        teleport_register_methods=lambda registry: registry.add_method("fake", object),
    )
    install("fake-objectives", "0.1", plugin, "objective:fake")
    manager = PluginManager()
    registry = build_registry(manager)
    assert "fake" not in registry.names("method")
    assert not manager.has_plugin("objective:fake")
    assert registry.get("objective", "fake") is DescendingGradNorm
    assert "fake" in registry.names("method")


@pytest.mark.parametrize("misspelt", ["teleport_register_projector", "teleport_register_model"])
def test_misspelt_hook_fails_when_the_registry_is_built(install, misspelt):
    typo = plugin_module("typo_plugin", **{misspelt: lambda registry: None})
    install("typo-plugin", "0.1", typo)
    with pytest.raises(pluggy.PluginValidationError, match=f"unknown hook '{misspelt}'"):
        build_plugin_manager()


def test_misspelt_hook_in_a_builtin_list_fails_too(monkeypatch):
    typo = plugin_module("typo_builtin", teleport_register_nullspaces=lambda registry: None)
    monkeypatch.setitem(sys.modules, "typo_builtin", typo)
    with pytest.raises(pluggy.PluginValidationError, match="teleport_register_nullspaces"):
        build_plugin_manager(("typo_builtin",), entry_points=False)


# -- precedence: a registration by hand wins over every hook ----------------------------------


class ByHand:
    """What a user registers on the registry by hand."""


class Rival:
    """What another distribution registers under the built-ins' names."""


BUILTIN_NAMES = {
    "method": "null_space",
    "objective": "grad_norm",
    "null_space": "exact",
    "schedule": "every",
    "model": "mlp",
    "dataset": "digits",
    "experiment": "train",
}
"""A name this distribution registers, for every kind but projectors (keyed by module type)."""

Conv1D = type("Conv1D", (nn.Module,), {"__module__": "transformers.pytorch_utils"})
"""A class found by the built-in string key ``"transformers.pytorch_utils.Conv1D"``."""


def rival_plugin() -> types.ModuleType:
    """Registers every name of :data:`BUILTIN_NAMES`, ``nn.Linear`` and Conv1D once more."""

    def projectors(registry):
        registry.add_projector(nn.Linear, Rival)
        registry.add_projector("transformers.pytorch_utils.Conv1D", Rival)

    def register(kind, name):
        return lambda registry: getattr(registry, f"add_{kind}")(name, Rival)

    hooks = {hook_name(kind): register(kind, name) for kind, name in BUILTIN_NAMES.items()}
    return plugin_module("rival", teleport_register_projectors=projectors, **hooks)


@pytest.mark.parametrize("lookup_first", [False, True], ids=["before", "after-lookup"])
@pytest.mark.parametrize("kind", sorted(BUILTIN_NAMES))
def test_a_registration_by_hand_wins_over_every_hook(install, kind, lookup_first):
    install("rival-plugins", "2.0", rival_plugin())
    registry = build_registry()
    name = BUILTIN_NAMES[kind]
    if lookup_first:  # the hooks have run: the other distribution's entry won over the built-in
        assert registry.get(kind, name) is Rival
    getattr(registry, f"add_{kind}")(name, ByHand)
    assert registry.get(kind, name) is ByHand
    (entry,) = [e for e in registry.entries() if (e.kind, e.name) == (kind, name)]
    assert (entry.target, entry.origin, entry.precedence) == (
        ByHand,
        BY_HAND_ORIGIN,
        Precedence.EXPLICIT,
    )


PROJECTOR_KEYS = {
    "by-type": (nn.Linear, lambda: nn.Linear(2, 2)),
    "by-full-name": ("torch.nn.modules.linear.Linear", lambda: nn.Linear(2, 2)),
    "by-package": ("torch.nn.Linear", lambda: nn.Linear(2, 2)),
    "string-builtin": ("transformers.pytorch_utils.Conv1D", Conv1D),
}
"""Keys registered by hand, each with a module the hooks' entries also claim."""


@pytest.mark.parametrize("lookup_first", [False, True], ids=["before", "after-lookup"])
@pytest.mark.parametrize("case", sorted(PROJECTOR_KEYS))
def test_a_projector_registered_by_hand_wins_over_every_hook(install, case, lookup_first):
    key, build = PROJECTOR_KEYS[case]
    install("rival-plugins", "2.0", rival_plugin())
    registry = build_registry()
    if lookup_first:
        assert registry.projector_for(build()) is Rival
    registry.add_projector(key, ByHand)
    assert registry.projector_for(build()) is ByHand
    assert list(registry.entries())  # loading every other kind runs no hook over it
    assert registry.projector_for(build()) is ByHand


class MyLayer(nn.Module):
    pass


def test_a_registration_by_hand_wins_over_a_plugin_registered_by_hand():
    """``reg.add_projector(MyLayer, Other)`` on a registry whose manager has a hook for MyLayer."""
    manager = build_plugin_manager(entry_points=False)
    manager.register(
        plugin_module(
            "my_layer_plugin",
            teleport_register_projectors=lambda registry: registry.add_projector(MyLayer, Rival),
        )
    )
    registry = build_registry(manager)
    registry.add_projector(MyLayer, ByHand)
    assert registry.projector_for(MyLayer()) is ByHand
    assert (
        build_registry(manager).projector_for(MyLayer()) is Rival
    )  # the hook, where nothing was added


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


# -- the lab's hooks -----------------------------------------------------------------------


def hooks_of(module: types.ModuleType) -> set[str]:
    return {name for name in dir(module) if name.startswith("teleport_register_")}


def test_the_library_declares_its_kinds_and_the_lab_its_own():
    assert hooks_of(core_hookspecs) == {hook_name(kind) for kind in CORE_KINDS}
    assert hooks_of(lab_hookspecs) == {hook_name(kind) for kind in LAB_KINDS}
    assert set(PluginManager(entry_points=False).kinds) == {*CORE_KINDS, *LAB_KINDS}


def test_the_lab_kinds_come_from_this_distributions_metadata(monkeypatch):
    """Without the distribution's entry points the core knows its own kinds only."""
    monkeypatch.setattr(importlib.metadata, "distributions", lambda **kwargs: [])
    manager = build_plugin_manager()
    assert manager.kinds == CORE_KINDS
    assert not hasattr(manager.hook, hook_name("model"))
    with pytest.raises(UnknownPluginError, match="unknown model 'mlp'; registered: none"):
        build_registry(manager).get("model", "mlp")


def test_the_lab_hooks_are_declared_on_the_first_lookup_of_a_lab_kind():
    manager = PluginManager(entry_points=False)
    registry = build_registry(manager)
    assert registry.names("method")
    assert not hasattr(manager.hook, hook_name("model"))
    assert "mlp" in registry.names("model")
    assert all(manager.registration_hook(kind).has_spec() for kind in LAB_KINDS)


def test_a_plugin_implementing_a_lab_hook_declares_the_lab_hooks():
    manager = PluginManager(entry_points=False)
    manager.register(
        plugin_module(
            "zoo", teleport_register_datasets=lambda registry: registry.add_dataset("x", Rival)
        )
    )
    manager.check_pending()  # would name an unknown hook
    assert manager.registration_hook("dataset").has_spec()
    assert build_registry(manager).get("dataset", "x") is Rival


@pytest.mark.parametrize(
    "registrar", [Registrar, lab_hookspecs.LabRegistrar], ids=lambda p: p.__name__
)
def test_the_registry_is_what_the_hookspecs_describe(registrar):
    methods = [name for name in vars(registrar) if name.startswith("add_")]
    assert methods
    for name in methods:
        assert inspect.signature(getattr(Registry, name)) == inspect.signature(
            getattr(registrar, name)
        )


def test_every_kind_has_a_registration_method():
    registry = Registry()
    for kind in PluginManager(entry_points=False).kinds:
        getattr(registry, f"add_{kind}")("x", object)
        assert registry.names(kind) == ["x"]


def imported_modules(module: types.ModuleType) -> set[str]:
    """What the import statements of ``module`` name (``.x`` when relative), under
    ``TYPE_CHECKING`` too."""
    names = set()
    for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            prefix = "." * node.level + (f"{node.module}." if node.module else "")
            names |= {prefix + alias.name for alias in node.names}
    return names


def test_the_hookspecs_and_the_registry_do_not_import_each_other():
    """The hookspecs import nothing of the library; the registry reaches them only through the
    plugin manager."""
    hookspecs_imports = imported_modules(core_hookspecs)
    assert "pluggy" in hookspecs_imports
    assert not [name for name in hookspecs_imports if name.startswith((".", "torch_teleport"))]
    registry_imports = imported_modules(registry_module)
    assert ".plugin_manager.PluginManager" in registry_imports
    assert not [name for name in registry_imports if "hookspecs" in name]


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
        teleporter = Teleporter(
            model, nn.functional.cross_entropy, null_space="exact", uncovered="warn"
        )
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
    """Layers a freezing policy claims are no error: they are listed with the policy's reason."""
    model = EmbeddingMLP()
    tokens = torch.randint(0, 10, (5, 3), generator=torch.Generator().manual_seed(0))
    teleporter = Teleporter(
        model, nn.functional.cross_entropy, null_space="exact", uncovered="error"
    )
    report = teleporter.teleport(tokens, torch.arange(5) % 3)
    movable = set(teleporter.mover.coverage.movable())
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
    report = Teleporter(
        model, nn.functional.cross_entropy, null_space="exact", uncovered="error"
    ).teleport(inputs, targets)
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
    report = Teleporter(
        model, nn.functional.cross_entropy, null_space="exact", uncovered="error"
    ).teleport(inputs, targets)
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
    report = Teleporter(model, nn.functional.cross_entropy, null_space="exact").teleport(
        inputs, targets
    )
    assert not torch.equal(model.hidden.weight, hidden) and report.loss_change <= 1e-10
