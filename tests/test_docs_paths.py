"""Every file the docs name exists, and every ``torch_teleport`` name they cite can be imported.

Paths are read from the Markdown pages (``README.md``, ``docs/``, the benchmarks' README): links
relative to their page, and any text starting with a top-level folder of the repository, outside
``text`` blocks (trees and diagrams, whose names are relative to their parents). A
placeholder such as ``<name>`` stands for any text, so ``docs/figures/bench_<name>.png`` must match
at least one file.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *ROOT.glob("lab/**/*.md")])
TOP = ("framework", "projectors", "objectives", "plugins", "lab", "tests", "docs", "configs", "torch_teleport", "benchmarks")
"""Folders a repository path starts with (``torch_teleport`` and ``benchmarks`` do not exist: a
path through them is a stale one)."""

PATH = re.compile(rf"(?<![\w./<>-])((?:{'|'.join(TOP)})/[\w./*<>-]*)")
TEXT_BLOCK = re.compile(r"^```text\n.*?^```", flags=re.S | re.M)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
DOTTED = re.compile(r"`(torch_teleport(?:\.\w+)+)")


def matches(path: Path) -> bool:
    """Whether ``path`` (with ``<placeholder>``s and globs) names at least one file or folder."""
    pattern = re.sub(r"<[^>]*>", "*", str(path.relative_to(ROOT)))
    return any(ROOT.glob(pattern)) if "*" in pattern else (ROOT / pattern).exists()


def named_paths(page: Path) -> list[tuple[str, Path]]:
    text = page.read_text()
    found = [(m, ROOT / m.rstrip(".")) for m in PATH.findall(TEXT_BLOCK.sub("", text))]
    found += [
        (link, (page.parent / link).resolve())
        for link in LINK.findall(text)
        if not re.match(r"[a-z]+:", link)
    ]
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_path_a_page_names_exists(page):
    missing = sorted({text for text, path in named_paths(page) if not matches(path)})
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


def resolves(name: str) -> bool:
    """Whether ``torch_teleport.a.b.c`` is a module or an attribute of one."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        try:
            for attribute in parts[end:]:
                target = getattr(target, attribute)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_torch_teleport_name_a_page_cites_resolves(page):
    cited = set(DOTTED.findall(page.read_text()))
    assert not sorted(name for name in cited if not resolves(name))
