"""Registry + hot reload against a real MLflow server on loopback and real embedding servers.

One MLflow server (sqlite + local artifacts in a temporary folder) and one embedding server
following ``facexplain-fr-dlib128@champion`` (poll 1 s) serve the whole module; the tests run in
file order and each states the version it expects to start from. Versions 2 and 3 are the same
weights registered again: they differ in number only, which is all a switch needs to be visible.

Streams send Embed requests over channels without retries or wait-for-ready, so every failure
during a swap or an outage would be counted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cli.launcher import REPO, RunningMlflow, RunningService, start_mlflow, start_service
from facexplain.artifacts.bundle import BUNDLE_JSON, bundle_digest, read_metadata, write_metadata
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL, load_bundle, save_embedder_bundle
from registry import CANDIDATE, CHAMPION, EXPERIMENT, Registry
from services.api.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc
from training.common import register_from_run

pytestmark = pytest.mark.integration

NAME = DEFAULT_FR_MODEL
POLL_S = 1.0
REQUEST_IMAGE = REPO / "data" / "sample" / "celeba" / "id7201" / "001085.jpg"


# -- helpers --------------------------------------------------------------------------------------------


class MlflowHandle:
    """The module's MLflow server; ``restart`` replaces the process, same port and stores."""

    def __init__(self, server: RunningMlflow) -> None:
        self.server = server

    @property
    def uri(self) -> str:
        return self.server.uri

    def restart(self) -> float:
        t0 = time.monotonic()
        self.server = self.server.restart(timeout=180)
        return time.monotonic() - t0


@dataclass
class Record:
    sent: float
    received: float
    ok: bool
    name: str = ""
    version: str = ""
    template_name: str = ""
    template_version: str = ""
    error: str = ""


class Stream:
    """Client threads sending Embed back to back until stopped; every outcome is recorded."""

    def __init__(self, address: str, threads: int = 2) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = embedding_pb2_grpc.EmbeddingServiceStub(self.channel)
        self.request = embedding_pb2.EmbedRequest(image=common_pb2.Image(encoded=REQUEST_IMAGE.read_bytes()))
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                r = self.stub.Embed(self.request, timeout=60)
                rec = Record(
                    sent,
                    time.monotonic(),
                    True,
                    r.model.name,
                    r.model.version,
                    r.template.model.name,
                    r.template.model.version,
                )
            except grpc.RpcError as err:
                rec = Record(sent, time.monotonic(), False, error=f"{err.code().name}: {err.details()}")
            with self._lock:
                self.records.append(rec)

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Record]:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        self.channel.close()
        return self.records

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)

    def wait_for_version(self, version: str, timeout: float) -> Record:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((r for r in self.snapshot() if r.ok and r.version == version), None)
            if hit is not None:
                return hit
            time.sleep(0.05)
        raise AssertionError(f"no response from version {version} within {timeout:.0f} s")

    def wait_for_count(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.snapshot()) < n:
            assert time.monotonic() < deadline, f"fewer than {n} responses within {timeout:.0f} s"
            time.sleep(0.05)


def _stub(svc: RunningService) -> tuple[grpc.Channel, embedding_pb2_grpc.EmbeddingServiceStub]:
    ch = grpc.insecure_channel(svc.address)
    return ch, embedding_pb2_grpc.EmbeddingServiceStub(ch)


def _status(svc: RunningService) -> common_pb2.ModelStatusResponse:
    ch, stub = _stub(svc)
    with ch:
        return stub.ModelStatus(common_pb2.ModelStatusRequest(), timeout=10)


def _reload(svc: RunningService) -> common_pb2.ReloadResponse:
    ch, stub = _stub(svc)
    with ch:
        return stub.Reload(common_pb2.ReloadRequest(), timeout=120)


def _embed(svc: RunningService) -> embedding_pb2.EmbedResponse:
    ch, stub = _stub(svc)
    with ch:
        return stub.Embed(
            embedding_pb2.EmbedRequest(image=common_pb2.Image(encoded=REQUEST_IMAGE.read_bytes())), timeout=60
        )


