"""What the manifests set is what the servers read: each rendered server's environment parses into its
settings class with the values the manifests mean (a typo'd value would fail at pod start, not here)."""

from __future__ import annotations

import json
import os
import shutil
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.kit import tls
from services.kit.config import ServiceSettings
from tests.certs import issue, make_ca
from tests.unit.k8s.conftest import REPO, by_name, policy

Rendered = dict[str, list[dict[str, Any]]]
PORTS = {"embedding": 50051, "decoding": 50052, "directions": 50053, "attributes": 50054, "counterfactual": 50055}


def _settings_class(service: str) -> Any:
    from services.attributes.settings import AttributesSettings
    from services.counterfactual.settings import CounterfactualSettings
    from services.decoding.settings import DecodingSettings
    from services.directions.settings import DirectionsSettings
    from services.kit.config import ServiceSettings

    return {
        "embedding": ServiceSettings,
        "decoding": DecodingSettings,
        "directions": DirectionsSettings,
        "attributes": AttributesSettings,
        "counterfactual": CounterfactualSettings,
    }[service]


def pod_env(objs: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    """The environment a container of ``deployment`` starts with (ConfigMaps from envFrom, then env)."""
    (c,) = by_name(objs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        if "configMapRef" in src:
            env.update(by_name(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env") or [] if "value" in e})
    return env


@pytest.mark.parametrize("overlay", ["staging", "gpu"])
@pytest.mark.parametrize("service", sorted(PORTS))
def test_server_environment_parses_into_its_settings(
    rendered: Rendered, overlay: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("FACEXPLAIN_")]:
        monkeypatch.delenv(name)
    env = pod_env(rendered[overlay], f"facexplain-{service}")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = _settings_class(service)()
    assert settings.port == PORTS[service]
    assert settings.host == "0.0.0.0" and settings.metrics_port == 9090 and settings.metrics_enabled
    assert settings.registry_uri == "http://facexplain-mlflow:5000"
    assert settings.device == {"staging": "cpu", "gpu": "cuda"}[overlay]
    # Writable on a read-only root: both live on the emptyDir mounted at /var/lib/facexplain.
    assert settings.model_cache_dir.startswith("/var/lib/facexplain/")
    pod = by_name(rendered[overlay], "Deployment", f"facexplain-{service}")["spec"]["template"]["spec"]
    assert settings.grace_period_s < pod["terminationGracePeriodSeconds"], "drain must end before the SIGKILL"
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts >= {"/tmp", env["FACEXPLAIN_VAR_DIR"]}
    # The kubelet's gRPC probes (no TLS) ask the plaintext health port the server opens.
    container = pod["containers"][0]
    assert settings.health_port == 8081
    assert {container[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {8081}


def bind_as_the_pod(objs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Bind (never start: nothing answers) a bare gRPC server as the embedding pod's environment says, with
    the TLS files it names laid out under ``tmp_path`` as the mounted Secret would hold them."""
    for name in [n for n in os.environ if n.startswith("FACEXPLAIN_")]:
        monkeypatch.delenv(name)
    env = pod_env(objs, "facexplain-embedding")
    ca = make_ca(tmp_path / "ca")
    leaf = issue(ca, tmp_path / "issued", "facexplain-embedding", server=True)
    made = {
        "FACEXPLAIN_TLS_CERT_FILE": leaf.cert_file,
        "FACEXPLAIN_TLS_KEY_FILE": leaf.key_file,
        "FACEXPLAIN_TLS_CLIENT_CA_FILE": ca.cert_file,
    }
    for key in [k for k in made if env.get(k)]:
        target = tmp_path / env[key].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(made[key], target)
        env[key] = str(target)
    for name, value in {**env, "FACEXPLAIN_PORT": "0"}.items():
        monkeypatch.setenv(name, value)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        return tls.bind(server, ServiceSettings())
    finally:
        server.stop(0)


@pytest.mark.parametrize("overlay", ["staging", "gpu"])
def test_servers_bind_the_pod_address_with_tls_outside_staging(
    rendered: Rendered, overlay: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The kit binds only the pod's loopback when it has neither TLS nor FACEXPLAIN_ALLOW_INSECURE, out of
    reach of Services and probes: each overlay's environment must make it bind the pod address, staging in
    plaintext, the gpu overlay with the certificate of the mounted Secret."""
    host, port, certificates = bind_as_the_pod(rendered[overlay], monkeypatch, tmp_path)
    assert host == "0.0.0.0" and port > 0
    assert (certificates is not None) == (overlay == "gpu")
    if certificates is not None:
        assert certificates.files.client_ca is None  # server-authenticated; k8s/components/mtls adds the CA


def test_the_mtls_component_makes_the_gpu_overlay_mutual(
    kubectl: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # tests/data/k8s/gpu-mtls: the gpu overlay + k8s/components/mtls, as an operator would compose them.
    objs = policy.render(REPO / "tests" / "data" / "k8s" / "gpu-mtls", kubectl)
    assert policy.schema_violations(objs) == []
    assert policy.policy_violations(objs, gpu=True, version=policy.project_version(), tls=True) == []
    host, _, certificates = bind_as_the_pod(objs, monkeypatch, tmp_path)
    assert host == "0.0.0.0" and certificates is not None
    assert certificates.files.client_ca == tmp_path / "etc/facexplain/tls/ca.crt"  # ca.crt of the same Secret


@pytest.mark.parametrize("overlay", ["staging", "gpu", "gpu-jwt"])
def test_servers_authenticate_with_the_auth_secret_outside_staging(
    rendered: Rendered, kubectl: str, overlay: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The credentials the kit builds from the embedding pod's environment, with tokens.json and jwks.json laid
    out under ``tmp_path`` as the facexplain-auth Secret would hold them: none in staging, the tokens file in
    the gpu overlay, and tokens file and JWKS together with k8s/components/jwt (tests/data/k8s/gpu-jwt)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from services.kit.server import authenticator

    objs = rendered[overlay] if overlay in rendered else policy.render(REPO / "tests/data/k8s" / overlay, kubectl)
    for name in [n for n in os.environ if n.startswith("FACEXPLAIN_")]:
        monkeypatch.delenv(name)
    env = pod_env(objs, "facexplain-embedding")
    jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True)
    made = {
        "FACEXPLAIN_AUTH_TOKENS_FILE": '{"tokens": [{"principal": "ops", "sha256": "' + "0" * 64 + '", '
        '"scopes": ["admin"]}]}',
        "FACEXPLAIN_AUTH_JWKS_FILE": json.dumps({"keys": [jwk | {"kid": "k1"}]}),
    }
    for key in [k for k in made if env.get(k)]:
        assert env[key].startswith("/etc/facexplain/auth/")  # the Secret's mount (policy: auth_violations)
        target = tmp_path / env[key].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(made[key])
        env[key] = str(target)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    auth = authenticator(ServiceSettings())
    if overlay == "staging":
        assert auth is None
        return
    assert auth is not None and auth.store is not None
    assert (auth.jwt is not None) == (overlay == "gpu-jwt")
