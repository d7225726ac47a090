"""The import rules of docs/architecture.md, read from the source (no import is executed)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (absolute names; `from a import b` counts `a` and `a.b`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def calls_named(path: Path, name: str) -> list[int]:
    """Lines where `name(...)` is called."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call)
        and ((isinstance(node.func, ast.Name) and node.func.id == name) or getattr(node.func, "attr", None) == name)
    ]


def test_backends_import_nothing_of_pipeline() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "pipeline")
        for path in (ROOT / "backends").rglob("*.py")
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_the_runner_knows_stages_only_through_the_stage_list() -> None:
    modules = imported_modules(ROOT / "pipeline" / "runner.py")
    stage_modules = {m for m in modules if m.startswith("pipeline.stages.")} - {
        "pipeline.stages.STAGES",
        "pipeline.stages.base",
    }
    assert not {m for m in stage_modules if not m.startswith("pipeline.stages.base.")}


def test_outputs_are_compared_only_by_the_parity_package() -> None:
    constructed = {
        str(path.relative_to(ROOT)): lines
        for root in ("pipeline", "backends")
        for path in (ROOT / root).rglob("*.py")
        if (lines := calls_named(path, "OutputComparator"))
    }
    assert constructed and all(path.startswith("pipeline/parity/") for path in constructed), constructed