def _metrics(svc: RunningService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _reloads(svc: RunningService, result: str) -> float:
    key = ("facexplain_model_reloads_total", (("result", result), ("service", "embedding")))
    return _metrics(svc).get(key, 0.0)


def _registry_up(svc: RunningService) -> float | None:
    return _metrics(svc).get(("facexplain_registry_reachable", (("service", "embedding"),)))


def _wait(pred: Any, timeout: float, what: str, step: float = 0.1) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(step)
    return time.monotonic() - t0


def _serving(svc: RunningService) -> common_pb2.LoadedModel:
    models = _status(svc).models
    assert models[0].serving
    return models[0]


def _cli(*args: str, uri: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "registry", *args, "--uri", uri],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _check_stream(records: list[Record]) -> None:
    failed = [r for r in records if not r.ok]
    assert not failed, f"{len(failed)} of {len(records)} requests failed, e.g. {failed[0].error}"
    for r in records:  # the template is labelled with the model that made the response, always
        assert (r.template_name, r.template_version) == (r.name, r.version), r


FIGURES: dict[str, Any] = {}


def _figure(key: str, value: Any) -> None:
    FIGURES[key] = value
    print(f"FIGURE {key} = {value}")


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowHandle]:
    root = tmp_path_factory.mktemp("mlflow")
    t0 = time.monotonic()
    handle = MlflowHandle(start_mlflow(root, timeout=180))
    _figure("mlflow_start_s", round(time.monotonic() - t0, 1))
    yield handle
    handle.server.stop()
    assert not handle.server.healthy()
    if FIGURES:
        (root / "figures.json").write_text(json.dumps(FIGURES, indent=1))


