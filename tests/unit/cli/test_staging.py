"""`facexplain staging up|down` against a real HTTP server standing in for the Kubernetes API server.

Nothing of ours is mocked: the real staging overlay is rendered by kubectl, the official ``kubernetes``
client sends its real requests over a socket to a server this test starts on loopback (reached through a
kubeconfig file, as a cluster would be), and the test checks what arrived: method, path, query, content
type, credentials and body, one server-side apply per rendered object, in dependency order. The expected
objects come from scripts/k8s_policy.py's renderer (what `make k8s-validate` checks), not from the code
under test.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from cli import staging
from cli.main import main
from tests.unit.k8s.conftest import policy

TOKEN = "staging-test-token"
POD_LOG = '{"level": "ERROR", "message": "model load failed: no champion"}\n'  # the servers log JSON lines
NAMESPACE = "facexplain-staging"
# Written out, not derived from cli.staging.KINDS: the test must catch a wrong plural or group.
PLURALS = {
    "Namespace": "namespaces",
    "NetworkPolicy": "networkpolicies",
    "ServiceAccount": "serviceaccounts",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Service": "services",
    "StatefulSet": "statefulsets",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
}


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    authorization: str | None
    body: Any


class FakeCluster:
    """Records every request; answers like an API server would for what staging asks."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.applied: dict[str, Any] = {}
        self.unready_reads: dict[str, int] = {}  # path -> how many GETs still see it not rolled out
        self.refuse: set[str] = set()  # paths whose apply is refused with 403
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if path == "/version":
            return 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"}
        if path == f"/api/v1/namespaces/{NAMESPACE}/events":
            return 200, {"kind": "EventList", "items": [{"reason": "BackOff", "message": "Back-off restarting"}]}
        if path == f"/api/v1/namespaces/{NAMESPACE}/pods":
            pod = {"metadata": {"name": "facexplain-embedding-0"}, "spec": {"containers": [{"name": "server"}]}}
            return 200, {"kind": "PodList", "items": [pod]}
        if path == f"/api/v1/namespaces/{NAMESPACE}/pods/facexplain-embedding-0/log":
            return 200, POD_LOG
        if method == "PATCH":
            if path in self.refuse:
                return 403, {"kind": "Status", "message": "forbidden by the test"}
            created = path not in self.applied
            self.applied[path] = body
            return (201 if created else 200), body
        if method == "DELETE":
            if self.applied.pop(path, None) is None:
                return 404, {"kind": "Status", "reason": "NotFound"}
            return 200, {"kind": "Status", "status": "Success"}
        if method == "GET" and path in self.applied:
            obj = json.loads(json.dumps(self.applied[path]))
            obj["metadata"]["generation"] = 1
            want = obj.get("spec", {}).get("replicas", 1)
            left = self.unready_reads.get(path, 0)
            self.unready_reads[path] = left - 1
            ready = 0 if left > 0 else want
            obj["status"] = {
                "observedGeneration": 1,
                "replicas": want,
                "updatedReplicas": want,
                "readyReplicas": ready,
                "availableReplicas": ready,
            }
            return 200, obj
        return 404, {"kind": "Status", "reason": "NotFound"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FakeCluster, Path]]:
    state = FakeCluster()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            url = urlsplit(self.path)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.loads(raw) if raw else None
            with state.lock:
                state.seen.append(
                    Seen(
                        self.command,
                        url.path,
                        parse_qs(url.query),
                        self.headers.get("Content-Type"),
                        self.headers.get("Authorization"),
                        body,
                    )
                )
                code, reply = state.handle(self.command, url.path, body)
            text = isinstance(reply, str)  # a pod log is plain text
            out = reply.encode() if text else json.dumps(reply).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if text else "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_PATCH = do_DELETE = do_POST = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
                "users": [{"name": "t", "user": {"token": TOKEN}}],
                "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
                "current-context": "t",
            }
        )
    )
    yield state, kubeconfig
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return list(policy.render(staging.STAGING_OVERLAY))


def expected_path(obj: dict[str, Any]) -> str:
    api = obj["apiVersion"]
    prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
    if obj["kind"] != "Namespace":
        assert obj["metadata"]["namespace"] == NAMESPACE
        prefix += f"/namespaces/{NAMESPACE}"
    return f"{prefix}/{PLURALS[obj['kind']]}/{obj['metadata']['name']}"


