#!/usr/bin/env python3
"""Check the import layers of the project and find import cycles (part of `make lint`).

    python scripts/check_layers.py [--root .]

Layers, lowest first: facexplain -> registry -> {services, training} -> sdk -> cli. A module may
import its own layer or a lower one, with these further contracts:

- services and training share a layer but never import each other;
- services.kit (what every service is built from) imports no concrete service package;
- a concrete service (services.embedding, services.decoding, ...) imports no other concrete service;
- sdk talks to the services over gRPC only: of services it may import the generated protocol code
  services.api, nothing else, and it never imports training;
- nothing in the product layers imports bench, scripts or tests (they sit on top and may import
  anything).

The import graph is read from the source with `ast`, so a lazy import cannot hide: imports inside
functions, `if TYPE_CHECKING:` blocks, relative imports, `from pkg import module`, and dynamic imports
(`importlib.import_module(...)`, `__import__(...)`) whose argument is a string literal or an f-string
whose constant prefix names a project module all count. Exit status 1 with one line per violation and
per cycle when anything is wrong; 0 with a one-line summary otherwise.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Product packages and their layer, lowest first.
LAYERS: dict[str, int] = {"facexplain": 0, "registry": 1, "services": 2, "training": 2, "sdk": 3, "cli": 4}
# Top-level consumers: may import anything, and nothing in the product layers may import them.
CONSUMERS: tuple[str, ...] = ("bench", "scripts", "tests")
PACKAGES: tuple[str, ...] = (*LAYERS, *CONSUMERS)

# Sub-packages of services that are not services: the shared kit and the generated gRPC code.
SERVICES_SHARED: frozenset[str] = frozenset({"kit", "api"})

# How an import is reached: at import time, only when a function runs, only for the type checker,
# or through importlib / __import__ (which may also sit in a function; dynamic wins).
KINDS = ("module", "function", "type_checking", "dynamic")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    file: str  # relative to the root
    line: int
    kind: str  # one of KINDS

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Graph:
    root: Path
    modules: dict[str, str] = field(default_factory=dict)  # module name -> file, relative to the root
    edges: list[Edge] = field(default_factory=list)


# -- reading the source -------------------------------------------------------------------------------


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _source_files(root: Path) -> Iterator[Path]:
    for pkg in PACKAGES:
        base = root / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root)
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                continue
            yield path


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _dynamic_name(call: ast.Call) -> str | None:
    """The module named by importlib.import_module(...) / __import__(...), or its constant prefix.

    For an f-string only the constant text before the first placeholder is known; its last, possibly
    partial, dotted component is dropped: f"training.{x}.cli" names `training`.
    """
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr):
        prefix = ""
        for part in arg.values:
            if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
                break
            prefix += part.value
        return prefix.rpartition(".")[0] or None
    return None


class _ImportVisitor(ast.NodeVisitor):
    """Collects (written module name, line, kind) for every import in one file."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, list[str], int, str]] = []  # (base, names, line, kind)
        self._in_function = 0
        self._in_type_checking = 0

    def _kind(self) -> str:
        if self._in_type_checking:
            return "type_checking"
        return "function" if self._in_function else "module"

    def _absolute(self, name: str | None, level: int) -> str | None:
        if level == 0:
            return name
        parts = self.package.split(".") if self.package else []
        if level - 1 > len(parts):
            return None  # beyond the top of the tree: Python would raise, nothing to check
        base = ".".join(parts[: len(parts) - (level - 1)])
        return f"{base}.{name}" if name and base else (name or base)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [], node.lineno, self._kind()))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node.module, node.level)
        if base:
            self.found.append((base, [a.name for a in node.names if a.name != "*"], node.lineno, self._kind()))

    def visit_Call(self, node: ast.Call) -> None:
        name = _dynamic_name(node)
        if name:
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                name = self._absolute(name.lstrip(".") or None, level) or ""
            if name:
                self.found.append((name, [], node.lineno, "type_checking" if self._in_type_checking else "dynamic"))
        self.generic_visit(node)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        # decorators and defaults run at import time; only the body is deferred
        if not isinstance(node, ast.Lambda):
            for d in node.decorator_list:
                self.visit(d)
        self.visit(node.args)
        self._in_function += 1
        for child in node.body if isinstance(node.body, list) else [node.body]:
            self.visit(child)
        self._in_function -= 1

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function
    visit_Lambda = _visit_function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._in_type_checking += 1
        for child in node.body:
            self.visit(child)
        self._in_type_checking -= 1
        for child in node.orelse:  # the else branch is what runs
            self.visit(child)


def _resolve(base: str, names: list[str], modules: dict[str, str]) -> list[str]:
    """Project modules that `from base import names` (or `import base` when names is empty) loads.

    `from pkg import x` is an import of the module pkg.x when there is one, else of pkg (x is a name in
    it). A name that matches no file (e.g. generated code not built yet) is kept as written: its layer
    is still known from its first component. Importing a.b.c also runs a and a.b; those implicit edges
    to parent packages are left out, as a package's own __init__ commonly imports its children.
    """
    if base.split(".")[0] not in PACKAGES:
        return []
    if not names:
        return [base]
    targets: list[str] = []
    for n in names:
        sub = f"{base}.{n}"
        t = sub if sub in modules else base
        if t not in targets:
            targets.append(t)
    return targets


