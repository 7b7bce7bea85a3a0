"""The hot-reload watcher's decisions, against an in-memory registry (no server, no weights).

The integration tests (tests/integration/test_registry.py) run the same path against a real MLflow
server and the real model; these pin the rules: swap only validated versions, keep serving on any
failure, count and report failures once, skip known-bad versions on polls but retry them on Reload,
and say when the registry is unreachable and when it is back.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from facexplain.artifacts.bundle import BUNDLE_FORMAT, BundleError
from registry import REQUIRED_TAGS, RegistryNotFound, RegistryUnreachable, VersionInfo, missing_tags, public_uri
from services.api.v1 import common_pb2
from services.kit.errors import NotFound
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel
from services.kit.reload import ModelWatcher, metadata_problems, reload_response

NAME = "facexplain-fr-test"
TAGS = {t: "x" for t in REQUIRED_TAGS["embedder"]} | {"kind": "embedder", "template_dim": "4"}
META = {
    "format_version": BUNDLE_FORMAT,
    "kind": "embedder",
    "name": NAME,
    "template_dim": 4,
    "input": {},
    "alignment": {},
    "verification": {},
    "components": {},
    "golden": {},
}


class FakeRegistry:
    """resolve/download like registry.client.Registry, with a switch to take it down."""

    uri = "http://fake-registry"

    def __init__(self) -> None:
        self.versions: dict[str, dict[str, Any]] = {"1": {}, "2": {}, "3": {}}
        self.alias = "1"
        self.up = True
        self.missing = False
        self.downloads: list[str] = []
        self.entered = threading.Event()  # set when a download starts
        self.gate: threading.Event | None = None  # when set, downloads wait for it: a slow download

    def resolve(self, name: str, alias: str) -> VersionInfo:
        if not self.up:
            raise RegistryUnreachable("connection refused")
        if self.missing:
            raise RegistryNotFound(f"alias {alias} not found")
        return VersionInfo(name, self.alias, alias, run_id=f"run{self.alias}", tags=dict(TAGS))

    def download(self, info: VersionInfo, cache_dir: Path, *, keep: int = 3, protect: tuple[Path, ...] = ()) -> Path:
        self.downloads.append(info.version)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never let the download finish"
        path = Path(cache_dir) / info.name / info.version
        path.mkdir(parents=True, exist_ok=True)
        (path / "bundle.json").write_text(json.dumps({**META, **self.versions[info.version]}))
        return path

    def evict(self, name: str, version: str, cache_dir: Path) -> None:
        shutil.rmtree(Path(cache_dir) / name / version, ignore_errors=True)


def _loader(path: Path, info: VersionInfo, device: str) -> str:
    return f"model-{info.version}"


class _Validator:
    def __init__(self) -> None:
        self.bad: dict[str, str] = {}
        self.delay = 0.0

    def __call__(self, model: str, path: Path, meta: dict[str, Any]) -> dict[str, str]:
        time.sleep(self.delay)
        version = path.name
        if version in self.bad:
            raise BundleError(self.bad[version])
        return {"golden_cosine": "1.0"}


@pytest.fixture
def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    reg = FakeRegistry()
    val = _Validator()
    metrics = ServiceMetrics("test")
    watcher: ModelWatcher[str] = ModelWatcher(
        reg,  # type: ignore[arg-type]
        service="test",
        model_name=NAME,
        alias="champion",
        kind="embedder",
        loader=_loader,
        validator=val,
        metrics=metrics,
        poll_interval_s=0.05,
        cache_dir=tmp_path,
    )
    first = watcher.initial()
    slot = ModelSlot(first, registry_uri="http://fake-registry")
    watcher.attach(slot)
    yield reg, val, metrics, watcher, slot
    watcher.stop()


def _count(metrics: ServiceMetrics, result: str) -> float:
    return (
        metrics.registry.get_sample_value("facexplain_model_reloads_total", {"service": "test", "result": result}) or 0
    )


def _reachable(metrics: ServiceMetrics) -> float | None:
    return metrics.registry.get_sample_value("facexplain_registry_reachable", {"service": "test"})


def test_alias_move_swaps_after_validation(rig) -> None:  # type: ignore[no-untyped-def]
    reg, _val, metrics, watcher, slot = rig
    assert slot.current().version == "1" and slot.current().model == "model-1"
    assert watcher.check().changed is False  # nothing moved
    reg.alias = "2"
    out = watcher.check()
    assert out.changed and out.version == "2" and out.error == ""
    assert set(out.timings) >= {"download", "load", "validate", "total"}
    cur = slot.current()
    assert (cur.name, cur.version, cur.alias, cur.model) == (NAME, "2", "champion", "model-2")
    assert cur.metadata["golden_cosine"] == "1.0" and cur.metadata["registry_run_id"] == "run2"
    assert _count(metrics, "success") == 1
    served = metrics.registry.get_sample_value(
        "facexplain_model_served", {"service": "test", "model": NAME, "version": "2"}
    )
    assert served == 1


def test_failed_validation_keeps_old_version_and_is_reported_once(rig) -> None:  # type: ignore[no-untyped-def]
    reg, val, metrics, watcher, slot = rig
    val.bad["2"] = "validation: template dimension mismatch: metadata says 64, the model produced (128,)"
    reg.alias = "2"
    out = watcher.check()
    assert not out.changed and "dimension mismatch" in out.error
    assert slot.current().version == "1"
    status = slot.status()
    assert "v2" in status.last_reload_error and "still serving v1" in status.last_reload_error
    assert status.models[0].model.version == "1" and status.models[0].serving
    assert _count(metrics, "failed") == 1
    # polls do not retry (nor re-count) a rejected version ...
    for _ in range(3):
        watcher.check()
    assert _count(metrics, "failed") == 1 and reg.downloads.count("2") == 1
    # ... a manual reload does, from the download it already has, and succeeds once the problem is gone
    del val.bad["2"]
    out = watcher.reload_now()
    assert out.changed and slot.current().version == "2" and slot.status().last_reload_error == ""
    assert reg.downloads.count("2") == 1, "a rejected version is not downloaded again"


def test_corrupt_download_is_dropped_and_fetched_afresh(rig) -> None:  # type: ignore[no-untyped-def]
    reg, val, _metrics, watcher, slot = rig
    val.bad["2"] = "corrupt artifact: sha256 of weights/x.bin is 0123..., bundle.json says 4567..."
    reg.alias = "2"
    assert "corrupt artifact" in watcher.check().error
    assert not (watcher.cache_dir / NAME / "2").exists()  # evicted
    del val.bad["2"]
    assert watcher.reload_now().changed and slot.current().version == "2"
    assert reg.downloads.count("2") == 2


def test_incompatible_metadata_is_rejected(rig) -> None:  # type: ignore[no-untyped-def]
    reg, _val, _metrics, watcher, slot = rig
    reg.versions["3"] = {"kind": "decoder", "fr_model": {"name": "x", "version": "1"}}
    reg.alias = "3"
    out = watcher.check()
    assert not out.changed and "kind is 'decoder'" in out.error
    assert slot.current().version == "1"


def test_registry_outage_keeps_serving_and_recovers(rig) -> None:  # type: ignore[no-untyped-def]
    reg, _val, metrics, watcher, slot = rig
    watcher._reachable(True)
    reg.up = False
    out = watcher.check()
    assert "registry unreachable" in out.error and not out.changed
    assert slot.current().version == "1"
    assert slot.status().registry_reachable is False and _reachable(metrics) == 0
    assert _count(metrics, "failed") == 0  # an outage is not a failed version
    reg.up = True
    reg.alias = "2"
    out = watcher.check()
    assert out.changed and slot.status().registry_reachable is True and _reachable(metrics) == 1


def test_missing_alias_is_an_error_not_an_outage(rig) -> None:  # type: ignore[no-untyped-def]
    reg, _val, metrics, watcher, slot = rig
    reg.missing = True
    out = watcher.check()
    assert "not found" in out.error and slot.status().registry_reachable is True
    watcher.check()
    assert _count(metrics, "failed") == 1  # the same error is counted once


def test_candidate_is_listed_while_validating_and_old_version_while_draining(rig) -> None:  # type: ignore[no-untyped-def]
    reg, val, _metrics, watcher, slot = rig
    val.delay = 0.5
    reg.alias = "2"
    t = threading.Thread(target=watcher.check)
    t.start()
    deadline = time.monotonic() + 5
    seen: list[tuple[str, bool]] = []
    while time.monotonic() < deadline and not seen:
        models = slot.status().models
        if len(models) == 2:
            seen = [(m.model.version, m.serving) for m in models]
        time.sleep(0.01)
    t.join()
    assert seen == [("1", True), ("2", False)]
    # an in-flight request still holds version 1: it is listed as loaded, not serving
    held = slot._retired[-1]()
    assert held is not None and held.version == "1"
    versions = [(m.model.version, m.serving) for m in slot.status().models]
    assert versions == [("2", True), ("1", False)]
    del held


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t0


def _slow_download(reg: FakeRegistry, watcher: ModelWatcher[str], version: str) -> threading.Thread:
    """A poll of ``version`` whose download blocks until ``reg.gate`` is set, started and inside the download."""
    reg.gate, reg.entered = threading.Event(), threading.Event()
    reg.alias = version
    poll = threading.Thread(target=watcher.check)
    poll.start()
    assert reg.entered.wait(5)
    return poll


class _Context:
    """What reload_response reads of the RPC's context: its remaining deadline."""

    def __init__(self, remaining: float) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float:
        return self.remaining


