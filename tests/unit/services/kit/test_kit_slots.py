"""Kit pieces a service with several models (or a model with no local fallback) relies on.

Empty slots (UNAVAILABLE until a version loads), the watcher filling one, ModelStatus and Reload over
several slots, the served-model gauge keyed by kind, and the template version check. In-memory
registry, no server, no weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from facexplain.artifacts.bundle import BUNDLE_FORMAT
from registry import REQUIRED_TAGS, RegistryNotFound, VersionInfo
from services.api.v1 import common_pb2
from services.kit.config import ServiceSettings
from services.kit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.kit.metrics import ServiceMetrics
from services.kit.models import ModelSlot, ServedModel, combined_status
from services.kit.reload import ModelWatcher, reload_response, serve_from_registry
from services.kit.templates import template_from_proto

DECODER = "facexplain-dfd-test"
TAGS = {t: "x" for t in REQUIRED_TAGS["decoder"]} | {"kind": "decoder", "template_dim": "4"}
META = {
    "format_version": BUNDLE_FORMAT,
    "kind": "decoder",
    "name": DECODER,
    "template_dim": 4,
    "input": {},
    "components": {},
    "fr_model": {"name": "facexplain-fr-test", "version": "1"},
}


class Registry:
    """resolve/download like registry.client.Registry; ``alias`` None = no such model yet."""

    uri = "http://fake-registry"

    def __init__(self) -> None:
        self.alias: str | None = None

    def resolve(self, name: str, alias: str) -> VersionInfo:
        if self.alias is None:
            raise RegistryNotFound(f"resolve {name}@{alias}: Registered Model with name={name} not found")
        return VersionInfo(name, self.alias, alias, tags=dict(TAGS))

    def download(self, info: VersionInfo, cache_dir: Path, *, keep: int = 3, protect: tuple[Path, ...] = ()) -> Path:
        path = Path(cache_dir) / info.name / info.version
        path.mkdir(parents=True, exist_ok=True)
        (path / "bundle.json").write_text(json.dumps(META))
        return path

    def evict(self, name: str, version: str, cache_dir: Path) -> None:
        shutil.rmtree(Path(cache_dir) / name / version, ignore_errors=True)


def _served(name: str, version: str, kind: str = "embedder") -> ServedModel[str]:
    return ServedModel(name=name, version=version, kind=kind, model=f"{name}-{version}")


def _empty_slot_with_watcher(tmp_path: Path) -> tuple[Registry, ModelWatcher[str], ModelSlot[str], ServiceMetrics]:
    reg = Registry()
    metrics = ServiceMetrics("test")
    watcher: ModelWatcher[str] = ModelWatcher(
        reg,  # type: ignore[arg-type]
        service="test",
        model_name=DECODER,
        alias="champion",
        kind="decoder",
        loader=lambda path, info, device: f"decoder-{info.version}",
        validator=lambda model, path, meta: {},
        metrics=metrics,
        poll_interval_s=60,
        cache_dir=tmp_path,
    )
    slot: ModelSlot[str] = ModelSlot(None, registry_uri=reg.uri, label="decoder")
    watcher.attach(slot)
    return reg, watcher, slot, metrics


def test_empty_slot_is_unavailable_until_the_watcher_loads_a_version(tmp_path: Path) -> None:
    reg, watcher, slot, metrics = _empty_slot_with_watcher(tmp_path)
    assert slot.peek() is None and slot.loaded() == []
    out = watcher.check()
    assert not out.changed and "not found" in out.error and out.version == ""
    with pytest.raises(Unavailable) as info:
        slot.current()
    assert "no decoder loaded yet" in info.value.message and DECODER in info.value.message
    assert "keeps polling" in info.value.message
    reg.alias = "3"
    out = watcher.check()
    assert out.changed and out.version == "3"
    cur = slot.current()
    assert (cur.name, cur.version, cur.model) == (DECODER, "3", "decoder-3")
    assert [m.model.version for m in slot.status().models] == ["3"] and slot.status().last_reload_error == ""
    served = metrics.registry.get_sample_value(
        "facexplain_model_served", {"service": "test", "model": DECODER, "version": "3"}
    )
    assert served == 1


def test_serve_from_registry_without_registry_and_without_fallback_starts_empty() -> None:
    metrics = ServiceMetrics("test")
    slot, watcher = serve_from_registry(
        ServiceSettings(registry_uri=""),
        metrics,
        kind="decoder",
        loader=lambda path, info, device: "x",
        validator=lambda model, path, meta: {},
        fallback=None,
    )
    assert watcher is None and slot.peek() is None
    with pytest.raises(Unavailable) as info:
        slot.current()
    assert "FACEXPLAIN_REGISTRY_URI" in info.value.message
    resp = reload_response(slot, common_pb2.ReloadRequest())
    assert resp.error == "no registry configured: no decoder to load" and list(resp.models) == []


def test_status_and_reload_over_several_slots(tmp_path: Path) -> None:
    reg, _watcher, decoder, _metrics = _empty_slot_with_watcher(tmp_path)
    decoder.record_failure("start-up: facexplain-dfd-test@champion not loaded: not found")
    fr: ModelSlot[str] = ModelSlot(_served("dlib-resnet128", "local"), label="embedder")
    status = combined_status([decoder, fr])
    assert [(m.kind, m.model.version) for m in status.models] == [("embedder", "local")]
    assert status.last_reload_error == "decoder: start-up: facexplain-dfd-test@champion not loaded: not found"
    assert status.registry_uri == reg.uri and status.registry_reachable  # only the decoder slot uses one
    assert status.HasField("last_reload_at")

    reg.alias = "1"
    resp = reload_response([decoder, fr], common_pb2.ReloadRequest())
    assert resp.changed and [(m.kind, m.model.version) for m in resp.models] == [
        ("decoder", "1"),
        ("embedder", "local"),
    ]
    assert resp.error == "embedder: no registry configured: serving local weights"
    only = reload_response([decoder, fr], common_pb2.ReloadRequest(model_name=DECODER))
    assert only.error == "" and not only.changed
    with pytest.raises(NotFound) as info:
        reload_response([decoder, fr], common_pb2.ReloadRequest(model_name="facexplain-fr-other"))
    assert DECODER in info.value.message and "dlib-resnet128" in info.value.message


def test_served_gauge_keeps_one_entry_per_kind() -> None:
    metrics = ServiceMetrics("test")

    def served() -> set[tuple[str, str]]:
        return {
            (s.labels["model"], s.labels["version"])
            for fam in metrics.registry.collect()
            if fam.name == "facexplain_model_served"
            for s in fam.samples
        }

    metrics.set_served("dlib-resnet128", "local", "embedder")
    metrics.set_served("facexplain-dfd-dlib128", "1", "decoder")
    metrics.set_served("facexplain-fr-dlib128", "2", "embedder")  # local -> registry: replaces
    metrics.set_served("facexplain-dfd-dlib128", "1", "decoder")  # idempotent
    assert served() == {("facexplain-fr-dlib128", "2"), ("facexplain-dfd-dlib128", "1")}


def _template(**model: Any) -> common_pb2.Template:
    return common_pb2.Template(values=[0.5, -1.0, 2.0, 0.25], model=common_pb2.ModelRef(**model))


def test_template_version_is_checked_when_both_sides_name_one() -> None:
    name = "facexplain-fr-dlib128"
    vec = template_from_proto(_template(name=name, version="2"), 4, name, model_version="2")
    assert torch.equal(vec, torch.tensor([0.5, -1.0, 2.0, 0.25]))
    template_from_proto(_template(name=name), 4, name, model_version="2")  # template names no version
    template_from_proto(_template(name=name, version="7"), 4, name)  # caller names none
    with pytest.raises(FailedPrecondition) as info:
        template_from_proto(_template(name=name, version="7"), 4, name, model_version="2")
    assert "version 7" in info.value.message and "version 2" in info.value.message
    with pytest.raises(FailedPrecondition):
        template_from_proto(_template(version="7"), 4, name, model_version="2")  # unnamed model, other version
    with pytest.raises(InvalidArgument):
        template_from_proto(common_pb2.Template(values=[0.0] * 4), 4, name, model_version="2")
