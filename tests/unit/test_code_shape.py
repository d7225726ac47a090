"""The code's shape: small modules with one job, short functions.

No module under ``pipeline/`` or ``backends/`` is over `MAX_MODULE_LINES` lines, and no function
or method there (nested ones included) is over `MAX_FUNCTION_LINES`, counted from its ``def``
line to its last line (docstring included, decorators not). Every offender is named at once.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "backends")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


class Offender(NamedTuple):
    """Something over its limit.

    Attributes:
        where: ``path`` for a module, ``path:line qualified.name`` for a function.
        lines: Its length in lines.
        limit: The limit it is over.
    """

    where: str
    lines: int
    limit: int

    def __str__(self) -> str:
        return f"{self.where}: {self.lines} lines (limit {self.limit})"


def modules() -> list[Path]:
    """Every Python module of the checked packages, sorted."""
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def long_functions(path: Path, tree: ast.Module) -> list[Offender]:
    """Functions and methods of a module over `MAX_FUNCTION_LINES`, with qualified names."""
    found: list[Offender] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                length = (child.end_lineno or child.lineno) - child.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    where = f"{path.relative_to(ROOT).as_posix()}:{child.lineno} {name}"
                    found.append(Offender(where, length, MAX_FUNCTION_LINES))
                walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(tree, "")
    return found


def offenders() -> list[Offender]:
    """Every module and function over its limit, module by module."""
    found: list[Offender] = []
    for path in modules():
        source = path.read_text(encoding="utf-8")
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(Offender(path.relative_to(ROOT).as_posix(), lines, MAX_MODULE_LINES))
        found.extend(long_functions(path, ast.parse(source, filename=str(path))))
    return found


def test_the_check_sees_the_packages() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in modules()}
    assert {"pipeline/__init__.py", "pipeline/job/__init__.py", "backends/__init__.py"} <= names


def test_a_long_nested_function_is_found() -> None:
    body = "\n".join("            x = 1" for _ in range(MAX_FUNCTION_LINES))
    source = f"class A:\n    def method(self) -> None:\n        def inner() -> None:\n{body}\n"
    path = ROOT / "pipeline" / "example.py"  # only named, never written
    found = long_functions(path, ast.parse(source))
    assert [(offender.where, offender.lines) for offender in found] == [
        ("pipeline/example.py:2 A.method", MAX_FUNCTION_LINES + 2),
        ("pipeline/example.py:3 A.method.inner", MAX_FUNCTION_LINES + 1),
    ]


def test_no_module_or_function_is_too_long() -> None:
    found = offenders()
    assert not found, f"{len(found)} over the size limits:\n" + "\n".join(f"  {offender}" for offender in found)