def build_graph(root: Path | str) -> Graph:
    """The import graph of the project's modules under root, one edge per import statement and target."""
    root = Path(root).resolve()
    graph = Graph(root=root)
    files: list[tuple[str, Path, str]] = []
    for path in _source_files(root):
        name = _module_name(path.relative_to(root))
        graph.modules[name] = path.relative_to(root).as_posix()
        files.append((name, path, graph.modules[name]))
    for name, path, rel in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visitor = _ImportVisitor(name, is_package=path.name == "__init__.py")
        visitor.visit(tree)
        for base, names, line, kind in visitor.found:
            for target in _resolve(base, names, graph.modules):
                if target != name:
                    graph.edges.append(Edge(name, target, rel, line, kind))
    return graph


# -- the contracts -------------------------------------------------------------------------------------


def _top(module: str) -> str:
    return module.split(".")[0]


def _service(module: str) -> str | None:
    """The concrete service package a services module belongs to (None for kit, api and services itself)."""
    parts = module.split(".")
    if parts[0] != "services" or len(parts) < 2 or parts[1] in SERVICES_SHARED:
        return None
    return parts[1]


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def rule_broken(source: str, target: str) -> str | None:
    """Why `source` may not import `target`, or None when it may."""
    src, dst = _top(source), _top(target)
    if src in CONSUMERS:
        return None
    if dst in CONSUMERS:
        return f"product code ({src}) may not import {dst} (bench, scripts and tests sit on top)"
    if LAYERS[dst] > LAYERS[src]:
        return f"{src} (layer {LAYERS[src]}) may not import upward into {dst} (layer {LAYERS[dst]})"
    if {src, dst} == {"services", "training"}:
        return "services and training may not import each other"
    if src == "sdk":
        if dst == "training":
            return "sdk may not import training"
        if dst == "services" and not _in(target, "services.api"):
            return "sdk may import of services only the generated protocol code services.api"
    if src == "services":
        s_src, s_dst = _service(source), _service(target)
        if _in(source, "services.kit") and s_dst:
            return "services.kit may not import a concrete service package"
        if s_src and s_dst and s_src != s_dst:
            return f"a concrete service (services.{s_src}) may not import another (services.{s_dst})"
    return None


def layer_violations(graph: Graph) -> list[str]:
    """One line per import that breaks a contract: "module (file:line) imports target: rule".

    Imports that only the type checker sees count too: the picture of the layers is for readers as well.
    """
    out: list[str] = []
    for e in graph.edges:
        why = rule_broken(e.source, e.target)
        if why:
            how = "" if e.kind == "module" else f" [{e.kind}]"
            out.append(f"{e.source} ({e.where}) imports {e.target}{how}: {why}")
    return out


# -- cycles --------------------------------------------------------------------------------------------


def _runtime_adjacency(graph: Graph) -> dict[str, dict[str, Edge]]:
    # `if TYPE_CHECKING:` imports never run, so they cannot take part in a cycle and are left out here;
    # function-level and dynamic imports run (later) and are kept.
    adj: dict[str, dict[str, Edge]] = {m: {} for m in graph.modules}
    for e in graph.edges:
        if e.kind != "type_checking" and e.target in graph.modules:
            adj[e.source].setdefault(e.target, e)
    return adj


def _strongly_connected(adj: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit to worry about)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for start in sorted(adj):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(adj[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(adj[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    scc: list[str] = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        scc.append(m)
                        if m == node:
                            break
                    sccs.append(sorted(scc))
    return sccs


def _shortest_cycle(start: str, members: set[str], adj: dict[str, dict[str, Edge]]) -> list[Edge]:
    """The shortest path start -> ... -> start inside one strongly connected component (BFS)."""
    came: dict[str, Edge] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child, edge in sorted(adj[node].items()):
            if child not in members:
                continue
            if child == start:
                path = [edge]
                while path[0].source != start:
                    path.insert(0, came[path[0].source])
                return path
            if child not in came:
                came[child] = edge
                queue.append(child)
    return []


def cycles(graph: Graph) -> list[list[Edge]]:
    """One shortest cycle per strongly connected component of more than one module, as its edges.

    A component may hold more cycles than the one shown; all of its modules are in the report line.
    """
    adj = _runtime_adjacency(graph)
    found = []
    for scc in _strongly_connected(adj):
        if len(scc) > 1:
            found.append(_shortest_cycle(scc[0], set(scc), adj))
    return sorted(found, key=lambda c: c[0].source)


def _describe_cycle(cycle: list[Edge], members: list[str]) -> str:
    steps = (
        " -> ".join(f"{e.source} ({e.where}{'' if e.kind == 'module' else ', ' + e.kind})" for e in cycle)
        + f" -> {cycle[0].source}"
    )
    extra = sorted(set(members) - {e.source for e in cycle})
    return f"import cycle: {steps}" + (f"; same component: {', '.join(extra)}" if extra else "")


def report(graph: Graph) -> tuple[list[str], str]:
    """(problem lines, summary line)."""
    problems = layer_violations(graph)
    sccs = {scc[0]: scc for scc in _strongly_connected(_runtime_adjacency(graph)) if len(scc) > 1}
    for c in cycles(graph):
        problems.append(_describe_cycle(c, sccs.get(c[0].source, [])))
    kinds = {k: sum(1 for e in graph.edges if e.kind == k) for k in KINDS}
    summary = (
        f"check_layers: {len(graph.modules)} modules, {len(graph.edges)} import edges "
        f"({kinds['function']} in functions, {kinds['type_checking']} type-checking only, "
        f"{kinds['dynamic']} dynamic), layers facexplain -> registry -> services|training -> sdk -> cli"
    )
    return problems, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="repository root")
    args = parser.parse_args(argv)
    problems, summary = report(build_graph(args.root))
    if problems:
        print("\n".join(problems))
        print(f"{summary}: {len(problems)} problem(s)")
        return 1
    print(f"{summary}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