def test_a_slow_download_holds_no_lock_and_other_checks_return_at_once(rig) -> None:  # type: ignore[no-untyped-def]
    reg, _val, metrics, watcher, slot = rig
    poll = _slow_download(reg, watcher, "2")
    try:
        # the watcher's lock is free while the download runs (taken here from another thread)
        took: list[bool] = []
        grab = threading.Thread(target=lambda: took.append(watcher._lock.acquire(timeout=0.1)))
        grab.start()
        grab.join()
        assert took == [True]
        watcher._lock.release()
        # a poll of the version in flight neither waits nor downloads it again
        out, elapsed = _timed(watcher.check)
        assert elapsed < 0.2 and out == type(out)(False, "1", loading=f"{NAME} v2")
        # the alias moved on: a Reload returns at once, no error, saying what is loading
        reg.alias = "3"
        out, elapsed = _timed(watcher.reload_now)
        assert elapsed < 0.2 and not out.changed and out.error == "" and out.loading == f"{NAME} v2"
        resp, elapsed = _timed(reload_response, slot, common_pb2.ReloadRequest())
        assert elapsed < 0.2 and resp.error == "" and not resp.changed and list(resp.loading) == [f"{NAME} v2"]
        assert [m.model.version for m in resp.models] == ["1"]
        # ModelStatus is not held up either
        status, elapsed = _timed(slot.status)
        assert elapsed < 0.2 and status.models[0].model.version == "1"
    finally:
        assert reg.gate is not None
        reg.gate.set()
        poll.join(5)
    assert slot.current().version == "2" and reg.downloads == ["1", "2"]
    assert _count(metrics, "success") == 1 and _count(metrics, "failed") == 0
    # once the flight has landed, the next check loads the version the alias points at now
    reg.gate = None
    assert watcher.reload_now().changed and slot.current().version == "3"


