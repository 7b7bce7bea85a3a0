"""Rendered manifests for the k8s tests: every overlay and training kustomization, rendered once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
BROKEN = REPO / "tests" / "data" / "k8s" / "broken"


def load_policy() -> ModuleType:
    # scripts/ is not a package: load the module from its file, as `python scripts/k8s_policy.py` does
    spec = importlib.util.spec_from_file_location("k8s_policy", REPO / "scripts" / "k8s_policy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["k8s_policy"] = module
    spec.loader.exec_module(module)
    return module


policy = load_policy()


@pytest.fixture(scope="session")
def kubectl() -> str:
    # No skip: without kubectl nothing here would be checked, so the tests fail and say how to get it.
    try:
        return str(policy.find_kubectl())
    except policy.KubectlMissingError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    """label -> rendered objects, for every kustomization `make k8s-validate` checks."""
    targets = {**policy.OVERLAYS, **policy.TRAINING, **policy.COMPOSED}
    return {label: policy.render(path, kubectl) for label, path in targets.items()}


def by_name(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]
