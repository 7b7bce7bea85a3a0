"""The import-layer check (scripts/check_layers.py): upward imports and cycles are caught, however hidden."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "check_layers.py"


def _load() -> ModuleType:
    # scripts/ is not a package: load the checker from its file, as `python scripts/check_layers.py` does
    spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_layers"] = module
    spec.loader.exec_module(module)
    return module


check_layers = _load()


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Files under root (packages get their __init__.py automatically)."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            if parent != Path(".") and parent.parts[0] != "scripts":
                (root / parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(text))
    return root


CLEAN = {
    "facexplain/faces/detect.py": "import numpy\n",
    "facexplain/models/net.py": "from facexplain.faces import detect\nfrom ..faces.detect import x\n",
    "registry/client.py": "from facexplain.models.net import Net\n",
    "services/api/v1/common_pb2.py": "",
    "services/kit/server.py": "from registry.client import resolve\nfrom services.api.v1 import common_pb2\n",
    "services/embedding/service.py": "from services.kit import server\nfrom . import settings\n",
    "services/embedding/settings.py": "from services.kit.server import Settings\n",
    "services/decoding/service.py": "from services.kit.server import build\n",
    "training/decoder/run.py": "from registry import client\nfrom facexplain.models import net\n",
    "sdk/client.py": "from services.api.v1 import common_pb2\nfrom registry.client import resolve\n",
    "cli/main.py": """\
        import importlib
        from sdk import client
        from services.embedding import service

        def train(name):
            return importlib.import_module(f"training.{name}.run")
        """,
    "tests/test_x.py": "from cli import main\nfrom services.kit import server\nfrom training.decoder import run\n",
    "scripts/demo.py": "from cli.main import train\n",
}


def problems(root: Path) -> tuple[list[str], list[list[Any]]]:
    graph = check_layers.build_graph(root)
    return check_layers.layer_violations(graph), check_layers.cycles(graph)


def test_a_clean_tree_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_tree(tmp_path, CLEAN)
    graph = check_layers.build_graph(root)
    assert "services.kit.server" in graph.modules and "scripts.demo" in graph.modules
    # relative and `from pkg import module` forms resolve to the module itself
    targets = {(e.source, e.target) for e in graph.edges}
    assert ("facexplain.models.net", "facexplain.faces.detect") in targets
    assert ("services.embedding.service", "services.embedding.settings") in targets
    assert ("cli.main", "training") in targets  # the constant prefix of the f-string
    assert problems(root) == ([], [])
    assert check_layers.main(["--root", str(root)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].endswith("OK")


@pytest.mark.parametrize(
    ("rel", "source", "rule"),
    [
        # the core may not reach up into services
        ("facexplain/faces/detect.py", "import services.kit.server\n", "upward"),
        # sdk may use the generated stubs only
        ("sdk/client.py", "from services.kit import server\n", "services.api"),
        ("sdk/client.py", "from training.decoder.run import fit\n", "sdk may not import training"),
        # a lazy import inside a function is still an import
        ("registry/client.py", "def f():\n    from training.decoder import run\n", "upward"),
        # and so is a dynamic one, even from a method
        (
            "facexplain/models/net.py",
            "import importlib\nclass A:\n    def f(self):\n        return importlib.import_module('training.x')\n",
            "upward",
        ),
        ("facexplain/models/net.py", "def f(n):\n    return __import__(f'registry.{n}')\n", "upward"),
        # type-only imports count for the layers
        (
            "facexplain/models/net.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sdk.client import Client\n",
            "upward",
        ),
        ("services/kit/server.py", "from services.embedding.settings import S\n", "services.kit"),
        ("services/decoding/service.py", "from ..embedding import settings\n", "another"),
        ("services/kit/server.py", "from training.decoder import run\n", "each other"),
        ("training/decoder/run.py", "import services.kit.server\n", "each other"),
        ("cli/main.py", "from tests import test_x\n", "sit on top"),
        ("facexplain/faces/detect.py", "from scripts.demo import x\n", "sit on top"),
    ],
)
def test_a_forbidden_import_is_reported(tmp_path: Path, rel: str, source: str, rule: str) -> None:
    root = write_tree(tmp_path, {**CLEAN, rel: source})
    violations, _ = problems(root)
    assert len(violations) == 1, violations
    module = rel.removesuffix(".py").replace("/", ".")
    assert violations[0].startswith(f"{module} ({rel}:")
    assert rule in violations[0]
    assert check_layers.main(["--root", str(root)]) == 1


def test_a_cycle_through_a_function_level_import_is_reported(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            **CLEAN,
            "facexplain/faces/a.py": "from facexplain.faces import b\n",
            "facexplain/faces/b.py": "def f():\n    from . import a\n    return a\n",
        },
    )
    violations, found = problems(root)
    assert violations == []
    assert len(found) == 1
    assert [(e.source, e.target, e.kind) for e in found[0]] == [
        ("facexplain.faces.a", "facexplain.faces.b", "module"),
        ("facexplain.faces.b", "facexplain.faces.a", "function"),
    ]
    assert found[0][1].where == "facexplain/faces/b.py:2"


def test_type_checking_imports_make_no_cycle(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            **CLEAN,
            "facexplain/faces/a.py": "from facexplain.faces import b\n",
            "facexplain/faces/b.py": (
                "import typing\nif typing.TYPE_CHECKING:\n    from . import a\nelse:\n    a = None\n"
            ),
        },
    )
    assert problems(root) == ([], [])


def test_the_repository_keeps_its_layers() -> None:
    graph = check_layers.build_graph(REPO)
    assert len(graph.modules) > 100
    assert check_layers.layer_violations(graph) == []
    assert [[e.source for e in c] for c in check_layers.cycles(graph)] == []
