"""The package's layers, read from its imports: core/ uses no Flower, clients never reach into
the server or the methods, every registered method resolves to itself, and modules stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qd_app.errors import ConfigError
from qd_app.methods import REGISTRY, UnlearningMethod, resolve_method

PACKAGE = Path(__file__).resolve().parents[1] / "qd_app"
MAX_LINES = 350


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved; ``from x import y``
    counts as importing ``x`` and, where it is a module of the package, ``x.y``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    """Every module importing ``start`` runs, through the package's own modules (importing
    ``a.b.c`` runs ``a`` and ``a.b`` too)."""
    seen, todo = set(), [start]
    while todo:
        for imported in GRAPH.get(todo.pop(), ()):
            parts = imported.split(".")
            for name in (".".join(parts[: i + 1]) for i in range(len(parts))):
                if name not in seen:
                    seen.add(name)
                    if name in MODULES:
                        todo.append(name)
    return seen


def in_layer(name: str, layer: str) -> bool:
    return name == f"qd_app.{layer}" or name.startswith(f"qd_app.{layer}.")


def test_the_layers_are_folders():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == {
        "core", "client", "server", "methods", "bench", "cli", "deploy"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if in_layer(m, "core")))
def test_core_imports_no_flower(module):
    assert not {m for m in reachable(module) if m == "flwr" or m.startswith("flwr.")}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if in_layer(m, "client")) + ["qd_app.client_app"])
def test_the_client_side_imports_nothing_of_the_server_or_the_methods(module):
    reached = reachable(module)
    assert not {m for m in reached if in_layer(m, "server") or in_layer(m, "methods") or in_layer(m, "bench")}


TOOLS = ("bench", "cli", "deploy")  # the commands a user runs beside flwr, and what they drive


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not any(in_layer(m, tool) for tool in TOOLS)))
def test_the_tools_on_top_are_imported_by_nothing_below_them(module):
    assert not {m for m in reachable(module) if any(in_layer(m, tool) for tool in TOOLS)}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if in_layer(m, "server")))
def test_the_server_side_knows_no_method_by_name(module):
    assert not {m for m in reachable(module) if in_layer(m, "methods") or in_layer(m, "client")}


def test_both_sides_speak_one_protocol_and_the_server_runs_no_client_code():
    assert "qd_app.protocol" in GRAPH["qd_app.client_app"] and "qd_app.protocol" in GRAPH["qd_app.client.tasks"]
    assert "qd_app.protocol" in GRAPH["qd_app.server.strategies"]
    assert not {m for m in reachable("qd_app.server_app") if in_layer(m, "client")}


def test_no_module_is_longer_than_the_limit():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_method_is_a_module_of_its_own_and_answers_to_its_name(name):
    method = resolve_method(name)
    assert isinstance(method, UnlearningMethod) and method.name == name and method.title
    assert type(method).__module__ == REGISTRY[name].partition(":")[0]
    assert in_layer(type(method).__module__, "methods")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("fedsgd", "must be one of quickdrop, retrain, sga, federaser, fu-mp, s2u, ispf, ispf-is, ispf-pf, gkt, blockf, hdus, or the import path"),
        ("no_such_package.module:Method", "cannot import no_such_package.module:Method"),
        ("qd_app.methods.quickdrop:Missing", "cannot import qd_app.methods.quickdrop:Missing"),
        ("qd_app.methods.quickdrop:UnlearnStrategy", "is not an UnlearningMethod subclass"),
    ],
)
def test_a_method_that_cannot_be_found_is_refused_with_what_is_allowed(setting, message):
    with pytest.raises(ConfigError, match=f"invalid setting method='{setting}': .*{message}"):
        resolve_method(setting)
