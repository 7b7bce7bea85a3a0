"""What the manifests set is what the servers read: each rendered server's environment parses into its
settings class with the values the manifests mean (a typo'd value would fail at pod start, not here)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.unit.k8s.conftest import by_name

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