def test_concurrent_reloads_of_one_version_download_it_once(rig) -> None:  # type: ignore[no-untyped-def]
    reg, _val, metrics, watcher, slot = rig
    reg.gate, reg.alias = threading.Event(), "2"
    outs: list[Any] = []
    reloads = [threading.Thread(target=lambda: outs.append(watcher.reload_now())) for _ in range(4)]
    for t in reloads:
        t.start()
    assert reg.entered.wait(5)
    time.sleep(0.3)  # the other three resolve and find the flight
    reg.gate.set()
    for t in reloads:
        t.join(5)
    assert reg.downloads.count("2") == 1
    assert len(outs) == 4 and all(o.changed and o.version == "2" and o.error == "" for o in outs)
    assert slot.current().version == "2" and _count(metrics, "success") == 1


def test_a_reload_waits_for_the_flight_of_its_version_within_its_deadline(rig) -> None:  # type: ignore[no-untyped-def]
    reg, val, metrics, watcher, slot = rig
    val.bad["2"] = "validation: golden cosine 0.2 < 0.99"
    poll = _slow_download(reg, watcher, "2")
    try:
        # the RPC's remaining deadline bounds the wait; then it says the version is still loading
        resp, elapsed = _timed(reload_response, slot, common_pb2.ReloadRequest(), _Context(0.1))
        assert 0.09 < elapsed < 1.0 and resp.error == "" and list(resp.loading) == [f"{NAME} v2"]
        waiting: list[Any] = []
        reload = threading.Thread(target=lambda: waiting.append(watcher.reload_now()))
        reload.start()
        time.sleep(0.1)
    finally:
        assert reg.gate is not None
        reg.gate.set()
        poll.join(5)
    reload.join(5)
    # the waiting Reload reports the poll's rejection instead of loading the version a second time
    assert len(waiting) == 1 and not waiting[0].changed and "golden cosine" in waiting[0].error
    assert reg.downloads.count("2") == 1 and _count(metrics, "failed") == 1
    assert slot.current().version == "1"
    # a later Reload retries it, from the kept download, and counts the failure again
    reg.gate = None
    assert "golden cosine" in watcher.reload_now().error
    assert reg.downloads.count("2") == 1 and _count(metrics, "failed") == 2


