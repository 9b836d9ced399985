"""The code stays readable in one sitting: no function over 80 lines, and no import cycle
between our own modules (imports inside functions count: a deferred import that hides a
cycle is still a cycle; deferring a heavy third-party import is fine)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"mim_workbench": REPO / "mim_workbench", "mim_workbench_napari": REPO / "plugins" / "mim_workbench_napari"}
MAX_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _resolve(module: str, path: Path, node: ast.ImportFrom | ast.Import, known: set[str]) -> set[str]:
    """Our modules that ``node`` imports (``from pkg import mod`` counts ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            is_pkg = path.name == "__init__.py"
            base = base[: len(base) - node.level + (1 if is_pkg else 0)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _resolve(module, path, node, known)
        # a package's own __init__ and its ancestors are not a cycle with their children
        graph[module] = {d for d in deps if d != module and not module.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_function_is_longer_than_80_lines():
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)


def test_no_import_cycles_between_our_modules():
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: the core's layers, bottom first: a package imports only from layers below its own
#: (docs/architecture.md); the entry points at the top may import each other
LAYERS = [("errors", "faults", "display"), ("io",), ("masking",), ("models",), ("regions",), ("training",), ("inference",),
          ("bench", "cli", "demo", "sample", "study")]


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "mim_workbench_napari":
        return "plugins"
    return parts[1] if len(parts) > 1 else ""


def test_packages_import_only_the_layers_below_them():
    rank = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
    wrong = []
    for module, deps in _graph().items():
        src = _package(module)
        for dep in deps:
            dst = _package(dep)
            if src == dst or dst == "" or src == "plugins":
                continue  # the package root holds only the version; the front end may use the core
            if dst == "plugins":
                allowed = src == "cli"  # `mim-workbench gui` hands over to the front end
            else:
                allowed = rank[dst] < rank[src] or rank[src] == rank[dst] == len(LAYERS) - 1
            if not allowed:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "\n".join(sorted(wrong))
