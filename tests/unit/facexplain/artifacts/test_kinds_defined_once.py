"""Every artifact kind is described by one module, and its names are spelled there only.

A kind name (``"decoder"``) or a default registered name (``"facexplain-dfd-dlib128"``) spelled as a
literal in a second place drifts the day one of them changes. This scans the product code's syntax
trees (docstrings and comments are not code) for the places where such a string is *used as a kind or
a model name*: compared with, passed as ``kind=``, assigned to a ``KIND_*``/``DEFAULT_*`` constant.
A default model name is distinctive enough that any literal occurrence counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import facexplain.artifacts as artifacts
from tests.conftest import REPO

PRODUCT = ("facexplain", "registry", "services", "training", "sdk", "cli")


def _product_files() -> list[Path]:
    return [p for pkg in PRODUCT for p in (REPO / pkg).rglob("*.py") if "api/v1" not in p.as_posix()]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _kind_uses(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, literal) where a string in ``names`` is used as a kind: compared, ``kind=``, a KIND_/DEFAULT_ value."""
    found = []
    for node in ast.walk(tree):
        consts: list[ast.expr] = []
        if isinstance(node, ast.Compare):
            consts = [node.left, *node.comparators]
        elif isinstance(node, ast.keyword) and node.arg == "kind":
            consts = [node.value]
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id.startswith(("KIND_", "DEFAULT_")) for t in targets) and node.value:
                consts = [node.value]
        elif isinstance(node, ast.Dict):
            consts = [v for k, v in zip(node.keys, node.values, strict=True) if k is not None and _is_kind_key(k)]
        for c in consts:
            if isinstance(c, ast.Constant) and c.value in names:
                found.append((c.lineno, c.value))
    return found


def _is_kind_key(key: ast.expr) -> bool:
    return isinstance(key, ast.Constant) and key.value == "kind"


def test_every_registered_kind_has_one_module_and_a_default_name_set_there() -> None:
    assert set(artifacts.KINDS) >= {"embedder", "decoder", "direction_set", "attribute_probes"}
    modules = {kind.name: kind.load.__module__ for kind in artifacts.KINDS.values()}
    # one module per kind, and no module describing two
    assert len(set(modules.values())) == len(modules), modules
    for name, module in modules.items():
        assert module.startswith("facexplain.artifacts."), (name, module)


def test_kind_names_are_used_through_their_constants_only() -> None:
    names = set(artifacts.KINDS)
    uses: dict[str, list[str]] = {n: [] for n in names}
    for path in _product_files():
        tree = ast.parse(path.read_text(), str(path))
        for line, literal in _kind_uses(tree, names):
            uses[literal].append(f"{path.relative_to(REPO)}:{line}")
    for name, where in uses.items():
        module = artifacts.KINDS[name].load.__module__.replace(".", "/") + ".py"
        assert len(where) == 1 and where[0].startswith(module), f"kind {name!r} spelled as a literal at {where}"


def test_default_model_names_are_spelled_once() -> None:
    defaults = {k.default_model: k for k in artifacts.KINDS.values() if k.default_model}
    assert "facexplain-fr-dlib128" in defaults and "facexplain-dfd-dlib128" in defaults
    seen: dict[str, list[str]] = {d: [] for d in defaults}
    for path in _product_files():
        tree = ast.parse(path.read_text(), str(path))
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in seen and id(node) not in skip:
                seen[node.value].append(f"{path.relative_to(REPO)}:{node.lineno}")
    for name, where in seen.items():
        module = defaults[name].load.__module__.replace(".", "/") + ".py"
        assert len(where) == 1 and where[0].startswith(module), f"{name!r} spelled at {where}"


def test_the_scan_sees_a_second_spelling() -> None:
    """The scan itself can fail: a literal kind in a comparison and in ``kind=`` is found."""
    tree = ast.parse('if meta["kind"] == "decoder":\n    f(kind="embedder")\nx = {"kind": "direction_set"}\n')
    assert sorted(v for _, v in _kind_uses(tree, {"decoder", "embedder", "direction_set"})) == [
        "decoder",
        "direction_set",
        "embedder",
    ]
