"""Every rendered object validates strictly against the Kubernetes 1.31 schemas, offline."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.unit.k8s.conftest import by_name, policy

Rendered = dict[str, list[dict[str, Any]]]


def test_bundled_schemas_include_1_31_strict() -> None:
    assert "1.31.0" in kubernetes_validate.utils.all_versions()
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    assert (root / "v1.31.0-local-strict" / "deployment-apps-v1.json").is_file()


@pytest.mark.parametrize("label", sorted({**policy.OVERLAYS, **policy.TRAINING, **policy.COMPOSED}))
def test_rendered_objects_validate_strictly(rendered: Rendered, label: str) -> None:
    assert policy.schema_violations(rendered[label], "1.31.0") == []


def test_kubernetes_validate_command_accepts_the_staging_overlay(rendered: Rendered, tmp_path: Path) -> None:
    # The console script set-up installs (.venv/bin/kubernetes-validate), as an operator would run it.
    out = tmp_path / "staging.yaml"
    out.write_text(yaml.safe_dump_all(rendered["staging"]))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run(
        [str(exe), "-k", "1.31.0", "--strict", "--quiet", str(out)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_strict_validation_rejects_a_misspelt_field(rendered: Rendered) -> None:
    dep = copy.deepcopy(by_name(rendered["staging"], "Deployment", "facexplain-embedding"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    (problem,) = policy.schema_violations([dep])
    assert "Deployment/facexplain-embedding" in problem and "readinesProbe" in problem


def test_validation_rejects_a_wrong_type_and_an_unknown_kind(rendered: Rendered) -> None:
    svc = copy.deepcopy(by_name(rendered["staging"], "Service", "facexplain-embedding"))
    svc["spec"]["ports"][0]["port"] = "fifty"
    unknown = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}}
    problems = policy.schema_violations([svc, unknown])
    assert len(problems) == 2
    assert "spec.ports.0.port" in problems[0]
    assert "no Kubernetes 1.31.0 schema" in problems[1]


def test_pytorchjob_pods_are_validated_through_their_templates(rendered: Rendered) -> None:
    job = copy.deepcopy(next(o for o in rendered["training-pytorchjob"] if o["kind"] == "PyTorchJob"))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    (problem,) = policy.schema_violations([job])
    assert "[Worker]" in problem and "comand" in problem
