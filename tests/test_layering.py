"""The package table of docs/DESIGN.md, enforced: who may import whom, and no
import circles among corral's modules. Read from the source (every import,
a function's too), so a layering slip fails here, not in review."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "corral"

# module prefix -> prefixes it must never import (third-party or corral's own)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "corral.protocol": ("trio", "ssl", "socket", "corral.client", "corral.supervisor",
                        "corral.worker", "corral.shim", "corral.store", "corral.job"),
    "corral.client": ("corral.supervisor", "corral.worker", "corral.shim", "corral.store"),
    "corral.shim": ("trio", "corral.supervisor", "corral.worker", "corral.client"),
    "corral.worker": ("corral.supervisor", "corral.client"),
    "corral.job": ("trio", "corral.supervisor", "corral.worker", "corral.client", "corral.shim"),
    "corral.store": ("trio", "corral.supervisor", "corral.worker", "corral.client", "corral.shim"),
    "corral.records": ("trio", "corral.supervisor", "corral.worker", "corral.client",
                       "corral.shim", "corral.store", "corral.job"),
    "corral.errors": ("trio", "corral.supervisor", "corral.worker", "corral.client", "corral.shim"),
    "corral.ipc": ("trio", "corral.supervisor", "corral.worker", "corral.client"),
    "corral.ipc_fields": ("trio", "corral.supervisor", "corral.worker", "corral.client"),
    "corral.ipc_input": ("trio", "corral.supervisor", "corral.worker", "corral.client"),
    "corral.ipc_fds": ("trio", "corral.supervisor", "corral.worker", "corral.client"),
}  # fmt: skip
# Modules that may import nothing but the standard library.
STANDARD_LIBRARY_ONLY = (
    "corral.units",
    "corral.pidlock",
    "corral.errors",
    "corral.cert_dates",
    "corral.pki_layout",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str) -> Iterator[str]:
    """Every module `module` imports (at any depth of its code)."""
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:  # `from corral.client import commands`
                if f"{node.module}.{alias.name}" in MODULES:
                    yield f"{node.module}.{alias.name}"


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_what_its_layer_may(module: str) -> None:
    forbidden = [
        prefix for layer, banned in FORBIDDEN.items() if _under(module, layer) for prefix in banned
    ]
    wrong = sorted(
        {name for name in imports(module) for prefix in forbidden if _under(name, prefix)}
    )
    assert wrong == [], f"{module} imports {wrong}"


@pytest.mark.parametrize("module", STANDARD_LIBRARY_ONLY)
def test_the_lowest_modules_need_only_the_standard_library(module: str) -> None:
    outside = sorted(
        name
        for name in imports(module)
        if name.split(".")[0] not in sys.stdlib_module_names and name != "__future__"
    )
    assert outside == [], f"{module} imports {outside}"


def test_no_module_imports_itself_back_through_others() -> None:
    graph = {
        module: {name for name in imports(module) if name in MODULES and name != module}
        for module in MODULES
    }
    # A package's __init__ importing its own modules is how packages work;
    # a circle through two real modules is what is refused.
    packages = {module for module, path in MODULES.items() if path.name == "__init__.py"}
    circles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circle = path[path.index(module) :]
            if not set(circle) & packages:
                circles.append([*circle, module])
            return
        if module in done:
            return
        for name in sorted(graph[module]):
            visit(name, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert circles == []


def test_the_design_documents_every_package() -> None:
    design = (PACKAGE.parent / "docs" / "DESIGN.md").read_text()
    top = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    missing = sorted(name for name in top if f"`corral.{name}`" not in design)
    assert missing == []