@pytest.fixture(scope="module")
def versions(mlflow: MlflowHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """v1 by the CLI (champion), v2/v3 the same bundle registered again, plus three broken versions."""
    work = tmp_path_factory.mktemp("bundles")
    t0 = time.monotonic()
    res = _cli("register-defaults", uri=mlflow.uri)
    assert res.returncode == 0, res.stderr
    assert f"registered {NAME} version 1" in res.stdout and f"{NAME}@champion -> version 1" in res.stdout
    _figure("register_defaults_cli_s", round(time.monotonic() - t0, 1))
    reg = Registry(mlflow.uri, timeout_s=10, max_retries=2)
    v1 = reg.get_version(NAME, "1")
    good = reg.download(v1, work / "cache")
    # what makes register-defaults idempotent: the version is found by its content digest
    found = reg.find_by_digest(NAME, bundle_digest(read_metadata(good)))
    assert found is not None and found.version == "1"
    v2 = reg.register_bundle(good, NAME, description="v1's bundle again", alias="challenger")
    v3 = reg.register_bundle(good, NAME, description="v1's bundle again")

    # template_dim 64 in the metadata (and therefore in the tags) but the network outputs 128
    dim64 = work / "dim64"
    shutil.copytree(good, dim64)
    meta = json.loads((dim64 / BUNDLE_JSON).read_text())
    meta["template_dim"] = 64
    (dim64 / BUNDLE_JSON).write_text(json.dumps(meta))
    v_dim64 = reg.register_bundle(dim64, NAME, description="broken: template_dim 64")

    # bytes of the recognition weights damaged after the checksums were written
    corrupt = work / "corrupt"
    shutil.copytree(good, corrupt)
    shard = corrupt / "weights" / "face_recognition_model.bin"
    data = bytearray(shard.read_bytes())
    data[5000:5400] = bytes(400)
    shard.write_bytes(bytes(data))
    v_corrupt = reg.register_bundle(corrupt, NAME, description="broken: corrupt artifact", check=False)

    # a recognition net whose output is NaN (torch-format bundle; checksums are consistent)
    pipe = load_bundle(good)
    with torch.no_grad():
        pipe.recognition_net.fc.weight[0, 0] = float("nan")
    save_embedder_bundle(work / "nan", pipe, name=NAME, weights="torch")
    v_nan = reg.register_bundle(work / "nan", NAME, description="broken: NaN outputs")
    return {
        "registry": reg,
        "good": ["1", v2.version, v3.version],
        "broken": {
            "dim64": v_dim64.version,
            "corrupt": v_corrupt.version,
            "nan": v_nan.version,
        },
    }


@pytest.fixture(scope="module")
def svc(
    mlflow: MlflowHandle, versions: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    logs = tmp_path_factory.mktemp("registry-svc")
    t0 = time.monotonic()
    service = start_service(
        "embedding",
        logs,
        env={
            "FACEXPLAIN_REGISTRY_URI": mlflow.uri,
            "FACEXPLAIN_MODEL_NAME": NAME,
            "FACEXPLAIN_MODEL_ALIAS": "champion",
            "FACEXPLAIN_POLL_INTERVAL_S": str(POLL_S),
            "FACEXPLAIN_REGISTRY_TIMEOUT_S": "2",
            "FACEXPLAIN_MODEL_CACHE_DIR": str(logs / "cache"),
        },
        timeout=180,
    )
    _figure("service_start_with_registry_s", round(time.monotonic() - t0, 1))
    yield service
    code = service.stop()
    assert code == 0, f"embedding service exit {code}; log tail:\n{service.log_text()[-2000:]}"
    # biometric data never reaches the log: no run of numbers that could be a template
    assert not re.search(r"(-?\d+\.\d+,\s*){8,}", service.log_text())


def versions_tag(uri: str, version: str, key: str) -> str:
    return Registry(uri, timeout_s=10).get_version(NAME, version).tags[key]


def _set_champion(versions: dict[str, Any], version: str) -> float:
    versions["registry"].set_alias(NAME, "champion", version)
    return time.monotonic()


# -- tests ----------------------------------------------------------------------------------------------


def test_serves_the_champion_by_alias(svc: RunningService, mlflow: MlflowHandle) -> None:
    resp = _embed(svc)
    assert (resp.model.name, resp.model.version, resp.model.alias) == (NAME, "1", "champion")
    assert resp.template.dim == 128 and resp.template.model.version == "1"
    st = _status(svc)
    assert st.registry_reachable and st.registry_uri == mlflow.uri and st.last_reload_error == ""
    m = st.models[0]
    assert m.serving and m.kind == "embedder" and m.device == "cpu" and m.loaded_at.seconds > 0
    assert m.metadata["template_dim"] == "128" and float(m.metadata["golden_cosine"]) > 0.999
    assert m.metadata["registry_source"].startswith("runs:/") and m.metadata["registry_source"].endswith("/bundle")
    assert m.metadata["bundle_sha256"] == versions_tag(mlflow.uri, "1", "bundle_sha256")
    assert _registry_up(svc) == 1
    _figure("initial_reload_timings_s", {k: m.metadata[k] for k in sorted(m.metadata) if k.startswith("reload_")})


def test_alias_move_under_steady_load_drops_nothing(
    svc: RunningService, mlflow: MlflowHandle, versions: dict[str, Any]
) -> None:
    new = versions["good"][1]
    assert _serving(svc).model.version == "1"
    successes_before = _reloads(svc, "success")
    with Stream(svc.address) as stream:
        stream.wait_for_count(6)
        t0 = time.monotonic()
        res = _cli("promote", NAME, new, "--alias", "champion", uri=mlflow.uri)
        t_alias = time.monotonic()
        assert res.returncode == 0, res.stderr
        assert f"{NAME}@champion -> version {new} (was version 1)" in res.stdout
        first_new = stream.wait_for_version(new, timeout=POLL_S + 60)
        n_at_switch = len(stream.snapshot())
        stream.wait_for_count(n_at_switch + 6)
    records = stream.records
    _check_stream(records)
    assert {r.version for r in records} == {"1", new}
    # once a response came from the new version, every request sent later gets it too
    late_old = [r for r in records if r.sent > first_new.received and r.version != new]
    assert not late_old, f"{len(late_old)} requests sent after the switch were answered by the old version"

    loaded = _serving(svc)
    assert loaded.model.version == new
    load_s = float(loaded.metadata["reload_total_s"])
    max_request_s = max(r.received - r.sent for r in records)
    latency = first_new.received - t_alias
    bound = POLL_S + load_s + max_request_s + 1.0
    assert latency <= bound, (
        f"switch took {latency:.2f} s > poll {POLL_S} + load {load_s:.2f} + request {max_request_s:.2f} + 1"
    )
    assert _reloads(svc, "success") == successes_before + 1
    served = ("facexplain_model_served", (("model", NAME), ("service", "embedding"), ("version", new)))
    assert _metrics(svc)[served] == 1
    _figure(
        "alias_move",
        {
            "requests": len(records),
            "failed": 0,
            "old_version_responses": sum(r.version == "1" for r in records),
            "new_version_responses": sum(r.version == new for r in records),
            "switch_latency_s": round(latency, 2),
            "bound_s": round(bound, 2),
            "promote_cli_s": round(t_alias - t0, 2),
            "reload_timings_s": {k: loaded.metadata[k] for k in sorted(loaded.metadata) if k.startswith("reload_")},
            "max_request_s": round(max_request_s, 2),
        },
    )


def test_manual_reload_swaps_at_once(svc: RunningService, versions: dict[str, Any]) -> None:
    new = versions["good"][2]
    assert _serving(svc).model.version == versions["good"][1]
    _set_champion(versions, new)
    t0 = time.monotonic()
    resp = _reload(svc)
    took = time.monotonic() - t0
    assert resp.error == "" and resp.changed, resp
    assert resp.models[0].model.version == new and resp.models[0].serving
    assert _embed(svc).model.version == new
    _figure("manual_reload_s", round(took, 2))


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("dim64", "template dimension mismatch: metadata says 64, the model produced (128,)"),
        ("corrupt", "corrupt artifact: sha256 of weights/face_recognition_model.bin"),
        ("nan", "non-finite template (NaN/inf) on the golden input"),
    ],
)
def test_broken_version_is_rejected_and_old_keeps_serving(
    svc: RunningService, versions: dict[str, Any], broken: str, message: str
) -> None:
    serving = _serving(svc).model.version
    assert serving in versions["good"]
    bad = versions["broken"][broken]
    failed_before = _reloads(svc, "failed")
    with Stream(svc.address, threads=1) as stream:
        t0 = _set_champion(versions, bad)
        waited = _wait(lambda: f"v{bad} " in _status(svc).last_reload_error, POLL_S + 60, f"rejection of v{bad}")
        stream.wait_for_count(len(stream.snapshot()) + 2)
    records = stream.records
    _check_stream(records)
    assert {r.version for r in records} == {serving}, "the broken version must never answer"
    st = _status(svc)
    assert message in st.last_reload_error, st.last_reload_error
    assert f"still serving v{serving}" in st.last_reload_error
    assert st.models[0].model.version == serving and st.models[0].serving
    assert all(m.model.version != bad for m in st.models)
    assert _reloads(svc, "failed") == failed_before + 1
    # the manual Reload runs the same path: it retries, rejects again, and says why
    resp = _reload(svc)
    assert not resp.changed and message in resp.error and resp.models[0].model.version == serving
    assert _reloads(svc, "failed") == failed_before + 2
    # a poll does not retry a rejected version: the failure count stays put
    time.sleep(POLL_S * 2.5)
    assert _reloads(svc, "failed") == failed_before + 2
    _set_champion(versions, serving)
    _figure(
        f"rejection_{broken}", {"detected_after_s": round(waited, 2), "since_alias_s": round(time.monotonic() - t0, 2)}
    )


