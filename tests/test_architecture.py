"""The package's import graph, as drawn in the README's architecture section.

Walks every module of ``outbox/`` with ``ast`` and fails on an import cycle or on an arrow
that points the wrong way. Imports under ``if TYPE_CHECKING:`` are annotations only and do
not count; imports inside functions (lazy ones) do.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "outbox"

HTTP = {"httpx", "requests", "urllib.request", "http.client", "socket"}
IO = HTTP | {"sqlite3", "sqlalchemy", "alembic", "subprocess", "fcntl"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``module`` imports at run time (absolute names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # `from outbox.store import stage` imports the submodule outbox.store.stage
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        raw = _imports(path, name)
        graph[name] = {m for m in raw if m in modules and m != name} | {
            m for m in raw if not m.startswith("outbox")
        }
    return graph


GRAPH = _graph()
OURS = {m for m in GRAPH}


def _internal(module: str) -> set[str]:
    return {m for m in GRAPH[module] if m in OURS}


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _external(module: str) -> set[str]:
    return {m for m in GRAPH[module] if m not in OURS}


def _uses(module: str, names: set[str]) -> set[str]:
    return {m for m in _external(module) if any(m == n or m.startswith(n + ".") for n in names)}


def test_the_graph_sees_the_whole_package() -> None:
    # a guard against the walk silently finding nothing
    assert {"outbox.cli", "outbox.datasets", "outbox.normalize", "outbox.store"} <= OURS
    assert "outbox.store" in {m.rpartition(".")[0] for m in OURS if m.startswith("outbox.store.")}
    assert _internal("outbox.cli"), "the CLI imports parts of the package"


def _cycle() -> list[str] | None:
    # the package __init__ of X is imported whenever X.y is; edges to a package
    # itself are real edges, so a cycle through __init__ re-exports counts too
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(_internal(node)):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_planted_cycle_is_found() -> None:
    # the cycle finder itself can fail: plant one and see it
    saved = GRAPH["outbox.errors"]
    GRAPH["outbox.errors"] = saved | {"outbox.cli"}
    try:
        assert _cycle() is not None
    finally:
        GRAPH["outbox.errors"] = saved


PURE_LEAVES = {"outbox.errors", "outbox.timeutil"}


@pytest.mark.parametrize("module", ["outbox.datasets", "outbox.normalize"])
def test_the_pure_layer_imports_no_io(module: str) -> None:
    allowed = {"outbox", "outbox.datasets", "outbox.normalize", *PURE_LEAVES}
    assert _internal(module) <= allowed, _internal(module) - allowed
    assert not _uses(module, IO), _uses(module, IO)


def _modules(prefix: str) -> list[str]:
    return sorted(m for m in OURS if _in(m, prefix))


@pytest.mark.parametrize("module", _modules("outbox.store"))
def test_the_store_imports_no_http_and_nothing_above_it(module: str) -> None:
    assert not _uses(module, HTTP), _uses(module, HTTP)
    above = {m for m in _internal(module) if _in(m, *ABOVE_STORE)}
    assert not above, above


ABOVE_STORE = (
    "outbox.cli",
    "outbox.wiring",
    "outbox.stages",
    "outbox.status",
    "outbox.sources",
    "outbox.sinks",
    "outbox.doctor",
    "outbox.demo",
    "outbox.report",
    "outbox.alerts",
)


@pytest.mark.parametrize("module", _modules("outbox.sources") + _modules("outbox.sinks"))
def test_sources_and_sinks_never_import_the_store_or_a_stage(module: str) -> None:
    bad = {
        m
        for m in _internal(module)
        if _in(m, "outbox.store", "outbox.stages", "outbox.status", "outbox.cli", "outbox.wiring")
    }
    assert not bad, bad


@pytest.mark.parametrize("module", sorted(OURS - {"outbox.__main__", "outbox.cli"}))
def test_nothing_below_the_cli_imports_it(module: str) -> None:
    assert "outbox.cli" not in _internal(module)


@pytest.mark.parametrize("module", _modules("outbox.stages") + _modules("outbox.status"))
def test_stages_and_status_do_not_reach_up(module: str) -> None:
    bad = {m for m in _internal(module) if _in(m, "outbox.cli", "outbox.wiring")}
    assert not bad, bad


@pytest.mark.parametrize("module", _modules("outbox.stages"))
def test_stages_speak_no_http(module: str) -> None:
    bad = {m for m in _internal(module) if _in(m, "outbox.sinks", "outbox.sources")}
    assert not _uses(module, HTTP), _uses(module, HTTP)
    assert not bad, f"{module} reaches a concrete source or sink: {bad}"


@pytest.mark.parametrize("module", _modules("outbox.receiver"))
def test_the_receiver_imports_nothing_of_outbox(module: str) -> None:
    bad = {m for m in _internal(module) if not _in(m, "outbox.receiver") and m != "outbox"}
    assert not bad, bad


@pytest.mark.parametrize("module", sorted(m for m in OURS if not _in(m, "outbox.testing")))
def test_the_product_does_not_import_the_test_peers(module: str) -> None:
    assert not {m for m in _internal(module) if _in(m, "outbox.testing")}
