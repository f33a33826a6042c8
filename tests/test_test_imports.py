"""The tests' own layout: a test module takes shared helpers from the helper modules
(docs/internals.md, "Test helpers"), never from another test module, so that moving or
deleting a test never breaks another."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another() -> None:
    test_modules = {p.stem for p in TESTS.glob("test_*.py")}
    found = {
        f"{p.name} imports {name}"
        for p in sorted(TESTS.glob("*.py"))
        for name in imported_modules(p) & test_modules
    }
    assert not found, sorted(found)
