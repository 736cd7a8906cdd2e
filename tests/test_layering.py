"""Layering: each package imports only the packages below it (docs/architecture.md), so the tiers, the simulator and
the CLI stack instead of forming one import cycle. Read with `ast`, so imports inside functions count too and
nothing is imported to check it."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter

from .harness import REPO

PACKAGES = ("protocol", "device", "edge", "ledger", "cloud", "firmware_models", "experiments", "fediomt")
# package -> the project packages it may import (besides itself). cloud may use device.runtime (the interpreter
# loader); firmware_models builds bundles with it too.
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "device": {"protocol"},
    "edge": {"protocol"},
    "ledger": {"protocol"},
    "cloud": {"protocol", "ledger", "firmware_models", "device"},
    "firmware_models": {"protocol", "device"},
    "experiments": set(PACKAGES) - {"experiments", "fediomt"},
    "fediomt": set(PACKAGES) - {"fediomt"},
}


def project_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of a project package anywhere in `source` (functions included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


def package_imports() -> dict[str, list[tuple[str, str]]]:
    """package -> [("file:line", module)] of its imports of the other project packages."""
    out: dict[str, list[tuple[str, str]]] = {package: [] for package in PACKAGES}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for line, module in project_imports(path.read_text()):
                if module.split(".")[0] != package:
                    out[package].append((f"{path.relative_to(REPO)}:{line}", module))
    return out


def test_imports_inside_functions_and_submodules_are_seen():
    source = "import json\nfrom protocol.logs import event\n\ndef f():\n    import fediomt.cli\n    from . import x\n"
    assert project_imports(source) == [(2, "protocol.logs"), (5, "fediomt.cli")]


def test_every_package_imports_only_the_layers_below_it():
    offending = [f"{where} {module}" for package, imports in package_imports().items() for where, module in imports
                 if module.split(".")[0] not in ALLOWED[package]]
    assert not offending, "imports against the layer order:\n" + "\n".join(offending)


def test_the_package_graph_is_acyclic():
    graph = {package: {module.split(".")[0] for _, module in imports} for package, imports in package_imports().items()}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        cycle = " -> ".join(reversed(exc.args[1]))  # CycleError lists each node before the one importing it
        raise AssertionError(f"import cycle (A -> B: A imports B): {cycle}") from None
    assert order[0] == "protocol" and order[-1] == "fediomt"