def test_registry_outage_keeps_serving_and_watcher_resumes(
    svc: RunningService, mlflow: MlflowHandle, versions: dict[str, Any], tmp_path: Path
) -> None:
    serving = _serving(svc).model.version
    target = "1" if serving != "1" else versions["good"][1]
    ch = grpc.insecure_channel(svc.address)
    health = health_pb2_grpc.HealthStub(ch)
    with Stream(svc.address) as stream:
        stream.wait_for_count(4)
        t_down = time.monotonic()
        mlflow.server.stop()
        noticed = _wait(lambda: not _status(svc).registry_reachable, POLL_S + 10, "registry_reachable=false")
        assert _registry_up(svc) == 0
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        resp = _reload(svc)
        assert "registry unreachable" in resp.error and not resp.changed
        # a service started while the registry is down comes up on local weights
        fallback = start_service(
            "embedding",
            tmp_path,
            env={
                "FACEXPLAIN_REGISTRY_URI": mlflow.uri,
                "FACEXPLAIN_POLL_INTERVAL_S": str(POLL_S),
                "FACEXPLAIN_REGISTRY_TIMEOUT_S": "2",
                "FACEXPLAIN_MODEL_CACHE_DIR": str(tmp_path / "cache"),
            },
            timeout=180,
        )
        try:
            fb = _status(fallback)
            assert fb.models[0].model.version == "local" and not fb.registry_reachable
            assert "unreachable" in fb.last_reload_error
            assert _embed(fallback).model.version == "local"
            n_during = len(stream.snapshot())
            restart_s = mlflow.restart()
            outage_s = time.monotonic() - t_down
            n_outage = len(stream.snapshot()) - n_during
            back = _wait(lambda: _status(svc).registry_reachable, POLL_S + 15, "registry_reachable=true")
            assert _registry_up(svc) == 1
            # the fallback service swaps the champion in once the registry answers
            _wait(lambda: _status(fallback).models[0].model.version == serving, POLL_S + 60, "fallback -> champion")
            assert _embed(fallback).model.version == serving
        finally:
            assert fallback.stop() == 0
        # and the watcher of the first service follows the alias again
        t_alias = _set_champion(versions, target)
        first = stream.wait_for_version(target, POLL_S + 60)
        stream.wait_for_count(len(stream.snapshot()) + 4)
    ch.close()
    records = stream.records
    _check_stream(records)
    assert any(r.sent > t_down and r.received < t_down + outage_s for r in records), "no requests during the outage"
    _figure(
        "registry_outage",
        {
            "requests": len(records),
            "failed": 0,
            "outage_s": round(outage_s, 1),
            "mlflow_restart_s": round(restart_s, 1),
            "noticed_down_after_s": round(noticed, 2),
            "noticed_up_after_restart_s": round(back, 2),
            "responses_while_restarting": n_outage,
            "switch_after_recovery_s": round(first.received - t_alias, 2),
        },
    )


