"""Policy over the rendered objects: every overlay passes, and each deliberately broken object fails."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.unit.k8s.conftest import BROKEN, REPO, by_name, policy

Obj = dict[str, Any]
Rendered = dict[str, list[Obj]]


@pytest.fixture(scope="module")
def known_env() -> set[str]:
    return set(policy.known_env_names())


@pytest.mark.parametrize("label", sorted({**policy.OVERLAYS, **policy.TRAINING, **policy.COMPOSED}))
def test_every_kustomization_passes_the_policy(rendered: Rendered, label: str, known_env: set[str]) -> None:
    objs = rendered[label]
    gpu, tls = label in policy.GPU_KUSTOMIZATIONS, label in policy.TLS_KUSTOMIZATIONS
    auth = label in policy.AUTH_KUSTOMIZATIONS
    assert policy.policy_violations(objs, gpu=gpu, version=policy.project_version(), tls=tls, auth=auth) == []
    assert policy.env_violations(objs, known_env) == []


def test_the_staging_overlay_would_not_pass_as_the_gpu_one(rendered: Rendered) -> None:
    problems = policy.gpu_violations(rendered["staging"])
    for name in ("embedding", "decoding", "directions", "attributes", "counterfactual"):
        where = f"Deployment/facexplain-{name}"
        assert f"{where} container server: no nvidia.com/gpu in limits" in problems
        assert f"{where} container server: no nvidia.com/gpu in requests" in problems
        assert f"{where}: does not tolerate the nvidia.com/gpu taint" in problems
    assert not [p for p in problems if "mlflow" in p or "postgres" in p], "only model servers need GPUs"


def test_a_broken_kustomization_fails_the_policy(kubectl: str) -> None:
    # tests/data/k8s/broken: the real base, with the embedding server missing its readiness probe,
    # running privileged, and every image on the `latest` tag.
    objs = policy.render(BROKEN, kubectl)
    problems = policy.policy_violations(objs, gpu=False, version=policy.project_version())
    assert "Deployment/facexplain-embedding container server: no readinessProbe" in problems
    assert "Deployment/facexplain-embedding container server: privileged container" in problems
    assert (
        "Deployment/facexplain-embedding container server: image 'facexplain/service:latest' uses the 'latest' tag"
        in problems
    )
    assert len(problems) == 7  # the three above + `latest` on the four other servers


def _server(objs: list[Obj], name: str = "facexplain-embedding") -> tuple[list[Obj], Obj, Obj]:
    """A copy of ``objs`` with the Deployment ``name`` and its first container, to break."""
    objs = copy.deepcopy(objs)
    dep = by_name(objs, "Deployment", name)
    return objs, dep, dep["spec"]["template"]["spec"]["containers"][0]


def _del(key: str) -> Callable[[Obj, Obj], object]:
    return lambda dep, c: c.pop(key)


def _set_sc(key: str, value: Any) -> Callable[[Obj, Obj], object]:
    return lambda dep, c: c["securityContext"].__setitem__(key, value)


def _image(image: str) -> Callable[[Obj, Obj], object]:
    return lambda dep, c: c.__setitem__("image", image)


def _pop_both(key: str) -> Callable[[Obj, Obj], object]:
    """Remove a securityContext field from the container and from its pod, so neither sets it."""

    def pop(dep: Obj, c: Obj) -> None:
        c["securityContext"].pop(key)
        dep["spec"]["template"]["spec"]["securityContext"].pop(key)

    return pop


def _pod(key: str, value: Any) -> Callable[[Obj, Obj], object]:
    return lambda dep, c: dep["spec"]["template"]["spec"].__setitem__(key, value)


BREAKS: dict[str, tuple[Callable[[Obj, Obj], object], str]] = {
    "no readiness probe": (_del("readinessProbe"), "container server: no readinessProbe"),
    "no liveness probe": (_del("livenessProbe"), "container server: no livenessProbe"),
    "no startup probe on a model server": (_del("startupProbe"), "container server: no startupProbe"),
    "no resources": (_del("resources"), "container server: no requests for cpu, memory"),
    "no memory limit": (
        lambda dep, c: c["resources"]["limits"].pop("memory"),
        "container server: no limits for memory",
    ),
    "privileged": (_set_sc("privileged", True), "container server: privileged container"),
    "writable root": (_set_sc("readOnlyRootFilesystem", False), "readOnlyRootFilesystem is not true"),
    "escalation allowed": (_set_sc("allowPrivilegeEscalation", True), "allowPrivilegeEscalation is not false"),
    "capabilities kept": (_set_sc("capabilities", {"drop": ["NET_RAW"]}), "capabilities do not drop ALL"),
    "capability added": (_set_sc("capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}), "adds capabilities"),
    "root allowed": (
        _pop_both("runAsNonRoot"),
        "runAsNonRoot is not true",
    ),
    "uid 0": (_set_sc("runAsUser", 0), "runs as uid 0"),
    "no seccomp": (
        _pop_both("seccompProfile"),
        "seccompProfile is not RuntimeDefault",
    ),
    "token mounted": (_pod("automountServiceAccountToken", True), "automountServiceAccountToken must be false"),
    "host network": (_pod("hostNetwork", True), "uses the host's network"),
    "latest tag": (_image("facexplain/service:latest"), "uses the 'latest' tag"),
    "untagged image": (_image("facexplain/service"), "has no tag"),
    "untagged image from a registry with a port": (_image("registry.local:5000/facexplain/service"), "has no tag"),
    "another version": (_image("facexplain/service:0.0.9"), "is not the project version"),
    "pull always": (lambda dep, c: c.__setitem__("imagePullPolicy", "Always"), "imagePullPolicy Always"),
    "unbounded scratch": (
        lambda dep, c: dep["spec"]["template"]["spec"]["volumes"][0]["emptyDir"].pop("sizeLimit"),
        "emptyDir tmp has no sizeLimit",
    ),
    "scratch over the storage limit": (
        lambda dep, c: c["resources"]["limits"].__setitem__("ephemeral-storage", "1Gi"),
        "ephemeral-storage limits allow",
    ),
    "pod labels no policy selects": (
        lambda dep, c: dep["spec"]["template"]["metadata"]["labels"].pop("facexplain.io/model-server"),
        "no NetworkPolicy selects it",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_each_broken_server_fails_the_policy(rendered: Rendered, case: str) -> None:
    objs, dep, container = _server(rendered["staging"])
    assert policy.policy_violations(objs, gpu=False, version=policy.project_version()) == []
    breaking, expected = BREAKS[case]
    breaking(dep, container)
    problems = policy.policy_violations(objs, gpu=False, version=policy.project_version())
    assert problems, f"{case}: no violation reported"
    assert any("facexplain-embedding" in p and expected in p for p in problems), problems


def test_a_digest_pins_an_image() -> None:
    assert policy.image_tag("docker.io/library/postgres@sha256:abc") == "sha256:abc"
    assert policy.image_tag("registry.local:5000/facexplain/service:0.1.0") == "0.1.0"
    assert policy.image_tag("registry.local:5000/facexplain/service") == ""


def test_a_job_is_held_to_the_same_hardening(rendered: Rendered) -> None:
    objs = copy.deepcopy(rendered["training-jobs"])
    job = by_name(objs, "Job", "facexplain-train-probes")
    c = job["spec"]["template"]["spec"]["containers"][0]
    c["securityContext"]["privileged"] = True
    c["image"] = "facexplain/service:latest"
    del c["resources"]["limits"]
    problems = policy.policy_violations(objs, gpu=False)
    assert "Job/facexplain-train-probes container train: privileged container" in problems
    assert "Job/facexplain-train-probes container train: no limits for cpu, memory" in problems
    assert any("Job/facexplain-train-probes" in p and "'latest'" in p for p in problems)
    assert not [p for p in problems if "Probe" in p], "a Job is not routed to: it needs no probes"


def test_a_service_selecting_no_pods_fails(rendered: Rendered) -> None:
    objs = copy.deepcopy(rendered["staging"])
    svc = by_name(objs, "Service", "facexplain-decoding")
    svc["spec"]["selector"] = {"app.kubernetes.io/name": "facexplain-decodnig"}
    assert policy.service_violations(objs) == [
        "Service/facexplain-decoding: selector {'app.kubernetes.io/name': 'facexplain-decodnig'} "
        "matches no Deployment/StatefulSet pods"
    ]


def test_a_service_targeting_an_undeclared_port_fails(rendered: Rendered) -> None:
    objs = copy.deepcopy(rendered["staging"])
    by_name(objs, "Service", "facexplain-mlflow")["spec"]["ports"][0]["targetPort"] = 5001
    (problem,) = policy.service_violations(objs)
    assert "targetPort 5001 is not a port of Deployment/facexplain-mlflow" in problem


def test_a_service_in_another_namespace_does_not_count(rendered: Rendered) -> None:
    objs = copy.deepcopy(rendered["staging"])
    by_name(objs, "Deployment", "facexplain-attributes")["metadata"]["namespace"] = "elsewhere"
    problems = policy.service_violations(objs)
    assert any(p.startswith("Service/facexplain-attributes:") for p in problems)


def test_dangling_references_fail(rendered: Rendered) -> None:
    objs = copy.deepcopy(rendered["gpu"])
    by_name(objs, "PodDisruptionBudget", "facexplain-directions")["spec"]["selector"]["matchLabels"] = {"x": "y"}
    by_name(objs, "HorizontalPodAutoscaler", "facexplain-embedding")["spec"]["scaleTargetRef"]["name"] = "nope"
    mlflow = by_name(objs, "Deployment", "facexplain-mlflow")["spec"]["template"]["spec"]
    mlflow["volumes"][0]["persistentVolumeClaim"]["claimName"] = "gone"
    assert policy.reference_violations(objs) == [
        "PodDisruptionBudget/facexplain-directions: selector {'x': 'y'} matches no workload's pods",
        "HorizontalPodAutoscaler/facexplain-embedding: scales Deployment/nope, which is not rendered",
        "Deployment/facexplain-mlflow: volume artifacts claims PVC gone, which is not rendered",
    ]
    # PostgreSQL's claim comes from its volumeClaimTemplate: not a dangling name.
    assert not [p for p in policy.reference_violations(rendered["gpu"]) if "postgres" in p]


def test_the_gpu_overlay_without_a_gpu_on_one_server_fails(rendered: Rendered) -> None:
    objs, _, c = _server(rendered["gpu"], "facexplain-counterfactual")
    del c["resources"]["limits"]["nvidia.com/gpu"]
    assert policy.policy_violations(objs, gpu=True, version=policy.project_version()) == [
        "Deployment/facexplain-counterfactual container server: no nvidia.com/gpu in limits"
    ]


def test_without_default_deny_every_workload_fails(rendered: Rendered) -> None:
    objs = [o for o in rendered["staging"] if o["metadata"]["name"] != "facexplain-default-deny-ingress"]
    problems = policy.network_violations(objs)
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(problems) == len(workloads) == 7


def test_an_unknown_setting_name_fails(rendered: Rendered, known_env: set[str]) -> None:
    assert {
        "FACEXPLAIN_REGISTRY_URI",
        "FACEXPLAIN_DEVICE",
        "FACEXPLAIN_METRICS_PORT",
        "FACEXPLAIN_VAR_DIR",
    } <= known_env
    objs = copy.deepcopy(rendered["staging"])
    by_name(objs, "ConfigMap", "facexplain-config")["data"]["FACEXPLAIN_REGISTRY_URL"] = "http://x"
    assert policy.env_violations(objs, known_env) == [
        "FACEXPLAIN_REGISTRY_URL: set in the manifests but read by no setting"
    ]


# -- TLS outside staging ------------------------------------------------------------------------------------


def test_every_overlay_but_staging_is_held_to_tls() -> None:
    assert (set(policy.OVERLAYS) | set(policy.COMPOSED)) - {
        "staging",
        "staging-torchserve",
    } == policy.TLS_KUSTOMIZATIONS


def test_the_staging_overlay_would_not_pass_as_a_tls_one(rendered: Rendered) -> None:
    problems = policy.tls_violations(rendered["staging"])
    for name in ("embedding", "decoding", "directions", "attributes", "counterfactual"):
        where = f"Deployment/facexplain-{name} container server"
        assert f"{where}: FACEXPLAIN_TLS_CERT_FILE is not set: no TLS on the gRPC port" in problems
        assert f"{where}: FACEXPLAIN_ALLOW_INSECURE is on (plaintext beyond loopback outside staging)" in problems
    assert len(problems) == 15, problems  # cert, key, allow-insecure x5; its probes already ask the health port
    assert not [p for p in problems if "mlflow" in p or "postgres" in p], "only model servers serve gRPC"


def test_a_kustomization_with_tls_undone_fails_the_tls_policy(kubectl: str) -> None:
    # tests/data/k8s/broken-tls: the real base with TLS undone four ways (see its kustomization.yaml).
    objs = policy.render(REPO / "tests" / "data" / "k8s" / "broken-tls", kubectl)
    assert policy.policy_violations(objs, gpu=False, version=policy.project_version()) == []
    problems = policy.policy_violations(objs, gpu=False, version=policy.project_version(), tls=True)
    dep = "Deployment/facexplain-{} container server: "
    assert sorted(problems) == sorted(
        [
            dep.format("embedding") + "readinessProbe asks port 50051, not the plaintext health port "
            "(FACEXPLAIN_HEALTH_PORT 8081): a gRPC probe speaks no TLS",
            dep.format("decoding") + "FACEXPLAIN_ALLOW_INSECURE is on (plaintext beyond loopback outside staging)",
            dep.format("directions") + "FACEXPLAIN_TLS_CERT_FILE /etc/facexplain/tls/tls.crt is on no mounted "
            "Secret volume",
            dep.format("directions") + "FACEXPLAIN_TLS_KEY_FILE /etc/facexplain/tls/tls.key is on no mounted "
            "Secret volume",
        ]
        + [
            f"NetworkPolicy/facexplain-model-servers: opens the plaintext health port (health) of "
            f"Deployment/facexplain-{name} to pods"
            for name in ("embedding", "decoding", "directions", "attributes", "counterfactual")
        ]
    )


def _config(key: str, value: str | None) -> Callable[[list[Obj]], object]:
    def change(objs: list[Obj]) -> None:
        data = by_name(objs, "ConfigMap", "facexplain-config")["data"]
        if value is None:
            data.pop(key)
        else:
            data[key] = value

    return change


def _embedding(change: Callable[[Obj, Obj], object]) -> Callable[[list[Obj]], object]:
    def apply(objs: list[Obj]) -> None:
        dep = by_name(objs, "Deployment", "facexplain-embedding")
        change(dep, dep["spec"]["template"]["spec"]["containers"][0])

    return apply


def _mount(**fields: Any) -> Callable[[Obj, Obj], object]:
    return lambda dep, c: next(m for m in c["volumeMounts"] if m["name"] == "tls").update(fields)


def _servers_policy_rule(rule: Obj) -> Callable[[list[Obj]], object]:
    return lambda objs: by_name(objs, "NetworkPolicy", "facexplain-model-servers")["spec"]["ingress"].append(rule)


TLS_BREAKS: dict[str, tuple[Callable[[list[Obj]], object], str]] = {
    "no key": (_config("FACEXPLAIN_TLS_KEY_FILE", None), "FACEXPLAIN_TLS_KEY_FILE is not set"),
    "empty certificate": (_config("FACEXPLAIN_TLS_CERT_FILE", ""), "FACEXPLAIN_TLS_CERT_FILE is not set"),
    "plaintext allowed": (_config("FACEXPLAIN_ALLOW_INSECURE", "true"), "FACEXPLAIN_ALLOW_INSECURE is on"),
    "no health port": (_config("FACEXPLAIN_HEALTH_PORT", None), "FACEXPLAIN_HEALTH_PORT is not set"),
    "health port off": (_config("FACEXPLAIN_HEALTH_PORT", "-1"), "FACEXPLAIN_HEALTH_PORT is not set"),
    "certificate outside the mount": (
        _config("FACEXPLAIN_TLS_CERT_FILE", "/var/lib/facexplain/tls.crt"),
        "FACEXPLAIN_TLS_CERT_FILE /var/lib/facexplain/tls.crt is on no mounted Secret volume",
    ),
    "client CA outside the mount": (
        _config("FACEXPLAIN_TLS_CLIENT_CA_FILE", "/tmp/ca.crt"),
        "FACEXPLAIN_TLS_CLIENT_CA_FILE /tmp/ca.crt is on no mounted Secret volume",
    ),
    "secret mounted by subPath": (
        _embedding(_mount(subPath="tls.crt")),
        "is mounted with subPath",
    ),
    "secret volume unmounted": (
        _embedding(lambda dep, c: c["volumeMounts"].remove(next(m for m in c["volumeMounts"] if m["name"] == "tls"))),
        "FACEXPLAIN_TLS_CERT_FILE /etc/facexplain/tls/tls.crt is on no mounted Secret volume",
    ),
    "health port is the gRPC port": (
        _embedding(lambda dep, c: c["env"].append({"name": "FACEXPLAIN_HEALTH_PORT", "value": "50051"})),
        "FACEXPLAIN_HEALTH_PORT 50051 is the gRPC port",
    ),
    "liveness probe on the TLS port": (
        _embedding(lambda dep, c: c["livenessProbe"]["grpc"].__setitem__("port", 50051)),
        "livenessProbe asks port 50051, not the plaintext health port",
    ),
    "startup probe on the TLS port": (
        _embedding(lambda dep, c: c["startupProbe"]["grpc"].__setitem__("port", 50051)),
        "startupProbe asks port 50051",
    ),
    "health port opened by number": (
        _servers_policy_rule({"from": [{"podSelector": {}}], "ports": [{"port": 8081, "protocol": "TCP"}]}),
        "opens the plaintext health port (8081) of Deployment/facexplain-embedding",
    ),
    "health port inside an opened range": (
        _servers_policy_rule({"from": [{"podSelector": {}}], "ports": [{"port": 8000, "endPort": 8100}]}),
        "opens the plaintext health port (8000) of Deployment/facexplain-embedding",
    ),
    "every port opened": (
        _servers_policy_rule({"from": [{"podSelector": {}}]}),
        "an ingress rule opens every port of Deployment/facexplain-embedding",
    ),
}


@pytest.mark.parametrize("case", sorted(TLS_BREAKS))
def test_each_tls_break_fails_the_tls_policy(rendered: Rendered, case: str) -> None:
    objs = copy.deepcopy(rendered["gpu"])
    assert policy.tls_violations(objs) == []
    breaking, expected = TLS_BREAKS[case]
    breaking(objs)
    problems = policy.tls_violations(objs)
    assert any("facexplain-embedding" in p and expected in p for p in problems), problems


def test_a_projected_secret_counts_and_a_policy_elsewhere_does_not(rendered: Rendered) -> None:
    objs = copy.deepcopy(rendered["gpu"])
    spec = by_name(objs, "Deployment", "facexplain-embedding")["spec"]["template"]["spec"]
    (tls,) = [v for v in spec["volumes"] if v["name"] == "tls"]
    tls["projected"] = {"sources": [{"secret": tls.pop("secret")}]}
    # A policy in another namespace opening every port selects none of these pods.
    objs.append(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "elsewhere", "namespace": "other"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]},
        }
    )
    assert policy.tls_violations(objs) == []
    tls["projected"]["sources"].append({"configMap": {"name": "facexplain-config"}})
    assert "is on no mounted Secret volume" in " ".join(policy.tls_violations(objs))


# -- authentication outside staging --------------------------------------------------------------------------


def test_every_overlay_but_staging_is_held_to_auth() -> None:
    assert (set(policy.OVERLAYS) | set(policy.COMPOSED)) - {
        "staging",
        "staging-torchserve",
    } == policy.AUTH_KUSTOMIZATIONS


def test_the_staging_overlay_would_not_pass_as_an_authenticated_one(rendered: Rendered) -> None:
    problems = policy.auth_violations(rendered["staging"])
    assert sorted(problems) == sorted(
        f"Deployment/facexplain-{name} container server: neither FACEXPLAIN_AUTH_TOKENS_FILE nor "
        "FACEXPLAIN_AUTH_JWKS_FILE is set: any caller may call any RPC"
        for name in ("embedding", "decoding", "directions", "attributes", "counterfactual")
    )


def test_the_gpu_overlay_reads_its_tokens_from_the_auth_secret(rendered: Rendered) -> None:
    objs = rendered["gpu"]
    assert by_name(objs, "ConfigMap", "facexplain-config")["data"]["FACEXPLAIN_AUTH_TOKENS_FILE"] == (
        "/etc/facexplain/auth/tokens.json"
    )
    for name in ("embedding", "decoding", "directions", "attributes", "counterfactual"):
        spec = by_name(objs, "Deployment", f"facexplain-{name}")["spec"]["template"]["spec"]
        (auth,) = [v for v in spec["volumes"] if v["name"] == "auth"]
        assert auth["secret"]["secretName"] == "facexplain-auth"
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "auth"]
        assert mount == {"name": "auth", "mountPath": "/etc/facexplain/auth", "readOnly": True}


def test_the_jwt_component_passes_with_issuer_and_audience(kubectl: str) -> None:
    # tests/data/k8s/gpu-jwt: the gpu overlay + k8s/components/jwt + the issuer and audience an operator sets.
    objs = policy.render(REPO / "tests" / "data" / "k8s" / "gpu-jwt", kubectl)
    assert policy.schema_violations(objs) == []
    version = policy.project_version()
    assert policy.policy_violations(objs, gpu=True, version=version, tls=True, auth=True) == []
    data = by_name(objs, "ConfigMap", "facexplain-config")["data"]
    assert data["FACEXPLAIN_AUTH_JWKS_FILE"] == "/etc/facexplain/auth/jwks.json"
    assert data["FACEXPLAIN_AUTH_TOKENS_FILE"] == "/etc/facexplain/auth/tokens.json"  # both at once
    data.pop("FACEXPLAIN_AUTH_JWT_AUDIENCE")
    assert "FACEXPLAIN_AUTH_JWKS_FILE is set but FACEXPLAIN_AUTH_JWT_AUDIENCE is not" in " ".join(
        policy.auth_violations(objs)
    )


def test_a_kustomization_with_auth_undone_fails_the_auth_policy(kubectl: str) -> None:
    # tests/data/k8s/broken-auth: the real base with authentication undone four ways (see its kustomization.yaml).
    objs = policy.render(REPO / "tests" / "data" / "k8s" / "broken-auth", kubectl)
    version = policy.project_version()
    assert policy.policy_violations(objs, gpu=False, version=version, tls=True) == []
    problems = policy.policy_violations(objs, gpu=False, version=version, tls=True, auth=True)
    dep = "Deployment/facexplain-{} container server: "
    assert sorted(problems) == sorted(
        [
            dep.format("embedding") + "neither FACEXPLAIN_AUTH_TOKENS_FILE nor FACEXPLAIN_AUTH_JWKS_FILE is set: "
            "any caller may call any RPC",
            dep.format("decoding") + "FACEXPLAIN_AUTH_TOKENS_FILE /etc/facexplain/auth/tokens.json is on no "
            "mounted Secret volume",
            dep.format("directions") + "FACEXPLAIN_AUTH_TOKENS_FILE /etc/facexplain/auth/tokens.json is mounted "
            "with subPath (a rotated Secret never reaches it)",
            dep.format("attributes") + "FACEXPLAIN_AUTH_JWKS_FILE is set but FACEXPLAIN_AUTH_JWT_ISSUER is not",
            dep.format("attributes") + "FACEXPLAIN_AUTH_JWKS_FILE is set but FACEXPLAIN_AUTH_JWT_AUDIENCE is not",
        ]
    )


AUTH_BREAKS: dict[str, tuple[Callable[[list[Obj]], object], str]] = {
    "no tokens file": (_config("FACEXPLAIN_AUTH_TOKENS_FILE", None), "neither FACEXPLAIN_AUTH_TOKENS_FILE nor"),
    "blank tokens file": (_config("FACEXPLAIN_AUTH_TOKENS_FILE", " "), "neither FACEXPLAIN_AUTH_TOKENS_FILE nor"),
    "tokens outside the mount": (
        _config("FACEXPLAIN_AUTH_TOKENS_FILE", "/var/lib/facexplain/tokens.json"),
        "FACEXPLAIN_AUTH_TOKENS_FILE /var/lib/facexplain/tokens.json is on no mounted Secret volume",
    ),
    "JWKS outside the mount": (
        _config("FACEXPLAIN_AUTH_JWKS_FILE", "/tmp/jwks.json"),
        "FACEXPLAIN_AUTH_JWKS_FILE /tmp/jwks.json is on no mounted Secret volume",
    ),
    "auth secret unmounted": (
        _embedding(lambda dep, c: c["volumeMounts"].remove(next(m for m in c["volumeMounts"] if m["name"] == "auth"))),
        "FACEXPLAIN_AUTH_TOKENS_FILE /etc/facexplain/auth/tokens.json is on no mounted Secret volume",
    ),
    "auth secret by subPath": (
        _embedding(lambda dep, c: next(m for m in c["volumeMounts"] if m["name"] == "auth").update(subPath="x")),
        "is mounted with subPath",
    ),
    "embedding server opts out": (
        _embedding(lambda dep, c: c["env"].append({"name": "FACEXPLAIN_AUTH_TOKENS_FILE", "value": ""})),
        "neither FACEXPLAIN_AUTH_TOKENS_FILE nor",
    ),
}


@pytest.mark.parametrize("case", sorted(AUTH_BREAKS))
def test_each_auth_break_fails_the_auth_policy(rendered: Rendered, case: str) -> None:
    objs = copy.deepcopy(rendered["gpu"])
    assert policy.auth_violations(objs) == []
    breaking, expected = AUTH_BREAKS[case]
    breaking(objs)
    problems = policy.auth_violations(objs)
    assert any("facexplain-embedding" in p and expected in p for p in problems), problems


# -- TorchServe: plaintext, exempt from TLS and auth by name, held to its NetworkPolicy fence ----------------


def test_only_the_torchserve_deployment_is_exempt_from_tls_and_auth(rendered: Rendered) -> None:
    assert set(policy.PLAINTEXT_SERVERS) == {"Deployment/facexplain-torchserve"}
    objs = copy.deepcopy(rendered["gpu-torchserve"])
    assert policy.tls_violations(objs) == [] and policy.auth_violations(objs) == []
    # The same pod under another name is a model server like any other: no TLS Secret, no tokens Secret.
    twin = copy.deepcopy(by_name(objs, "Deployment", "facexplain-torchserve"))
    twin["metadata"]["name"] = "facexplain-torchserve-2"
    objs.append(twin)
    where = "Deployment/facexplain-torchserve-2 container torchserve: "
    assert where + "FACEXPLAIN_TLS_CERT_FILE /etc/facexplain/tls/tls.crt is on no mounted Secret volume" in (
        policy.tls_violations(objs)
    )
    assert where + "FACEXPLAIN_AUTH_TOKENS_FILE /etc/facexplain/auth/tokens.json is on no mounted Secret volume" in (
        policy.auth_violations(objs)
    )
    exempt = "Deployment/facexplain-torchserve container"  # the original stays exempt
    assert not [p for p in policy.tls_violations(objs) + policy.auth_violations(objs) if p.startswith(exempt)]


def _torchserve_rule(rule: Obj) -> Callable[[list[Obj]], object]:
    return lambda objs: by_name(objs, "NetworkPolicy", "facexplain-torchserve")["spec"]["ingress"].append(rule)


def _unselected(objs: list[Obj]) -> None:
    by_name(objs, "Deployment", "facexplain-torchserve")["spec"]["template"]["metadata"]["labels"] = {"x": "y"}


_CLIENTS = {"podSelector": {"matchLabels": {"facexplain.io/client": "true"}}}
FENCE_BREAKS: dict[str, tuple[Callable[[list[Obj]], object], str]] = {
    "no policy selects it": (_unselected, "serves plaintext and no NetworkPolicy selects it"),
    "any source": (_torchserve_rule({"ports": [{"port": "http"}]}), "an ingress rule admits any source"),
    "every port": (_torchserve_rule({"from": [_CLIENTS]}), "an ingress rule opens every port"),
    "ipBlock": (
        _torchserve_rule({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": "http"}]}),
        "admits an ipBlock",
    ),
    "unlabelled pods": (
        _torchserve_rule({"from": [{"podSelector": {}}], "ports": [{"port": "grpc"}]}),
        'admits pods not labelled facexplain.io/client: "true"',
    ),
    "monitoring on inference": (
        _torchserve_rule(
            {
                "from": [{"namespaceSelector": {"matchLabels": {"facexplain.io/monitoring": "true"}}}],
                "ports": [{"port": "http"}],
            }
        ),
        'admits pods not labelled facexplain.io/client: "true"',
    ),
}


@pytest.mark.parametrize("case", sorted(FENCE_BREAKS))
def test_each_fence_break_fails_the_policy(rendered: Rendered, case: str) -> None:
    objs = copy.deepcopy(rendered["gpu-torchserve"])
    assert policy.fence_violations(objs) == []
    breaking, expected = FENCE_BREAKS[case]
    breaking(objs)
    problems = policy.policy_violations(objs, gpu=True, version=policy.project_version(), tls=True, auth=True)
    assert any("facexplain-torchserve" in p and expected in p for p in problems), problems


def test_the_torchserve_component_needs_a_gpu_on_gpu_overlays(rendered: Rendered) -> None:
    objs = copy.deepcopy(rendered["gpu-torchserve"])
    spec = by_name(objs, "Deployment", "facexplain-torchserve")["spec"]["template"]["spec"]
    for part in ("requests", "limits"):
        spec["containers"][0]["resources"][part].pop("nvidia.com/gpu")
    assert "Deployment/facexplain-torchserve container torchserve: no nvidia.com/gpu in limits" in (
        policy.gpu_violations(objs)
    )
