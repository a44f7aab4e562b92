"""The package's import graph: no cycles, the CLI imported by nobody, a light --version.

Endpoints are wired in one table (gateway.endpoints), not by import side effects,
so nothing needs to import "everything" and no module needs the CLI. These tests
read every module's ``import`` statements (``if TYPE_CHECKING:`` blocks left out:
they never run) and fail on a cycle, so a new back-edge is found when it is written,
not when an import order happens to break.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.endpoints import ENDPOINTS, load

REPO = Path(__file__).resolve().parents[2]
ENTRY_POINT = "gateway.cli"


def package_dirs() -> dict[str, Path]:
    """Package name → folder, as pyproject.toml maps them (gateway.codecs is codecs/)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    return {
        name: REPO / mapped.get(name, name.replace(".", "/")) for name in setuptools["packages"]
    }


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: name → (file, is a package's __init__)."""
    found = {}
    for package, folder in package_dirs().items():
        for file in folder.glob("*.py"):
            is_init = file.stem == "__init__"
            found[package if is_init else f"{package}.{file.stem}"] = (file, is_init)
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == (
        "TYPE_CHECKING"
    )


def import_statements(tree: ast.Module, lazy: bool) -> list[ast.Import | ast.ImportFrom]:
    """The imports run when the module is imported (``lazy``: also those in functions)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                walk(node.orelse if _type_checking(node) else node.body + node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body + node.orelse + node.finalbody)
                for handler in node.handlers:
                    walk(handler.body)
            elif isinstance(node, ast.With | ast.For | ast.While | ast.ClassDef):
                walk(node.body)  # a class body runs at import time too
            elif lazy and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.extend(
                    n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)
                )

    walk(tree.body)
    return found


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """Module → the package's modules it imports. Importing ``a.b.c`` from outside
    ``a.b`` runs ``a.b``'s ``__init__`` first, so that counts as an import too."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, (file, is_init) in mods.items():
        here = name.split(".") if is_init else name.split(".")[:-1]
        targets = set()
        for node in import_statements(ast.parse(file.read_text()), lazy):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            targets.update(
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                for alias in node.names
            )
        deps = set()
        for target in targets:
            while target and target not in mods:  # gateway.config.Model → gateway.config
                target = target.rpartition(".")[0]
            parent = target
            while parent:
                if parent in mods and not name.startswith(parent + ".") and parent != name:
                    deps.add(parent)
                parent = parent.rpartition(".")[0]
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_package() -> None:
    """The reader finds what the tests below rely on (else they would pass on nothing)."""
    graph = import_graph()
    assert {"gateway.cli", "gateway.endpoints", "gateway.hardware.ptt", "gateway.sip.bank"} <= set(
        graph
    )
    assert "gateway.endpoints" in graph["gateway.cli"]
    assert "gateway.config" in graph["gateway.sip.config"]
    assert "gateway.app" not in graph["gateway.mqtt"]  # under TYPE_CHECKING only


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_no_cycles_through_imports_inside_functions_either() -> None:
    """Lazy imports keep start-up light; they must not tie layers into knots."""
    assert cycles(import_graph(lazy=True)) == []


def test_only_the_entry_point_imports_the_cli() -> None:
    graph = import_graph(lazy=True)
    assert sorted(m for m, deps in graph.items() if ENTRY_POINT in deps) == []


def test_version_loads_no_heavy_library() -> None:
    """``borderlink --version`` and ``--help`` answer without NumPy, aiortc, PyAV..."""
    heavy = ["numpy", "scipy", "aiortc", "av", "sounddevice", "cryptography", "pydantic"]
    script = (
        "import runpy, sys\n"
        "sys.argv = ['borderlink', '--version']\n"
        "try:\n"
        "    runpy.run_module('gateway.cli', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('loaded:', *sorted({m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.startswith("borderlink ")
    loaded = set(out.split("loaded:")[1].split())
    assert "gateway" in loaded
    assert sorted(loaded & set(heavy)) == []


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_every_part_the_table_names_exists(endpoint) -> None:  # noqa: ANN001
    """The table names parts by "module:attribute": a typo must fail here, not on a site."""
    from gateway.config import Model, PortConfig
    from gateway.ports import Port

    if endpoint.section:
        assert issubclass(load(endpoint.config), Model)
    if endpoint.service is not None:
        assert endpoint.section and callable(load(endpoint.service))
    for config, port in endpoint.ports.values():
        assert issubclass(load(config), PortConfig) and issubclass(load(port), Port)
    for part in (
        *endpoint.routes,
        *(p for c in endpoint.commands for p in (c.arguments, c.handler)),
    ):
        assert callable(load(part))