def test_fresh_process_loads_by_alias_from_the_artifact_alone(
    mlflow: MlflowHandle, versions: dict[str, Any], tmp_path: Path
) -> None:
    code = (
        "import json, sys\n"
        "from cli.main import main\n"
        f"rc = main(['registry', 'check', {NAME!r}, '--alias', 'champion', '--uri', {mlflow.uri!r}, '--json',"
        f" '--cache-dir', {str(tmp_path / 'cache')!r}])\n"
        "bad = sorted(m for m in sys.modules if m == 'training' or m.startswith('training.'))\n"
        "print(json.dumps({'rc': rc, 'training_modules': bad}))\n"
    )
    env = {**os.environ, "FACEXPLAIN_FACEAPI_DIR": str(tmp_path / "no-weights-here")}  # only the artifact
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    report, tail = lines[0], lines[-1]
    assert tail == {"rc": 0, "training_modules": []}
    champion = versions["registry"].resolve(NAME, "champion").version
    assert report["version"] == champion and report["alias"] == "champion"
    assert report["template_dim"] == 128 and report["golden_cosine"] > 0.999
    _figure("fresh_process_check", {k: report[k] for k in ("download_s", "load_s", "validate_s")})


def test_cli_list_and_refusals(
    mlflow: MlflowHandle, versions: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # in-process (the subprocess path is exercised above): main() is what the console script runs
    from cli.main import main

    capsys.readouterr()
    assert main(["registry", "list", "--json", "--uri", mlflow.uri]) == 0
    (model,) = [m for m in json.loads(capsys.readouterr().out) if m["name"] == NAME]
    numbers = [v["version"] for v in model["versions"]]
    assert numbers == [str(i) for i in range(1, len(numbers) + 1)] and len(numbers) == 6
    assert set(model["aliases"]) == {"champion", "challenger"}
    assert all(v["tags"]["kind"] == "embedder" for v in model["versions"])
    assert main(["registry", "list", "--uri", mlflow.uri]) == 0
    table = capsys.readouterr().out
    assert "champion" in table and "challenger" in table and table.count(NAME) == 6
    assert main(["registry", "promote", NAME, "99", "--uri", mlflow.uri]) == 1
    assert "not found" in capsys.readouterr().err.lower()
    assert main(["registry", "list", "--uri", "http://127.0.0.1:9", "--timeout", "2"]) == 3
    assert "unreachable" in capsys.readouterr().err


# -- issue 21: the cache keys a version by what it is; the promotion policy -------------------------------


def test_two_registries_whose_v1_differ_are_served_correctly_from_one_cache(
    mlflow: MlflowHandle, versions: dict[str, Any], tmp_path: Path
) -> None:
    """v1 of one name is another bundle in a second registry; one cache folder serves each its own."""
    reg_a: Registry = versions["registry"]
    a1 = reg_a.get_version(NAME, "1")
    bundle_b = tmp_path / "bundle-b"
    shutil.copytree(reg_a.download(a1, tmp_path / "fetch"), bundle_b)
    meta = json.loads((bundle_b / BUNDLE_JSON).read_text())
    meta["notes"] = "registry B's build"  # same weights, other metadata: another digest
    write_metadata(bundle_b, meta)
    t0 = time.monotonic()
    server_b = start_mlflow(tmp_path / "mlflow-b", timeout=180)
    try:
        reg_b = Registry(server_b.uri, timeout_s=10, max_retries=2)
        b1 = reg_b.register_bundle(bundle_b, NAME, description="registry B's v1")
        assert b1.version == "1" and b1.tags["bundle_sha256"] != a1.tags["bundle_sha256"]
        for reg in (reg_a, reg_b):  # an alias no other test moves, on v1 in both registries
            reg.set_alias(NAME, "cachetest", "1")
        cache = tmp_path / "shared-cache"
        served = {}
        for label, uri, want in (("a", mlflow.uri, a1), ("b", server_b.uri, b1)):
            (tmp_path / f"svc-{label}").mkdir()
            service = start_service(
                "embedding",
                tmp_path / f"svc-{label}",
                env={
                    "FACEXPLAIN_REGISTRY_URI": uri,
                    "FACEXPLAIN_MODEL_NAME": NAME,
                    "FACEXPLAIN_MODEL_ALIAS": "cachetest",
                    "FACEXPLAIN_REGISTRY_FALLBACK_LOCAL": "false",
                    "FACEXPLAIN_MODEL_CACHE_DIR": str(cache),
                },
                timeout=180,
            )
            try:
                m = _serving(service)
            finally:
                assert service.stop() == 0
            assert m.model.version == "1"
            assert m.metadata["bundle_sha256"] == want.tags["bundle_sha256"], f"registry {label} served another v1"
            served[label] = m.metadata["bundle_sha256"]
        entries = sorted(p.name for p in (cache / NAME).iterdir())
        assert len(entries) == 2 and all(e.startswith("1-") for e in entries), entries
        markers = [json.loads((cache / NAME / e / "source.json").read_text()) for e in entries]
        assert {m["bundle_sha256"] for m in markers} == set(served.values())
    finally:
        server_b.stop()
    _figure("two_registries_one_cache_s", round(time.monotonic() - t0, 1))


def test_failed_gates_never_become_champion_and_forcing_is_recorded(
    mlflow: MlflowHandle, versions: dict[str, Any], tmp_path: Path
) -> None:
    reg: Registry = versions["registry"]
    name = "facexplain-fr-gatetest"
    bundle = reg.download(reg.get_version(NAME, "1"), tmp_path / "fetch")
    exp = reg.client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else reg.client.create_experiment(EXPERIMENT)

    def train_and_register(passed: bool) -> dict[str, str]:  # what a training pipeline's last step does
        run_id = reg.client.create_run(exp_id, run_name="gates-test").info.run_id
        tags = {"gates_passed": str(passed).lower(), "test_psnr": "12.0000" if not passed else "15.0000"}
        if not passed:
            tags["gates_failed"] = "test_psnr"
        return register_from_run(reg, bundle, name, "auto", tags, run_id)

    first = train_and_register(True)
    assert first == {"name": name, "version": "1", "alias": CHAMPION}
    failed = train_and_register(False)
    assert failed["alias"] == CANDIDATE  # auto would have said challenger; champion never moves
    assert reg.resolve(name, CHAMPION).version == "1"
    assert reg.resolve(name, CANDIDATE).version == failed["version"] == "2"

    res = _cli("promote", name, "2", uri=mlflow.uri)
    assert res.returncode == 1 and "quality gates failed (gates_passed=false: test_psnr)" in res.stderr, res.stderr
    assert "--force --reason" in res.stderr
    res = _cli("promote", name, "2", "--force", uri=mlflow.uri)
    assert res.returncode == 1 and "needs --reason" in res.stderr, res.stderr
    assert reg.resolve(name, CHAMPION).version == "1"
    assert "promotion_forced_by" not in reg.get_version(name, "2").tags

    res = _cli(
        "promote", name, "2", "--force", "--reason", "accepted for the audit demo", uri=mlflow.uri,
        env={"FACEXPLAIN_USER": "integration-test"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "forced:" in res.stdout and f"{name}@champion -> version 2 (was version 1)" in res.stdout
    tags = Registry(mlflow.uri, timeout_s=10).get_version(name, "2").tags  # read back from MLflow
    assert tags["promotion_forced_by"] == "integration-test"
    assert tags["promotion_forced_reason"] == "accepted for the audit demo"
    assert tags["promotion_forced_at"].startswith("20") and tags["gates_passed"] == "false"
    assert reg.resolve(name, CHAMPION).version == "2"