def test_poll_thread_picks_up_alias_move(rig) -> None:  # type: ignore[no-untyped-def]
    reg, _val, _metrics, watcher, slot = rig
    watcher.start()
    reg.alias = "3"
    deadline = time.monotonic() + 5
    while slot.current().version != "3" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slot.current().version == "3"


def test_reload_rpc_without_registry_and_wrong_name(rig) -> None:  # type: ignore[no-untyped-def]
    _reg, _val, _metrics, _watcher, slot = rig
    local = ModelSlot(ServedModel(name="dlib-resnet128", version="local", kind="embedder", model="m"))
    resp = reload_response(local, common_pb2.ReloadRequest())
    assert "no registry configured" in resp.error and not resp.changed
    assert resp.models[0].model.version == "local"
    with pytest.raises(NotFound):
        reload_response(slot, common_pb2.ReloadRequest(model_name="facexplain-fr-other"))
    resp = reload_response(slot, common_pb2.ReloadRequest(model_name=NAME))
    assert resp.error == "" and not resp.changed


def test_metadata_problems_and_conventions() -> None:
    info = VersionInfo(NAME, "5", tags={**TAGS, "template_dim": "64"})
    problems = metadata_problems("embedder", info, {**META, "template_dim": 128})
    assert any("tag template_dim=64 but the bundle says 128" in p for p in problems)
    decoder = {
        "format_version": BUNDLE_FORMAT,
        "kind": "decoder",
        "name": "facexplain-dfd-dlib128",
        "template_dim": 128,
        "input": {},
        "components": {},
        "fr_model": {"name": "facexplain-fr-dlib128", "version": "2"},
    }
    dec_tags = {t: "x" for t in REQUIRED_TAGS["decoder"]} | {"kind": "decoder", "template_dim": "128"}
    dec_info = VersionInfo("facexplain-dfd-dlib128", "1", tags=dec_tags)
    fr = {"fr_model_name": "facexplain-fr-dlib128", "fr_model_version": "2"}
    assert metadata_problems("decoder", dec_info, decoder, fr) == []
    wrong = metadata_problems("decoder", dec_info, decoder, {**fr, "fr_model_version": "3"})
    assert wrong == ["fr_model_version is '2', this service needs '3'"]
    bare = VersionInfo(NAME, "6", tags={})
    assert "version lacks required tags" in " ".join(metadata_problems("embedder", bare, META))
    assert missing_tags("embedder", TAGS) == []
    assert public_uri("https://user:secret@mlflow.example:8443/path?token=abc") == "https://mlflow.example:8443/path"
    assert public_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_cli_constants_match_registry_conventions() -> None:
    from cli import registry as registry_cli
    from registry import conventions as registry

    assert registry_cli.DEFAULT_FR_MODEL == registry.DEFAULT_FR_MODEL
    assert registry_cli.CHAMPION == registry.CHAMPION
    registry.check_model_name(registry.DEFAULT_FR_MODEL)
    with pytest.raises(registry.RegistryError):
        registry.check_model_name("My Model")
