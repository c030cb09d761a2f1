"""The package's floors (docs/architecture.md): every module imports only from its own floor or
the floors below it, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

FLOORS = [
    {"errors", "lock", "outputs", "render", "annotate", "ops", "config", "records", "__init__", "__version__"},
    {"preprocess", "models", "data", "layers", "capture", "targets", "progress"},
    {"registry", "methods", "metrics"},
    {"plan"},
    {"engine"},
    {"shards", "run", "report"},
    {"sanity", "check", "listing", "api", "cli"},
]


def floor_of(module: str) -> int:
    head = module.split(".")[0]
    return next(i for i, f in enumerate(FLOORS) if head in f)


def imports(path: Path) -> list[str]:
    """xaicli modules (dotted, relative to the package) imported anywhere in ``path``."""
    pkg = path.relative_to(ROOT / "xaicli").with_suffix("").parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(pkg[: len(pkg) - node.level])
            target = ".".join(base + ([node.module] if node.module else []))
            if target:
                found.append(target)
            else:  # from . import x (the package's own modules)
                found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xaicli."):
            found.append(node.module.removeprefix("xaicli."))
    return found


def test_no_module_imports_from_a_floor_above_it() -> None:
    climbs = []
    files = sorted((ROOT / "xaicli").rglob("*.py"))
    assert len(files) > 30
    for path in files:
        me = ".".join(path.relative_to(ROOT / "xaicli").with_suffix("").parts)
        for target in imports(path):
            if floor_of(target) > floor_of(me):
                climbs.append(f"{me} -> {target}")
    assert not climbs, climbs
