"""barge's module graph: imports go one way (no cycles), and every import of a barge module is
at the top of the module, where a reader sees which way dependencies run (no function-level
``import barge…``). Imports under ``if TYPE_CHECKING:`` are not dependencies at run time and
are not counted. The size rule: no module over ~600 lines outside barge.oci without a reason
stated at its top."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import barge

SRC = Path(barge.__file__).resolve().parent
LONG = 620  # "about 600 lines"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The barge module an imported name is (or lives in)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> list[str]:
    """The barge modules one import statement brings in."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        # ``from barge import cancel`` imports the module barge.cancel
        names = [f"{node.module}.{a.name}" for a in node.names] or [node.module]
    out = []
    for n in names:
        if n == "barge" or n.startswith("barge."):
            m = _resolve(n)
            if m is not None:
                out.append(m)
    return out


def _scan(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules imported at the top, (line, module) of every import inside a function or
    class)."""
    tree = ast.parse(path.read_text(), str(path))
    top: set[str] = set()
    hidden: list[tuple[int, str]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for m in _imports(child):
                    (hidden.append((child.lineno, m)) if nested else top.add(m))
                continue
            inner = nested or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
            )
            visit(child, inner)

    visit(tree, False)
    return top, hidden


GRAPH = {name: _scan(path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w == v:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles() -> None:
    """Counting function-level imports too (a cycle hidden in a function is still one)."""
    graph = {m: top | {t for _, t in hidden} for m, (top, hidden) in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    """The check itself: a two-module cycle and a three-module one are found, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_function_level_imports_of_barge_modules() -> None:
    hidden = [
        f"{MODULES[m].relative_to(SRC.parent)}:{line}: {target}"
        for m, (_, found) in GRAPH.items()
        for line, target in found
    ]
    assert hidden == []


def test_the_scan_sees_hidden_and_type_only_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "from barge import errors\n"
        "if TYPE_CHECKING:\n"
        "    from barge.store import Store\n"
        "def f():\n"
        "    import barge.units\n"
        "    from barge.reference import parse\n"
    )
    top, hidden = _scan(src)
    assert top == {"barge.errors"}
    assert [m for _, m in hidden] == ["barge.units", "barge.reference"]


def test_the_cli_is_not_imported_back() -> None:
    """The CLI registers the command modules; no module imports barge.cli."""
    importers = sorted(m for m, (top, _) in GRAPH.items() if "barge.cli" in top)
    assert importers == ["barge.__main__"]


#: What the command modules may import: the API, what every command shares, and the leaves
#: (errors, sizes, output escaping, the console reporter). Running VMs (barge.vm) is not in
#: the API yet: the run commands call barge.vm.runner.
CLI_MAY_IMPORT = {
    "barge.api",
    "barge.commands.common",
    "barge.disk.codec",  # DEFAULT_CODEC, shown in --help
    "barge.errors",
    "barge.oci.settings",  # the timeout flags
    "barge.progress",
    "barge.reference",
    "barge.store",
    "barge.units",
    "barge.untrusted",
}


def test_the_cli_is_a_client_of_the_api() -> None:
    """The command modules reach barge's operations only through barge.api."""
    reached = {
        f"{m}: {t}"
        for m, (top, _) in GRAPH.items()
        if m.startswith("barge.commands.")
        for t in top
        if t not in CLI_MAY_IMPORT and not (m == "barge.commands.run" and t.startswith("barge.vm"))
    }
    assert reached == set()


def test_long_modules_say_why() -> None:
    """A module over ~600 lines (outside barge.oci) states at its top why it is one module
    ("Why one module", or why it is "over 600 lines")."""
    unexplained = []
    for name, path in MODULES.items():
        if name.startswith("barge.oci"):
            continue
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > LONG and not re.search(r"Why one module|over 600 lines", doc):
            unexplained.append(name)
    assert unexplained == []
