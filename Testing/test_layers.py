"""The package layout is the architecture: each part of ``GDPILiverAnomalyLib`` imports
only the parts below it, and the engine never imports the training package.

Layers, top to bottom: ``slicer_side`` -> ``running`` -> ``files`` -> ``method``;
``errors`` (and the package root's ``__version__``) may be imported by every part.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "GDPILiverAnomaly" / "GDPILiverAnomalyLib"
LAYERS = ["method", "files", "running", "slicer_side"]  # bottom to top
SHARED = {"", "__version__", "errors"}  # the package root and the exceptions


def _imports(path: Path, source: str | None = None) -> list[tuple[str, int]]:
    """Absolute dotted names that the module at ``path`` (inside the package) imports,
    with line numbers."""
    rel = path.relative_to(LIB).with_suffix("")
    package = ["GDPILiverAnomalyLib", *rel.parts[:-1]]
    found = []
    source = path.read_text() if source is None else source
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join([*base, node.module] if node.module else base)]
                if not node.module:
                    names = [".".join([*base, a.name]) for a in node.names]
            else:
                names = [node.module or ""]
            found += [(n, node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return found


def _part(dotted: str) -> str | None:
    """The layer of a module inside the package ('' = root), None outside it."""
    parts = dotted.split(".")
    if parts[0] != "GDPILiverAnomalyLib":
        return None
    return parts[1] if len(parts) > 1 else ""


MODULES = sorted(LIB.rglob("*.py"))


def test_every_module_lives_in_a_part():
    """No module beside the parts but the package's own entry points and errors."""
    loose = {p.name for p in LIB.glob("*.py")}
    assert loose == {"__init__.py", "__main__.py", "errors.py"}
    assert {p.name for p in LIB.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        *LAYERS,
        "models",
    }
    for part in LAYERS:
        init = (LIB / part / "__init__.py").read_text()
        assert ast.get_docstring(ast.parse(init)), f"{part}/__init__.py says what the part is for"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(LIB).as_posix())
def test_imports_only_go_down(path: Path):
    rel = path.relative_to(LIB)
    own = rel.parts[0] if len(rel.parts) > 1 else None
    for name, line in _imports(path):
        assert not name.startswith("GDPITraining"), f"{rel}:{line} imports training ({name})"
        part = _part(name)
        if part is None or own is None or part in SHARED or part == "models":
            continue
        assert LAYERS.index(part) <= LAYERS.index(own), (
            f"{rel}:{line} imports {name}: {own} may import only {LAYERS[: LAYERS.index(own) + 1]}"
        )


def test_the_check_sees_an_upward_import():
    """The checker itself: relative imports resolve to their parts."""
    src = "from ..running.pipeline import detect\nfrom ..errors import GDPIError\nfrom . import ddnm\n"
    names = [n for n, _ in _imports(LIB / "method" / "ame.py", src)]
    assert names == [
        "GDPILiverAnomalyLib.running.pipeline",
        "GDPILiverAnomalyLib.errors",
        "GDPILiverAnomalyLib.method.ddnm",
    ]
    assert [_part(n) for n in names] == ["running", "errors", "method"]
