"""Staging without a cluster: the rendered ``k8s/overlays/staging`` as real containers with ``podman kube play``.

facexplain staging up --podman      translate, play PostgreSQL + MLflow, register the defaults, play the servers
facexplain staging test --podman    health checks, tests/e2e against the published ports; logs on failure
facexplain staging down --podman    remove the pods, secrets, volumes and the network
facexplain staging check --podman   exit 0 when podman can run containers here and the images exist

The overlay stays what a real cluster gets. :func:`translate` is the one place that adapts the rendered
objects (``kubectl kustomize``, exactly what ``facexplain staging up`` applies to a cluster) to what podman
4.3 (Debian bookworm) accepts, each adaptation measured on this kind of machine:

1. Deployments and StatefulSets become Pods, named after the Service that selects them. podman ignores
   Services; on a podman network with DNS a pod resolves by its name, so ``http://facexplain-mlflow:5000``
   and ``facexplain-postgres:5432`` in the ConfigMap and MLflow's arguments keep working unchanged. One
   replica each (podman cannot give one name to two pods): more is an error, not a silent downscale.
2. Secrets become podman secrets (``kube play`` rejects Secret objects). podman 4.3 reads a
   ``secretKeyRef`` from a secret whose content is a JSON object of base64 values, keyed like ``data``.
3. Every ``containerPort`` gets a ``hostPort`` (a free one, chosen here) with ``hostIP: 127.0.0.1``;
   without a hostPort podman publishes on 0.0.0.0, which would put unauthenticated staging servers on
   the machine's network.
4. Probes are dropped: podman 4.3 has no gRPC probes, runs ``httpGet`` probes with a ``curl`` the images
   do not contain, and restarts nothing that turns unhealthy. The runner waits for health itself (gRPC
   health of every server, MLflow's ``/health``) and the tests check it; restartPolicy stays Always, so a
   crashed process (MLflow before PostgreSQL answers) is started again.
5. Images: ``facexplain/*`` resolve to the local ``localhost/facexplain/*`` builds, and
   ``docker.io/library/postgres`` (unreachable here) maps to ``localhost/facexplain/postgres:<version>``,
   Debian's PostgreSQL built from the project's base (k8s/images/postgres.Containerfile); every image
   with ``imagePullPolicy: Never``, so nothing is pulled.
6. A StatefulSet's ``volumeClaimTemplates`` become named volumes (``<template>-<set>-0``, the name a
   cluster gives the claim); PVCs become podman volumes of the same name.
7. ``emptyDir`` volumes become pod-private tmpfs volumes ``<pod>-<volume>`` of the emptyDir's sizeLimit,
   owned by the pod's user and ``fsGroup``: podman 4.3 makes an emptyDir a volume named only after the
   volume (every pod's ``tmp`` was one shared directory) and copies ownership from wherever it first came
   from (PostgreSQL could not write its socket directory).
8. Cluster-only objects are left out and listed: Namespace, ServiceAccounts, NetworkPolicies,
   PodDisruptionBudgets, HPAs, ServiceMonitors, and the Services themselves.

Engine settings are not YAML: the runner gives podman its own containers.conf (``CONTAINERS_CONF``) with
``runtime = "runc"`` (crun fails on this machine's hybrid cgroup layout), ``cgroupfs`` and
``default_ulimits`` clipped to the machine's hard limits (a container asking for more fails to start).

Order mirrors ``facexplain staging up`` on a cluster: PostgreSQL and MLflow first, the default models
registered through the in-staging MLflow, then the model servers (a server turns SERVING only once it
holds its models).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = REPO / "var" / "staging-podman"
LOOPBACK = "127.0.0.1"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
PASSED_KINDS = ("ConfigMap", "PersistentVolumeClaim")  # what `podman kube play` takes as it is
CLUSTER_ONLY = (
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "ServiceMonitor",
    "Service",
)
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
# Pod-spec fields with no podman meaning; dropped so the played YAML says what actually runs.
CLUSTER_POD_FIELDS = ("serviceAccountName", "automountServiceAccountToken", "topologySpreadConstraints")
POSTGRES_UPSTREAM = "docker.io/library/postgres"
SERVICES = ("embedding", "decoding", "directions", "attributes", "counterfactual")
MLFLOW_POD = "facexplain-mlflow"

Obj = dict[str, Any]
HostPort = Callable[[str, str, int], int]  # (pod, port name, containerPort) -> host port


class PodmanStagingError(RuntimeError):
    """What the operator must fix: no podman, a missing image, a kind the translation does not know."""


def project_version() -> str:
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


def map_image(image: str, version: str) -> str:
    """The local image a rendered reference runs as (adaptation 5)."""
    if image.split(":", 1)[0].split("@", 1)[0] == POSTGRES_UPSTREAM:
        return f"localhost/facexplain/postgres:{version}"
    if image.startswith("facexplain/"):
        return f"localhost/{image}"
    return image


def free_port(_pod: str = "", _name: str = "", _port: int = 0) -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class Plan:
    """What ``up`` plays, ``test`` reaches and ``down`` removes (also written to plan.json)."""

    network: str
    secrets: dict[str, dict[str, str]]  # podman secret name -> {key: base64 value}
    volumes: list[str]
    tmpfs: dict[str, str]  # emptyDir stand-ins: volume name -> mount options (size, mode, uid, gid)
    registry_docs: list[Obj]  # ConfigMaps, PVCs, PostgreSQL and MLflow pods
    server_docs: list[Obj]  # the model-server pods
    published: dict[str, dict[str, str]]  # pod -> port name -> "127.0.0.1:<host port>"
    images: list[str]
    left_out: list[str] = field(default_factory=list)  # "Kind/name": cluster-only objects

    def pods(self) -> list[str]:
        return [d["metadata"]["name"] for d in (*self.registry_docs, *self.server_docs) if d["kind"] == "Pod"]

    def targets(self) -> dict[str, str]:
        """service -> gRPC address, the FACEXPLAIN_E2E_TARGETS of the published servers."""
        return {s: self.published[f"facexplain-{s}"]["grpc"] for s in SERVICES}

    def registry_uri(self) -> str:
        """MLflow through its published port, as ``localhost`` (MLflow 3 answers only the Host names in
        MLFLOW_SERVER_ALLOWED_HOSTS; the overlay lists localhost for the probes)."""
        return f"http://localhost:{self.published[MLFLOW_POD]['http'].rsplit(':', 1)[1]}"


def _selects(service: Obj, labels: dict[str, str]) -> bool:
    selector = service.get("spec", {}).get("selector") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_name(workload: Obj, services: Iterable[Obj]) -> str:
    """The name ``workload``'s pod answers to on a cluster (adaptation 1): a StatefulSet's governing Service
    (``serviceName``), else the one ClusterIP Service selecting it (headless ``-pods`` Services, for
    client-side round robin over replicas, have nothing to spread over here)."""
    services = list(services)
    what = f"{workload['kind']}/{workload['metadata']['name']}"
    governing = workload["spec"].get("serviceName")
    if workload["kind"] == "StatefulSet" and governing:
        if not any(s["metadata"]["name"] == governing for s in services):
            raise PodmanStagingError(f"{what}: its serviceName {governing} is not rendered")
        return str(governing)
    labels = workload["spec"]["template"]["metadata"].get("labels", {})
    names = [
        s["metadata"]["name"] for s in services if s.get("spec", {}).get("clusterIP") != "None" and _selects(s, labels)
    ]
    if len(names) != 1:
        raise PodmanStagingError(f"{what}: {len(names)} Services select it ({names}); podman needs exactly one name")
    return names[0]


def podman_secret(secret: Obj) -> dict[str, str]:
    """A Secret's content as podman 4.3's secretKeyRef reads it: {key: base64} (adaptation 2)."""
    data = dict(secret.get("data") or {})
    for key, value in (secret.get("stringData") or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    return data


def size_bytes(quantity: str) -> int:
    """A Kubernetes quantity (``512Mi``, ``2Gi``, ``100M``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def emptydir_volumes(pod: str, spec: Obj) -> dict[str, str]:
    """Each emptyDir of ``spec`` as a claim on a pod-private tmpfs volume (adaptation 7): name -> options."""
    security = spec.get("securityContext") or {}
    users = {
        (c.get("securityContext") or {}).get("runAsUser", security.get("runAsUser", 0)) for c in spec["containers"]
    }
    if len(users) != 1:
        raise PodmanStagingError(f"{pod}: containers run as several users {sorted(users)}; whose is an emptyDir?")
    uid = users.pop()
    gid = security.get("fsGroup", security.get("runAsGroup", uid))
    out = {}
    for volume in spec.get("volumes", []):
        if "emptyDir" not in volume:
            continue
        limit = (volume["emptyDir"] or {}).get("sizeLimit", "64Mi")
        name = f"{pod}-{volume['name']}"
        # nr_blocks (4 KiB pages), not size: podman 4.3 takes size= for a disk quota and refuses it here
        out[name] = f"nr_blocks={-(-size_bytes(str(limit)) // 4096)},mode=1777,uid={uid},gid={gid}"
        volume.pop("emptyDir")
        volume["persistentVolumeClaim"] = {"claimName": name}
    return out


def workload_pod(
    workload: Obj, name: str, version: str, host_port: HostPort
) -> tuple[Obj, dict[str, str], dict[str, str]]:
    """One Deployment/StatefulSet as one Pod, the ports it publishes (name -> 127.0.0.1:port) and its tmpfs
    volumes (name -> mount options)."""
    what = f"{workload['kind']}/{workload['metadata']['name']}"
    if int(workload["spec"].get("replicas", 1)) != 1:
        raise PodmanStagingError(f"{what}: {workload['spec']['replicas']} replicas; podman staging runs one per name")
    template = copy.deepcopy(workload["spec"]["template"])
    spec = template["spec"]
    for key in CLUSTER_POD_FIELDS:
        spec.pop(key, None)
    spec["restartPolicy"] = "Always"
    for claim in workload["spec"].get("volumeClaimTemplates") or []:  # adaptation 6
        vname = claim["metadata"]["name"]
        claim_name = f"{vname}-{workload['metadata']['name']}-0"
        spec.setdefault("volumes", []).append({"name": vname, "persistentVolumeClaim": {"claimName": claim_name}})
    tmpfs = emptydir_volumes(name, spec)
    published: dict[str, str] = {}
    for container in spec.get("containers", []):
        for probe in PROBES:  # adaptation 4
            container.pop(probe, None)
        container["image"] = map_image(container["image"], version)  # adaptation 5
        container["imagePullPolicy"] = "Never"
        for port in container.get("ports", []):  # adaptation 3
            pname = port.get("name") or str(port["containerPort"])
            if pname in published:
                raise PodmanStagingError(f"{what}: two ports named {pname}")
            port["hostPort"] = host_port(name, pname, int(port["containerPort"]))
            port["hostIP"] = LOOPBACK
            published[pname] = f"{LOOPBACK}:{port['hostPort']}"
    meta = {"name": name, "labels": template["metadata"].get("labels", {})}
    if template["metadata"].get("annotations"):
        meta["annotations"] = template["metadata"]["annotations"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}, published, tmpfs


def is_registry_tier(pod: Obj) -> bool:
    """PostgreSQL and MLflow: played, and healthy, before the model servers (see the module doc)."""
    return pod["metadata"]["labels"].get("app.kubernetes.io/component") in ("registry", "registry-database")


def translate(objects: list[Obj], *, host_port: HostPort = free_port, version: str | None = None) -> Plan:
    """The rendered staging overlay as a podman plan; every adaptation is listed in the module doc."""
    version = version or project_version()
    services = [o for o in objects if o["kind"] == "Service"]
    namespaces = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    known = set(WORKLOAD_KINDS) | set(PASSED_KINDS) | set(CLUSTER_ONLY) | {"Secret"}
    unknown = sorted({o["kind"] for o in objects} - known)
    if unknown:
        raise PodmanStagingError(
            f"no podman translation for kind(s) {', '.join(unknown)}: add it to cli/podman_staging.py"
        )
    plan = Plan(
        network=namespaces[0] if len(namespaces) == 1 else "facexplain-staging",
        secrets={},
        volumes=[],
        tmpfs={},
        registry_docs=[],
        server_docs=[],
        published={},
        images=[],
    )
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind in CLUSTER_ONLY:
            plan.left_out.append(f"{kind}/{name}")
        elif kind == "Secret":
            plan.secrets[name] = podman_secret(obj)
        elif kind in PASSED_KINDS:
            doc = {"apiVersion": obj["apiVersion"], "kind": kind, "metadata": {"name": name}}
            doc.update({k: copy.deepcopy(v) for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")})
            plan.registry_docs.append(doc)
            if kind == "PersistentVolumeClaim":
                plan.volumes.append(name)
            else:  # `kube play` resolves a configMapRef only from the file it plays: both tiers get it
                plan.server_docs.append(copy.deepcopy(doc))
        elif kind in WORKLOAD_KINDS:
            pod, published, tmpfs = workload_pod(obj, pod_name(obj, services), version, host_port)
            plan.published[pod["metadata"]["name"]] = published
            plan.tmpfs.update(tmpfs)
            (plan.registry_docs if is_registry_tier(pod) else plan.server_docs).append(pod)
            for claim in pod["spec"].get("volumes", []):
                pvc = claim.get("persistentVolumeClaim", {}).get("claimName")
                if pvc and pvc not in plan.volumes and pvc not in tmpfs:
                    plan.volumes.append(pvc)
            plan.images += [c["image"] for c in pod["spec"]["containers"] if c["image"] not in plan.images]
    for doc in (*plan.registry_docs, *plan.server_docs):
        for volume in doc["spec"].get("volumes", []) if doc["kind"] == "Pod" else []:
            ref = volume.get("secret") or {}
            if ref and not ref.get("optional") and ref.get("secretName") not in plan.secrets:
                raise PodmanStagingError(
                    f"Pod {doc['metadata']['name']}: volume {volume['name']} mounts the Secret "
                    f"{ref.get('secretName')}, which the overlay does not render (a cluster would hold the pod "
                    "pending, podman would fail it); staging serves plaintext without auth: "
                    "k8s/overlays/staging/plaintext.yaml drops the base's TLS and auth Secrets"
                )
    missing = [f"facexplain-{s}" for s in SERVICES if f"facexplain-{s}" not in plan.published]
    if missing or MLFLOW_POD not in plan.published:
        raise PodmanStagingError(f"the overlay renders no pod for {', '.join(missing or [MLFLOW_POD])}")
    return plan


def dump(docs: list[Obj]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


# -- podman -------------------------------------------------------------------------------------------------


def containers_conf(path: Path) -> Path:
    """The engine settings podman needs here (module doc): runc, cgroupfs, ulimits within the hard limits."""
    limits = []
    for name, rlimit, want in (("nofile", resource.RLIMIT_NOFILE, 65536), ("nproc", resource.RLIMIT_NPROC, 32768)):
        hard = resource.getrlimit(rlimit)[1]
        n = want if hard == resource.RLIM_INFINITY else min(want, hard)
        limits.append(f'"{name}={n}:{n}"')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# written by cli/podman_staging.py for `facexplain staging --podman` (see its module doc)\n"
        f"[containers]\ndefault_ulimits = [{', '.join(limits)}]\n\n"
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    return path


class Podman:
    """``podman`` with the runner's containers.conf; every call's output is returned or raised with it."""

    def __init__(self, state: Path = STATE_DIR) -> None:
        self.exe = shutil.which("podman")
        if not self.exe:
            raise PodmanStagingError("podman is not installed: `make setup-podman` (Debian packages podman runc)")
        self.env = dict(os.environ, CONTAINERS_CONF=str(containers_conf(state / "containers.conf")))

    def run(self, *args: str, check: bool = True, timeout: float = 600, stdin: str | None = None) -> str:
        proc = subprocess.run(
            [str(self.exe), *args], env=self.env, input=stdin, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise PodmanStagingError(f"podman {' '.join(args[:3])} failed: {(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def ok(self, *args: str) -> bool:
        return subprocess.run([str(self.exe), *args], env=self.env, capture_output=True, timeout=120).returncode == 0


# What the service image copies from the checkout (k8s/images/service.Containerfile's COPY lines): an image
# built from other contents would stage old code under a current name.
# README.md is copied too (pyproject names it) but is left out: a documentation change does not make
# another image, and rebuilding 2 GB for it would only slow staging down.
SOURCE_PATHS = (
    "pyproject.toml", "requirements.lock", "facexplain", "registry", "services", "training",
    "sdk", "cli", "protos", "scripts/gen_protos.py", "data", "models", "k8s/images",
)  # fmt: skip
SOURCE_LABEL = "io.facexplain.source-digest"
SERVICE_IMAGE_PREFIX = "localhost/facexplain/service:"


def source_digest(repo: Path = REPO) -> str:
    """sha256 over the path and bytes of every file the service image copies, in sorted order.

    Contents, not commits: a clean clone and a worktree with the same files get the same digest, and
    an uncommitted change counts. Caches (``__pycache__``, generated stubs are sources too) are skipped."""
    import hashlib

    h = hashlib.sha256()
    for rel in SOURCE_PATHS:
        root = repo / rel
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            h.update(f.relative_to(repo).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def image_label(podman: Podman, image: str, label: str) -> str:
    proc = subprocess.run(
        [str(podman.exe), "image", "inspect", "--format", f'{{{{ index .Labels "{label}" }}}}', image],
        env=podman.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    value = proc.stdout.strip() if proc.returncode == 0 else ""
    return "" if value == "<no value>" else value


def readiness(podman: Podman, images: Iterable[str], digest: str | None = None) -> list[str]:
    """Why podman staging cannot run here (empty: it can): podman runs a container, the images exist, and
    the service image was built from the checkout's current sources (``digest``; None = not checked)."""
    problems = []
    base = "localhost/facexplain/debian-base:bookworm"
    for image in images:
        if not podman.ok("image", "exists", image):
            problems.append(f"image {image} missing (`make images` builds it)")
        elif digest is not None and image.startswith(SERVICE_IMAGE_PREFIX):
            built = image_label(podman, image, SOURCE_LABEL)
            if built != digest:
                problems.append(
                    f"image {image} was built from other sources ({built[:12] or 'no digest label'}, the checkout "
                    f"is {digest[:12]}; `make images` rebuilds it)"
                )
    if not problems and not podman.ok("run", "--rm", "--network=none", base, "true"):
        problems.append(f"podman cannot run a container here (podman run {base} true failed)")
    return problems


def _wait(what: str, probe: Callable[[], bool], timeout: float, poll: float = 2.0) -> float:
    t0 = time.monotonic()
    while not probe():
        if time.monotonic() - t0 > timeout:
            raise PodmanStagingError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic() - t0


def mlflow_healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def grpc_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _crashing(podman: Podman, pods: Iterable[str], limit: int = 3) -> list[str]:
    """Containers of ``pods`` that exited and were started again more than ``limit`` times."""
    names = podman.run("ps", "-a", "--format", "{{.Names}}", check=False).split()
    mine = [n for n in names if any(n.startswith(f"{p}-") for p in pods) and not n.endswith("-infra")]
    if not mine:
        return []
    counts = podman.run("inspect", "--format", "{{.Name}} {{.RestartCount}}", *mine, check=False)
    return [line.split()[0] for line in counts.splitlines() if len(line.split()) == 2 and int(line.split()[1]) > limit]


def up(
    plan: Plan,
    state: Path = STATE_DIR,
    timeout: float = 1200.0,
    register: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Play the plan in two tiers with ``register(mlflow_uri)`` between them; seconds per step."""
    podman = Podman(state)
    problems = readiness(podman, plan.images, source_digest())
    if problems:
        raise PodmanStagingError("; ".join(problems))
    down(plan, state, quiet=True)  # a previous run's leftovers would hold the names and ports
    state.mkdir(parents=True, exist_ok=True)
    (state / "plan.json").write_text(json.dumps(asdict(plan), indent=1))
    (state / "registry.yaml").write_text(dump(plan.registry_docs))
    (state / "servers.yaml").write_text(dump(plan.server_docs))
    times: dict[str, float] = {}
    t0 = time.monotonic()
    podman.run("network", "create", plan.network)
    for name, data in plan.secrets.items():
        podman.run("secret", "create", name, "-", stdin=json.dumps(data))
    for name, options in plan.tmpfs.items():
        podman.run("volume", "create", "--opt", "type=tmpfs", "--opt", "device=tmpfs", "--opt", f"o={options}", name)
    print(f"podman network {plan.network}, secrets {', '.join(plan.secrets)}", flush=True)
    podman.run("kube", "play", "--network", plan.network, str(state / "registry.yaml"))
    uri = plan.registry_uri()
    registry_pods = [d["metadata"]["name"] for d in plan.registry_docs if d["kind"] == "Pod"]

    def registry_up() -> bool:
        crashing = _crashing(podman, registry_pods, limit=10)  # MLflow may exit while PostgreSQL starts
        if crashing:
            raise PodmanStagingError(f"{', '.join(crashing)} keeps exiting (podman logs {crashing[0]})")
        return mlflow_healthy(uri)

    times["mlflow_healthy_s"] = _wait(f"MLflow /health at {uri}", registry_up, timeout)
    print(f"  healthy  MLflow ({uri}) after {times['mlflow_healthy_s']:.0f} s, PostgreSQL-backed", flush=True)
    if register is not None:
        t = time.monotonic()
        print(f"registering the default models through the in-staging MLflow ({uri})", flush=True)
        register(uri)
        times["register_s"] = time.monotonic() - t
    t = time.monotonic()
    podman.run("kube", "play", "--network", plan.network, str(state / "servers.yaml"))
    deadline = time.monotonic() + timeout
    for service, address in plan.targets().items():

        def serving(address: str = address, pod: str = f"facexplain-{service}") -> bool:
            crashing = _crashing(podman, [pod])
            if crashing:
                raise PodmanStagingError(f"{', '.join(crashing)} keeps exiting (podman logs {crashing[0]})")
            return grpc_serving(address)

        _wait(f"{service} gRPC health at {address}", serving, max(deadline - time.monotonic(), 1.0))
        print(f"  serving  {service} ({address})", flush=True)
    times["servers_serving_s"] = time.monotonic() - t
    times["up_s"] = time.monotonic() - t0
    print("podman staging up: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), flush=True)
    return times


def load_plan(state: Path = STATE_DIR) -> Plan:
    path = state / "plan.json"
    if not path.is_file():
        raise PodmanStagingError(f"no podman staging is up ({path} missing): `facexplain staging up --podman`")
    return Plan(**json.loads(path.read_text()))


def collect_logs(plan: Plan, out: Path, state: Path = STATE_DIR) -> Path:
    """Every container's log and state, as `staging test` collects pod logs and events on a cluster."""
    podman = Podman(state)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ps.txt").write_text(podman.run("ps", "-a", "--format", "{{.Names}}\t{{.Status}}\t{{.Ports}}", check=False))
    names = podman.run("ps", "-a", "--format", "{{.Names}}", check=False).split()
    for name in names:
        if any(name.startswith(f"{p}-") for p in plan.pods()) and not name.endswith("-infra"):
            proc = subprocess.run(
                [str(podman.exe), "logs", name], env=podman.env, capture_output=True, text=True, timeout=60
            )
            (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    return out


def staging_test(plan: Plan, out: Path, pytest_args: Iterable[str], state: Path = STATE_DIR) -> int:
    t0 = time.monotonic()
    try:
        if not mlflow_healthy(plan.registry_uri()):
            raise PodmanStagingError(f"MLflow at {plan.registry_uri()} does not answer /health")
        for service, address in plan.targets().items():
            if not grpc_serving(address):
                raise PodmanStagingError(f"{service} at {address} is not SERVING")
            print(f"  healthy  {service} ({address})", flush=True)
        env = dict(
            os.environ,
            FACEXPLAIN_E2E_TARGETS=",".join(f"{k}={v}" for k, v in plan.targets().items()),
            FACEXPLAIN_E2E_REGISTRY_URI=plan.registry_uri(),
        )
        print(f"pytest tests/e2e with FACEXPLAIN_E2E_TARGETS={env['FACEXPLAIN_E2E_TARGETS']}", flush=True)
        # -rP: the passed tests' own figures (audit seconds, the alias move under load) in the summary
        cmd = [sys.executable, "-m", "pytest", "-q", "-rP", "-p", "no:cacheprovider", "tests/e2e", *pytest_args]
        code = subprocess.run(cmd, cwd=REPO, env=env)
        if code.returncode != 0:
            raise PodmanStagingError(f"tests/e2e failed (exit {code.returncode})")
    except PodmanStagingError as exc:
        folder = collect_logs(plan, out / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), state)
        print(f"error: {exc}\ncontainer logs: {folder}", file=sys.stderr)
        return 1
    print(f"podman staging test: passed in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


def down(plan: Plan, state: Path = STATE_DIR, quiet: bool = False) -> None:
    """Remove what ``up`` made, one by one (a missing piece is fine: already gone)."""
    podman = Podman(state)
    for pod in reversed(plan.pods()):
        if podman.ok("pod", "exists", pod):
            podman.run("pod", "rm", "-f", "-t", "20", pod)
            if not quiet:
                print(f"  removed  pod {pod}")
    for name in plan.secrets:
        if podman.ok("secret", "inspect", name):
            podman.run("secret", "rm", name)
    for volume in [*plan.volumes, *plan.tmpfs]:
        if podman.ok("volume", "exists", volume):
            podman.run("volume", "rm", "-f", volume)
    if podman.ok("network", "exists", plan.network):
        podman.run("network", "rm", "-f", plan.network)
    if not quiet:
        print(f"podman staging down: pods, secrets, volumes and network {plan.network} removed")
