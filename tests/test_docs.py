"""The docs stay true: every hook and public name is documented, and the examples run.

The first part of this file is the example of ``docs/testing.md``, verbatim (a test below checks
that it still is), so pytest runs it as a plugin author would.
"""

# ruff: noqa: E402  (the verbatim example, with its own imports, comes first)

import functools
import sys

import torch
from hypothesis import given
from torch import nn

import torch_teleport as tt
from torch_teleport.plugin_manager import build_plugin_manager
from torch_teleport.projector import append_ones, first_input_hook
from torch_teleport.testing import assert_teleport_invariant, mlp_problems


class Affine(nn.Module):
    """A home-made dense layer, y = x W^T + b: the layer under test."""

    def __init__(self, inputs: int, outputs: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, inputs))
        self.register_parameter("bias", nn.Parameter(torch.empty(outputs)) if bias else None)

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class AffineProjector(tt.Projector):
    def sites(self, module):
        bias = "bias" if module.bias is not None else None
        return [tt.Site("affine", stream="x", weight="weight", bias=bias)]

    def capture(self, module, record):
        return [module.register_forward_pre_hook(first_input_hook("x", record))]

    def representation(self, module, site, captured):
        samples = torch.cat([x.reshape(-1, module.weight.shape[1]) for x in captured])
        if site.bias is not None:
            samples = append_ones(samples)
        return samples.T.unsqueeze(0)  # (groups, inputs, samples)


@tt.hookimpl
def teleport_register_projectors(registry):
    registry.add_projector(Affine, AffineProjector)


@functools.cache
def registry_with_affine():
    """The installed plugins plus this module's hook (before it ships with an entry point)."""
    manager = build_plugin_manager()
    manager.register(sys.modules[__name__])
    return tt.build_registry(manager)


def with_affine_layers(model: nn.Sequential) -> nn.Sequential:
    """The drawn MLP with every nn.Linear replaced by an Affine holding the same weights."""
    layers = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            affine = Affine(layer.in_features, layer.out_features, layer.bias is not None)
            affine = affine.to(layer.weight.dtype)
            affine.load_state_dict(layer.state_dict())
            layer = affine
        layers.append(layer)
    return nn.Sequential(*layers)


@given(mlp_problems())
def test_affine_projector_keeps_the_batch_loss_invariant(problem):
    model = with_affine_layers(problem.model)
    report = assert_teleport_invariant(
        model,
        problem.loss_fn,
        problem.inputs,
        problem.targets,
        registry=registry_with_affine(),
        uncovered="error",
        null_space="exact",
        steps=8,
    )
    assert [layer.name for layer in report.layers] == [
        f"{name}.affine" for name, module in model.named_modules() if isinstance(module, Affine)
    ]


# -- the project's checks of its docs --------------------------------------------------------

import inspect
import re
import types
from pathlib import Path

import pytest
from hypothesis import strategies as st

from torch_teleport import hookspecs
from torch_teleport.lab import hookspecs as lab_hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs"


def code_blocks(page: str, language: str) -> list[str]:
    """The fenced ``language`` code blocks of ``docs/<page>``."""
    return re.findall(rf"^```{language}\n(.*?)^```", (DOCS / page).read_text(), flags=re.S | re.M)


def hook_signature(hook) -> str:
    """``name(arg: Type) -> Return`` as written in the hookspec (annotations are strings there)."""
    signature = inspect.signature(hook)
    arguments = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
    return f"{hook.__name__}({arguments}) -> {signature.return_annotation}"


HOOKS = [
    getattr(module, name)
    for module in (hookspecs, lab_hookspecs)
    for name in dir(module)
    if name.startswith("teleport_register_")
]
"""The library's hooks and the lab's."""


def test_there_are_hooks_to_document():
    assert len(HOOKS) >= 8


@pytest.mark.parametrize("hook", HOOKS, ids=lambda hook: hook.__name__)
def test_every_hook_is_documented_with_its_signature(hook):
    assert hook_signature(hook) in (DOCS / "plugins.md").read_text()


def hook_section(kind: str) -> str:
    """The section of ``docs/plugins.md`` on the registration hook of ``kind``."""
    page = (DOCS / "plugins.md").read_text()
    return page.split(f"### `teleport_register_{kind}s(")[1].split("\n#")[0]


@pytest.mark.parametrize("kind", ["null_space", "schedule"])
def test_every_built_in_of_a_listed_kind_is_in_its_hook_section(kind):
    """The hook sections that list the built-ins list all of them."""
    built_ins = tt.build_registry(build_plugin_manager(entry_points=False)).names(kind)
    assert built_ins
    section = hook_section(kind)
    assert [name for name in built_ins if f"`{name}`" not in section] == []


@pytest.mark.parametrize("name", tt.__all__)
def test_every_public_name_is_in_the_architecture_page(name):
    assert re.search(rf"\b{re.escape(name)}\b", (DOCS / "architecture.md").read_text()), name