def test_up_server_side_applies_every_rendered_object_in_dependency_order(
    cluster: tuple[FakeCluster, Path], rendered: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    state, kubeconfig = cluster
    mlflow = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/facexplain-mlflow"
    state.unready_reads[mlflow] = 1  # the MLflow server is not ready at the first look: `up` must wait for it

    # --no-register: registering needs `kubectl port-forward` to a pod, which only a real cluster offers
    assert main(["staging", "up", "--kubeconfig", str(kubeconfig), "--timeout", "60", "--no-register"]) == 0

    assert state.seen[0].method == "GET" and state.seen[0].path == "/version"
    patches = [s for s in state.seen if s.method == "PATCH"]
    assert len(patches) == len(rendered) == 34
    for p in patches:
        assert p.query == {"fieldManager": ["facexplain"], "force": ["true"]}
        assert p.content_type == "application/apply-patch+yaml"
        assert p.authorization == f"Bearer {TOKEN}"
    # exactly the rendered objects, each to its own path, each once
    by_path = {p.path: p.body for p in patches}
    assert len(by_path) == len(patches)
    assert by_path == {expected_path(o): o for o in rendered}
    assert by_path[f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/facexplain-embedding"]["kind"] == "Deployment"
    assert patches[0].path == f"/api/v1/namespaces/{NAMESPACE}"

    # dependency order: namespace, fences, identities/config/storage/services, database, servers, then PDBs
    kinds = [p.body["kind"] for p in patches]

    def first(kind: str) -> int:
        return kinds.index(kind)

    def last(kind: str) -> int:
        return len(kinds) - 1 - kinds[::-1].index(kind)

    assert kinds[0] == "Namespace"
    assert last("NetworkPolicy") < min(first("StatefulSet"), first("Deployment"))
    for before in ("ServiceAccount", "ConfigMap", "Secret", "PersistentVolumeClaim", "Service"):
        assert last(before) < first("StatefulSet"), before
    assert last("StatefulSet") < first("Deployment")
    assert last("Deployment") < first("PodDisruptionBudget")

    # then it waited for every rollout, reading the MLflow Deployment again until it was ready
    gets = [s.path for s in state.seen if s.method == "GET" and s.path != "/version"]
    rollouts = {expected_path(o) for o in rendered if o["kind"] in ("Deployment", "StatefulSet")}
    assert set(gets) == rollouts and len(rollouts) == 7
    assert gets.count(mlflow) == 2
    out = capsys.readouterr().out
    assert "created  Namespace/facexplain-staging" in out and "every rollout complete" in out

    # a second `up` is the same requests again (server-side apply is idempotent), now answered 200
    n = len(state.seen)
    assert main(["staging", "up", "--kubeconfig", str(kubeconfig), "--no-wait"]) == 0
    again = [s for s in state.seen[n:] if s.method == "PATCH"]
    assert [(s.path, s.body) for s in again] == [(p.path, p.body) for p in patches]
    assert "applied  Deployment/facexplain-embedding" in capsys.readouterr().out


def test_up_registers_the_models_once_the_registry_is_ready_and_before_waiting_for_the_servers(
    cluster: tuple[FakeCluster, Path], rendered: list[dict[str, Any]]
) -> None:
    state, kubeconfig = cluster
    registered_at: list[int] = []
    api = staging.api_client(str(kubeconfig))
    staging.up(api, rendered, timeout=60, register=lambda: registered_at.append(len(state.seen)))

    assert len(registered_at) == 1
    before = {s.path.rsplit("/", 1)[1] for s in state.seen[: registered_at[0]] if s.method == "GET"}
    after = {s.path.rsplit("/", 1)[1] for s in state.seen[registered_at[0] :] if s.method == "GET"}
    assert before == {"version", "facexplain-postgres", "facexplain-mlflow"}
    assert after == {f"facexplain-{svc}" for svc in staging.SERVICES}
    assert all(s.method == "GET" for s in state.seen[registered_at[0] :])


def test_down_deletes_in_reverse_order_namespace_last(
    cluster: tuple[FakeCluster, Path], rendered: list[dict[str, Any]]
) -> None:
    state, kubeconfig = cluster
    assert main(["staging", "up", "--kubeconfig", str(kubeconfig), "--no-wait"]) == 0
    applied = [s.path for s in state.seen if s.method == "PATCH"]
    state.seen.clear()

    assert main(["staging", "down", "--kubeconfig", str(kubeconfig), "--timeout", "10"]) == 0
    deletes = [s for s in state.seen if s.method == "DELETE"]
    assert [d.path for d in deletes] == applied[::-1]
    assert deletes[-1].path == f"/api/v1/namespaces/{NAMESPACE}"
    assert all(d.query == {"propagationPolicy": ["Foreground"]} for d in deletes)
    assert all(d.authorization == f"Bearer {TOKEN}" for d in deletes)
    assert state.applied == {}
    # it waited until the namespace read back 404
    assert state.seen[-1].method == "GET" and state.seen[-1].path == f"/api/v1/namespaces/{NAMESPACE}"

    # down on an empty cluster: every object is already absent, which is not an error
    assert main(["staging", "down", "--kubeconfig", str(kubeconfig), "--no-wait"]) == 0


def test_a_refused_apply_stops_up_and_names_the_object(
    cluster: tuple[FakeCluster, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    state, kubeconfig = cluster
    refused = f"/api/v1/namespaces/{NAMESPACE}/secrets"
    state.refuse = {
        p for p in (expected_path(o) for o in policy.render(staging.STAGING_OVERLAY)) if p.startswith(refused)
    }
    assert len(state.refuse) == 1

    assert main(["staging", "up", "--kubeconfig", str(kubeconfig)]) == 2
    err = capsys.readouterr().err
    assert "apply Secret/facexplain-postgres-" in err and "HTTP 403: forbidden by the test" in err
    kinds = [s.body["kind"] for s in state.seen if s.method == "PATCH"]
    assert kinds[-1] == "Secret" and "Deployment" not in kinds and "StatefulSet" not in kinds


def test_no_api_server_is_said_plainly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["staging", "up", "--kubeconfig", str(tmp_path / "absent")]) == 2
    assert "no Kubernetes API server in KUBECONFIG" in capsys.readouterr().err


def test_unknown_kind_is_an_error_not_a_guess() -> None:
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "n"}}
    with pytest.raises(staging.StagingError, match="Widget"):
        staging.apply_order([obj])


@pytest.mark.parametrize(
    ("status", "complete"),
    [
        ({"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}, True),
        ({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}, False),
        ({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 2}, False),
        ({"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 0}, False),
        ({}, False),
    ],
)
def test_rollout_complete(status: dict[str, int], complete: bool) -> None:
    obj = {"kind": "Deployment", "metadata": {"generation": 2}, "spec": {"replicas": 1}, "status": status}
    assert staging.rollout_complete(obj) is complete


def test_failure_diagnostics_hold_every_pods_log_and_the_events(
    cluster: tuple[FakeCluster, Path], tmp_path: Path
) -> None:
    state, kubeconfig = cluster
    api = staging.api_client(str(kubeconfig))
    out = staging.collect_diagnostics(api, NAMESPACE, tmp_path / "diag")

    assert json.loads((out / "events.json").read_text())["items"][0]["reason"] == "BackOff"
    assert (out / "facexplain-embedding-0.server.log").read_text() == POD_LOG  # as written, not re-encoded
    logs = [s for s in state.seen if s.path.endswith("/log")]
    assert [s.query for s in logs] == [
        {"container": ["server"], "previous": ["false"]},
        {"container": ["server"], "previous": ["true"]},
    ]
    assert all(s.authorization == f"Bearer {TOKEN}" for s in state.seen)


def test_staging_test_failure_leaves_logs_and_events(
    cluster: tuple[FakeCluster, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing is deployed: the real kubectl cannot port-forward to the registry Service, and `staging test`
    # must fail with the reason and leave the namespace's diagnostics behind.
    state, kubeconfig = cluster
    out = tmp_path / "runs"
    assert main(["staging", "test", "--kubeconfig", str(kubeconfig), "--out", str(out)]) == 1

    err = capsys.readouterr().err
    assert "port-forward svc/facexplain-mlflow" in err and "pod logs and events:" in err
    (run,) = out.iterdir()
    assert (run / "events.json").is_file() and (run / "facexplain-embedding-0.server.log").is_file()
    # the real kubectl asked the same server (its API discovery, which this server does not offer)
    assert any(s.path == "/api" for s in state.seen)
