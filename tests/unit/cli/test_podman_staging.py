"""The podman translation of the staging overlay (cli/podman_staging.py), on the real rendered overlay.

No podman needed: ``kubectl kustomize k8s/overlays/staging`` (what `facexplain staging up` applies to a
cluster) goes through :func:`translate`, and each adaptation its module doc lists is checked on what
comes out: what `podman kube play` would be given, the podman secrets, volumes and published ports.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import resource
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli import podman_staging as ps
from cli import staging
from cli.main import build_parser

REPO = Path(__file__).resolve().parents[3]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SERVERS = {f"facexplain-{s}" for s in ps.SERVICES}


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return staging.render_overlay()


def _ports() -> ps.HostPort:
    counter = itertools.count(40000)
    return lambda _pod, _name, _port: next(counter)


@pytest.fixture(scope="module")
def plan(rendered: list[dict[str, Any]]) -> ps.Plan:
    return ps.translate(copy.deepcopy(rendered), host_port=_ports(), version=VERSION)


def pods(plan: ps.Plan) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in (*plan.registry_docs, *plan.server_docs) if d["kind"] == "Pod"}


def containers(plan: ps.Plan) -> list[tuple[str, dict[str, Any]]]:
    return [(name, c) for name, pod in pods(plan).items() for c in pod["spec"]["containers"]]


def test_workloads_become_pods_named_after_their_services(rendered: list[dict[str, Any]], plan: ps.Plan) -> None:
    workloads = [o for o in rendered if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(pods(plan)) == len(workloads) == 7
    assert set(pods(plan)) == SERVERS | {"facexplain-mlflow", "facexplain-postgres"}
    services = {o["metadata"]["name"] for o in rendered if o["kind"] == "Service"}
    assert set(pods(plan)) <= services  # each pod answers to the name its Service has on a cluster
    # what the containers dial by Service name resolves to a pod of that name on the podman network
    config = next(o for o in rendered if o["kind"] == "ConfigMap")["data"]
    assert config["FACEXPLAIN_REGISTRY_URI"] == "http://facexplain-mlflow:5000"
    mlflow = pods(plan)["facexplain-mlflow"]["spec"]["containers"][0]
    assert any("@facexplain-postgres:5432/" in a for a in mlflow["args"])
    # the registry tier is played (and healthy) before the model servers
    assert {d["metadata"]["name"] for d in plan.registry_docs if d["kind"] == "Pod"} == {
        "facexplain-mlflow",
        "facexplain-postgres",
    }
    assert {d["metadata"]["name"] for d in plan.server_docs if d["kind"] == "Pod"} == SERVERS
    # and both files carry the ConfigMap: kube play resolves a configMapRef only from the file it plays
    for docs in (plan.registry_docs, plan.server_docs):
        assert [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"] == ["facexplain-config"]
    assert plan.network == "facexplain-staging"


def test_only_what_kube_play_takes_is_played_the_rest_is_listed(rendered: list[dict[str, Any]], plan: ps.Plan) -> None:
    played = {d["kind"] for d in (*plan.registry_docs, *plan.server_docs)}
    assert played == {"Pod", "ConfigMap", "PersistentVolumeClaim"}
    for kind in ("Service", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "Namespace"):
        want = sorted(f"{kind}/{o['metadata']['name']}" for o in rendered if o["kind"] == kind)
        assert want and sorted(x for x in plan.left_out if x.startswith(f"{kind}/")) == want
    # the YAML files `up` writes parse back to the same documents
    assert list(yaml.safe_load_all(ps.dump(plan.server_docs))) == plan.server_docs


def test_secrets_become_podman_secrets_in_the_format_podman_reads(
    rendered: list[dict[str, Any]], plan: ps.Plan
) -> None:
    secret = next(o for o in rendered if o["kind"] == "Secret")
    assert not [d for d in (*plan.registry_docs, *plan.server_docs) if d["kind"] == "Secret"]
    content = plan.secrets[secret["metadata"]["name"]]
    assert content == secret["data"]  # {key: base64}: podman 4.3 rejects YAML and whole Secret objects
    assert base64.b64decode(content["password"]) == b"staging-only-not-a-secret"
    json.dumps(content)  # `up` pipes it to `podman secret create NAME -` as JSON
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for _, c in containers(plan)
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert len(refs) == 2  # PostgreSQL's password and MLflow's PGPASSWORD
    for ref in refs:
        assert ref["key"] in plan.secrets[ref["name"]]
    # stringData is encoded like data
    extra = ps.podman_secret({"stringData": {"token": "abc"}, "data": {"x": "eQ=="}})
    assert extra == {"x": "eQ==", "token": base64.b64encode(b"abc").decode()}


def test_every_port_is_published_on_loopback_only(rendered: list[dict[str, Any]], plan: ps.Plan) -> None:
    ports = [(pod, p) for pod, c in containers(plan) for p in c.get("ports", [])]
    rendered_ports = [
        p
        for o in rendered
        if o["kind"] in ("Deployment", "StatefulSet")
        for c in o["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    ]
    assert len(ports) == len(rendered_ports) == 17  # grpc + metrics + health x5, MLflow http, PostgreSQL
    assert all(p["hostIP"] == "127.0.0.1" and p["hostPort"] >= 40000 for _, p in ports)
    assert len({p["hostPort"] for _, p in ports}) == len(ports)  # five metrics ports on 9090 do not collide
    for pod, p in ports:
        assert plan.published[pod][p["name"]] == f"127.0.0.1:{p['hostPort']}"
    assert set(plan.targets()) == set(ps.SERVICES)
    assert plan.targets()["embedding"] == plan.published["facexplain-embedding"]["grpc"]
    assert plan.registry_uri().startswith("http://localhost:")  # a Host MLflow's allowed hosts list


def test_probes_are_dropped_and_crashes_still_restart(plan: ps.Plan) -> None:
    for _, c in containers(plan):
        assert not set(ps.PROBES) & set(c), c["name"]
    assert all(p["spec"]["restartPolicy"] == "Always" for p in pods(plan).values())


def test_images_resolve_locally_and_nothing_is_pulled(plan: ps.Plan) -> None:
    images = {pod: c["image"] for pod, c in containers(plan)}
    assert images["facexplain-postgres"] == f"localhost/facexplain/postgres:{VERSION}"
    assert images["facexplain-mlflow"] == f"localhost/facexplain/mlflow:{VERSION}"
    assert {images[s] for s in SERVERS} == {f"localhost/facexplain/service:{VERSION}"}
    assert all(c["imagePullPolicy"] == "Never" for _, c in containers(plan))
    assert sorted(plan.images) == sorted(set(images.values()))
    assert ps.map_image("docker.io/library/postgres@sha256:ab", VERSION) == f"localhost/facexplain/postgres:{VERSION}"
    assert ps.map_image("registry.example/other:1", VERSION) == "registry.example/other:1"


def test_emptydirs_become_pod_private_tmpfs_volumes_owned_by_the_pod_user(plan: ps.Plan) -> None:
    for name, pod in pods(plan).items():
        assert not [v for v in pod["spec"].get("volumes", []) if "emptyDir" in v], name
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pods(plan)["facexplain-postgres"]["spec"]["volumes"]
    }
    assert claims == {
        "run": "facexplain-postgres-run",
        "tmp": "facexplain-postgres-tmp",
        "data": "data-facexplain-postgres-0",
    }
    # PostgreSQL's socket directory: 16Mi, its user 999 and fsGroup 999 (the bug podman's emptyDir had)
    assert plan.tmpfs["facexplain-postgres-run"] == "nr_blocks=4096,mode=1777,uid=999,gid=999"
    assert plan.tmpfs["facexplain-embedding-state"] == "nr_blocks=393216,mode=1777,uid=10001,gid=10001"
    tmps = [v for v in plan.tmpfs if v.endswith("-tmp")]
    assert len(tmps) == 7  # one /tmp per pod, no sharing
    # the StatefulSet's claim template and the MLflow PVC are disk volumes, removed by `down`
    assert sorted(plan.volumes) == ["data-facexplain-postgres-0", "facexplain-mlflow-artifacts"]
    assert ps.size_bytes("1536Mi") == 1536 * 2**20 and ps.size_bytes("2G") == 2 * 10**9


def test_the_overlay_itself_is_not_changed(rendered: list[dict[str, Any]]) -> None:
    before = copy.deepcopy(rendered)
    ps.translate(rendered, host_port=_ports(), version=VERSION)
    assert rendered == before


def test_what_podman_cannot_express_is_an_error(rendered: list[dict[str, Any]]) -> None:
    two = copy.deepcopy(rendered)
    next(o for o in two if o["kind"] == "Deployment")["spec"]["replicas"] = 2
    with pytest.raises(ps.PodmanStagingError, match="2 replicas"):
        ps.translate(two, host_port=_ports(), version=VERSION)
    odd = [*copy.deepcopy(rendered), {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "x"}}]
    with pytest.raises(ps.PodmanStagingError, match="CronJob"):
        ps.translate(odd, host_port=_ports(), version=VERSION)
    # The base's TLS Secret volume left in by an overlay that renders no such Secret: said before kube play.
    tls = copy.deepcopy(rendered)
    embedding = next(o for o in tls if o["kind"] == "Deployment" and o["metadata"]["name"] == "facexplain-embedding")
    spec = embedding["spec"]["template"]["spec"]
    spec["volumes"].append({"name": "tls", "secret": {"secretName": "facexplain-tls"}})
    with pytest.raises(
        ps.PodmanStagingError, match="facexplain-embedding: volume tls mounts the Secret facexplain-tls"
    ):
        ps.translate(tls, host_port=_ports(), version=VERSION)


def test_containers_conf_uses_runc_and_ulimits_within_the_hard_limits(tmp_path: Path) -> None:
    text = ps.containers_conf(tmp_path / "containers.conf").read_text()
    assert 'runtime = "runc"' in text and 'cgroup_manager = "cgroupfs"' in text
    for name, rlimit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(rlimit)[1]
        line = next(x for x in text.split('"') if x.startswith(f"{name}="))
        soft_s, hard_s = line.split("=")[1].split(":")
        assert hard == resource.RLIM_INFINITY or int(hard_s) <= hard
        assert soft_s == hard_s


def test_the_cli_takes_podman_on_every_verb_and_keeps_the_cluster_verbs() -> None:
    parser = build_parser()
    for verb in ("up", "test", "down", "check"):
        assert parser.parse_args(["staging", verb, "--podman"]).podman
    args = parser.parse_args(["staging", "up", "--timeout", "30"])
    assert not args.podman and args.timeout == 30 and args.staging_command == "up"


def test_source_digest_follows_the_contents_the_service_image_copies(tmp_path: Path) -> None:
    from cli.podman_staging import source_digest

    (tmp_path / "facexplain").mkdir()
    (tmp_path / "facexplain" / "a.py").write_text("x = 1\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    first = source_digest(tmp_path)
    (tmp_path / "facexplain" / "__pycache__").mkdir()
    (tmp_path / "facexplain" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run.log").write_text("not a source\n")
    assert source_digest(tmp_path) == first  # caches and var/ are not what the image is built from
    (tmp_path / "facexplain" / "a.py").write_text("x = 2\n")
    assert source_digest(tmp_path) != first
    (tmp_path / "facexplain" / "a.py").write_text("x = 1\n")
    (tmp_path / "facexplain" / "a.py").rename(tmp_path / "facexplain" / "b.py")
    assert source_digest(tmp_path) != first  # a renamed file is another image