def test_testing_page_example_is_this_file_verbatim():
    examples = [
        block for block in code_blocks("testing.md", "python") if "class AffineProjector" in block
    ]
    assert len(examples) == 1
    assert examples[0] in Path(__file__).read_text()


def bilinear_plugin() -> types.ModuleType:
    """The one-file plugin of ``docs/plugins.md``, executed as the module its entry point names."""
    (source,) = [
        block for block in code_blocks("plugins.md", "python") if "class BilinearProjector" in block
    ]
    (entry_points,) = [
        block
        for block in code_blocks("plugins.md", "toml")
        if "entry-points.torch_teleport" in block
    ]
    module_name = re.search(r'= "([\w.]+)"', entry_points).group(1)
    module = types.ModuleType(module_name)
    exec(compile(source, f"docs/plugins.md ({module_name})", "exec"), module.__dict__)
    return module


class BilinearModel(nn.Module):
    def __init__(self, width: int, bias: bool) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(5, width), nn.Linear(5, width - 1)
        self.pairs = nn.Bilinear(width, width - 1, 6, bias=bias)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        pairs = self.pairs(torch.tanh(self.left(x)), torch.tanh(self.right(x)))
        return self.head(torch.tanh(pairs))


@functools.cache
def bilinear_registry():
    manager = build_plugin_manager()
    manager.register(bilinear_plugin())
    return tt.build_registry(manager)


@given(
    seed=st.integers(0, 2**31 - 1),
    width=st.integers(2, 6),
    batch=st.integers(1, 40),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_plugins_page_projector_keeps_the_loss_invariant(seed, width, batch, bias, dtype):
    registry = bilinear_registry()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BilinearModel(width, bias).to(dtype)
    inputs = torch.randn(batch, 5, generator=generator, dtype=dtype)
    targets = torch.randint(0, 3, (batch,), generator=generator)
    assert registry.projector_for(model.pairs).__name__ == "BilinearProjector"
    report = assert_teleport_invariant(
        model,
        nn.functional.cross_entropy,
        inputs,
        targets,
        registry=registry,
        uncovered="error",
        null_space="exact",
        steps=8,
    )
    pairs = next(layer for layer in report.layers if layer.name == "pairs.weight")
    assert pairs.input_dim == width * (width - 1) + bias


def transposed_weight_plugin() -> tuple[str, types.ModuleType]:
    """The projector of ``docs/plugins.md``'s transposed-weight section: its source, and that
    source executed as a plugin module of its own."""
    (source,) = [
        block
        for block in code_blocks("plugins.md", "python")
        if "class TransposedLinearProjector" in block
    ]
    module = types.ModuleType("torch_teleport_transposed_linear_example")
    exec(compile(source, "docs/plugins.md (transposed weight)", "exec"), module.__dict__)
    return source, module


def test_plugins_page_transposed_projector_is_the_built_in_verbatim():
    source, _ = transposed_weight_plugin()
    built_in = Path(__file__).resolve().parent.parent / "projectors" / "transposed_linear.py"
    assert source in built_in.read_text()


def _conv1d_forward(self, x):
    size_out = x.size()[:-1] + (self.nf,)
    x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
    x = x.view(size_out)
    return x


class _Conv1DBase(nn.Module):
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) / 10)


# A class called ``Conv1D`` under ``transformers.pytorch_utils`` (the package is never imported).
Conv1D = type(
    "Conv1D",
    (_Conv1DBase,),
    {"forward": _conv1d_forward, "__module__": "transformers.pytorch_utils"},
)


@functools.cache
def transposed_weight_registry():
    manager = build_plugin_manager()
    manager.register(transposed_weight_plugin()[1])
    return tt.build_registry(manager)


@given(
    seed=st.integers(0, 2**31 - 1),
    width=st.integers(2, 5),
    tokens=st.integers(1, 4),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
@pytest.mark.usefixtures("transformers_unloaded")
def test_plugins_page_transposed_projector_keeps_the_loss_invariant(seed, width, tokens, dtype):
    registry = transposed_weight_registry()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = nn.Sequential(
            Conv1D(2 * width, width), nn.GELU(approximate="tanh"), Conv1D(width, 2 * width)
        )
        model = nn.Sequential(
            nn.Linear(width, width), mlp, nn.Flatten(), nn.Linear(tokens * width, 3)
        ).to(dtype)
    inputs = torch.randn(2, tokens, width, generator=generator, dtype=dtype)
    targets = torch.randint(0, 3, (2,), generator=generator)
    projector = registry.projector_for(mlp[0])
    assert projector.__module__ == "torch_teleport_transposed_linear_example"
    report = assert_teleport_invariant(
        model,
        nn.functional.cross_entropy,
        inputs,
        targets,
        registry=registry,
        uncovered="error",
        null_space="exact",
        steps=8,
    )
    assert {"1.0.weight", "1.2.weight"} <= {layer.name for layer in report.layers}
    assert "transformers" not in sys.modules
