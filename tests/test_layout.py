"""The library stands alone: a plain teleport loads nothing of the lab, the library never imports the
lab, its imports need only its required dependencies, the core's imports form no cycle, and no core
function is longer than a screen."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from torch_teleport.plugin_manager import DISTRIBUTION, ROOMS


def package_folder(name: str) -> Path:
    """Where a package's modules lie: its source folder (editable install) or site-packages."""
    return Path(importlib.util.find_spec(name).submodule_search_locations[0]).resolve()


CORE = package_folder("torch_teleport")
LAB = package_folder("torch_teleport.lab")
LIBRARY = [CORE, *(package_folder(f"torch_teleport.{room}") for room in ("projectors", "objectives", "plugins"))]
LAB_ONLY = ("torch_teleport.lab", "torchvision", "tensorboard", "nltk", "matplotlib", "sklearn", "tqdm", "hypothesis")
EXTRAS = {"strategies.py": {"hypothesis"}, "lightning.py": {"lightning"}}
"""Library modules that need an extra: the testing kit's strategies (``test``) and the Lightning callback."""

PLAIN_TELEPORT = """
import sys
import torch
before = set(sys.modules)
import torch_teleport as tt
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
tt.Teleporter(model, torch.nn.functional.cross_entropy).teleport(torch.randn(4, 8), torch.randint(0, 3, (4,)))
print(" ".join(sorted(set(sys.modules) - before)))
"""


def test_a_plain_teleport_loads_nothing_of_the_lab():
    """Counted from ``import torch``, which itself imports tqdm (``torch.hub``) when it is installed."""
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_TELEPORT], capture_output=True, text=True, timeout=300, check=True
    )
    loaded = done.stdout.split()
    assert "torch_teleport.projectors.linear" in loaded  # the rooms it needs did load
    assert [name for name in loaded if name.startswith(ROOMS["method"])]
    assert not [name for name in loaded if any(name == p or name.startswith(f"{p}.") for p in LAB_ONLY)]


def library_files() -> list[Path]:
    """Installed (not editable), the lab and the rooms lie inside ``CORE``: each file once, no lab."""
    return sorted({path for folder in LIBRARY for path in folder.rglob("*.py") if LAB not in path.parents})


def _names(node: ast.stmt) -> list[tuple[str, int]]:
    """``(module, level)`` of what an import statement loads (``package.name`` for ``from`` imports)."""
    if isinstance(node, ast.Import):
        return [(alias.name, 0) for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        prefix = f"{node.module}." if node.module else ""
        return [(prefix + alias.name, node.level) for alias in node.names]
    return []


def all_imports(path: Path) -> list[tuple[str, int]]:
    return [name for node in ast.walk(ast.parse(path.read_text())) for name in _names(node)]


def top_level_imports(path: Path) -> list[tuple[str, int]]:
    """The imports a plain import of ``path`` runs: not in functions, not under ``if TYPE_CHECKING:``."""
    found = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            found.extend(_names(node))
            if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])

    visit(ast.parse(path.read_text()).body)
    return found


def test_the_library_never_imports_the_lab():
    offenders = [
        f"{path.relative_to(CORE.parent)}: {name}"
        for path in library_files()
        for name, level in all_imports(path)
        if level == 0 and (name == "torch_teleport.lab" or name.startswith("torch_teleport.lab."))
    ]
    assert not offenders


def test_the_required_dependencies_are_what_the_library_imports():
    requirements = importlib.metadata.requires(DISTRIBUTION)
    required = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0] for r in requirements if "extra ==" not in r}
    used = set()
    for path in library_files():
        for name, level in top_level_imports(path):
            top = name.split(".")[0]
            if level or top in sys.stdlib_module_names or top == "torch_teleport":
                continue
            assert top in required | EXTRAS.get(path.name, set()), f"{path.relative_to(CORE.parent)} imports {top}"
            used.add(top)
    assert required <= used, required - used  # and nothing required goes unused


def core_graph() -> dict[str, set[str]]:
    """Module -> the core modules its top-level imports load (``__init__`` for ``torch_teleport`` itself)."""
    modules = {path.stem for path in CORE.glob("*.py")}
    graph = {}
    for module in modules:
        edges = set()
        for name, level in top_level_imports(CORE / f"{module}.py"):
            if level == 1 or name.startswith("torch_teleport."):
                parts = name.removeprefix("torch_teleport.").split(".")
                edges.add(parts[0] if parts[0] in modules else "__init__")
            elif name == "torch_teleport":
                edges.add("__init__")
        graph[module] = edges - {module}
    return graph


def test_the_core_imports_form_no_cycle():
    graph, state, path = core_graph(), {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            assert state.get(target) != "open", " -> ".join([*path[path.index(target) :], target])
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert graph["teleporter"] >= {"registry", "method", "ascent"}  # the graph is read, not empty


FUNCTION_LINES = 60
"""The longest function the core may hold, decorators and docstring included: a reader sees it whole."""


def test_no_core_function_is_longer_than_a_screen():
    long = []
    rooms = {"lab", "projectors", "objectives", "plugins"}  # inside the package folder once installed
    for path in sorted(p for p in CORE.rglob("*.py") if p.relative_to(CORE).parts[0] not in rooms):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
                if node.end_lineno - start + 1 > FUNCTION_LINES:
                    long.append(f"{path.relative_to(CORE)}:{node.lineno} {node.name} ({node.end_lineno - start + 1} lines)")
    assert not long, "longer than a screen: " + ", ".join(long)
