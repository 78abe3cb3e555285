"""The package's architecture, checked: every import points down the layer list below.

A module may import from its own concern (folder) and from the concerns listed above it,
never from one listed below it or beside it. ``bnfold/__init__.py`` (the public API) and
``bnfold/cli.py`` (the thin command line) sit on top; ``pipeline`` is the composition root.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bnfold"

# bottom first; one concern per entry (a folder, or a leaf module at the top level)
LAYERS = [
    ("errors", "version"),
    ("io",),
    ("mlp",),
    ("fold",),
    ("runtime",),
    ("verify",),
    ("report", "sampling"),
    ("serve",),
    ("pipeline",),
    ("api",),
    ("cli",),
    ("__init__", "__main__"),
]
RANK = {concern: rank for rank, concerns in enumerate(LAYERS) for concern in concerns}


def concern_of(module: str) -> str:
    """``bnfold.verify.domain`` -> ``verify``; ``bnfold`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every ``bnfold`` module that ``path`` imports, function-local imports included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("bnfold")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "bnfold":
                found += [(node.lineno, f"bnfold.{a.name}") for a in node.names]
            elif node.module.startswith("bnfold."):
                found.append((node.lineno, node.module))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_concern_has_a_layer():
    concerns = {
        concern_of("bnfold." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts))
        for p in SOURCES
    }
    assert concerns <= set(RANK), f"add {sorted(concerns - set(RANK))} to LAYERS"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path):
    here = concern_of("bnfold." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    wrong = [
        f"line {line}: {module} ({concern_of(module)})"
        for line, module in imported_modules(path)
        if concern_of(module) != here and RANK[concern_of(module)] >= RANK[here]
    ]
    assert not wrong, f"{path.relative_to(PACKAGE)} ({here}) imports up or sideways: {wrong}"


def test_the_checker_sees_an_upward_import(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from bnfold.pipeline.export import build_graph\n")
    assert imported_modules(bad) == [(2, "bnfold.pipeline.export")]
    assert RANK[concern_of("bnfold.pipeline.export")] > RANK["fold"]
