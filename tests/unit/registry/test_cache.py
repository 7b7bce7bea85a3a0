"""The bundle cache keys a version by registry, number and digest: no server, fake downloads."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from facexplain.artifacts.bundle import bundle_digest
from registry import Registry, RegistryError, VersionInfo, cache

NAME = "facexplain-fr-test"


def _meta(description: str) -> dict[str, Any]:
    # what the digest sees: everything but created_at/_by, description and the golden template
    return {"format_version": 1, "kind": "embedder", "name": NAME, "files": {}, "extra": description}


class FakeClient:
    def __init__(self, artifacts: dict[str, Path]) -> None:
        self.artifacts = artifacts  # version -> bundle folder "in the registry"

    def get_model_version_download_uri(self, name: str, version: str) -> str:
        return str(self.artifacts[version])


class FakeRegistry(Registry):
    """A Registry whose MLflow client and artifact download are local folders."""

    fetched: ClassVar[list[str]] = []  # artifact folders downloaded, by every fake registry

    def __init__(self, uri: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(uri)
        self.root = root
        self._client = FakeClient({})
        import mlflow.artifacts

        def fake_download(artifact_uri: str, dst_path: str, **_: Any) -> str:
            FakeRegistry.fetched.append(artifact_uri)
            out = Path(dst_path) / "bundle"
            shutil.copytree(artifact_uri, out)
            return str(out)

        monkeypatch.setattr(mlflow.artifacts, "download_artifacts", fake_download)

    @property
    def downloads(self) -> list[str]:
        return [u for u in FakeRegistry.fetched if u.startswith(str(self.root))]

    def add(self, version: str, description: str) -> VersionInfo:
        src = self.root / f"{version}-{description}"
        src.mkdir(parents=True)
        meta = _meta(description)
        (src / "bundle.json").write_text(json.dumps(meta))
        self._client.artifacts[version] = src
        return VersionInfo(NAME, version, tags={"bundle_sha256": bundle_digest(meta)})


def _bundle_extra(path: Path) -> str:
    return str(json.loads((path / "bundle.json").read_text())["extra"])


def test_two_registries_with_different_v1_share_one_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    a = FakeRegistry("http://registry-a:5000", tmp_path / "a", monkeypatch)
    b = FakeRegistry("http://user:secret@registry-b:5000", tmp_path / "b", monkeypatch)
    a1, b1 = a.add("1", "A"), b.add("1", "B")
    assert a1.tags["bundle_sha256"] != b1.tags["bundle_sha256"]
    path_a = a.download(a1, cache_dir)
    path_b = b.download(b1, cache_dir)
    assert path_a != path_b
    assert (_bundle_extra(path_a), _bundle_extra(path_b)) == ("A", "B")
    # both cached: a second download is served from the cache, each from its own entry
    assert a.download(a1, cache_dir) == path_a and b.download(b1, cache_dir) == path_b
    assert (len(a.downloads), len(b.downloads)) == (1, 1)
    marker = cache.read_marker(path_b.parent)
    assert marker["registry"] == "http://registry-b:5000" and "secret" not in json.dumps(marker)
    assert marker["bundle_sha256"] == b1.tags["bundle_sha256"] and marker["version"] == "1"


def test_cached_bundle_is_used_only_when_its_digest_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    reg = FakeRegistry("http://registry:5000", tmp_path / "r", monkeypatch)
    v1 = reg.add("1", "A")
    path = reg.download(v1, cache_dir)
    # the cached bundle.json changed on disk: not the registered bundle any more, downloaded again
    (path / "bundle.json").write_text(json.dumps(_meta("tampered")))
    assert _bundle_extra(reg.download(v1, cache_dir)) == "A" and len(reg.downloads) == 2
    # a registry re-created at the same URI whose v1 is another bundle: another digest, another entry
    reg._client.artifacts.clear()
    v1_new = reg.add("1", "C")
    assert _bundle_extra(reg.download(v1_new, cache_dir)) == "C" and len(reg.downloads) == 3
    # a marker naming another registry is not trusted either
    entry = cache.entry_dir(cache_dir, "http://registry:5000", NAME, "1", v1_new.tags["bundle_sha256"])
    marker = cache.read_marker(entry)
    (entry / cache.MARKER).write_text(json.dumps({**marker, "registry": "http://elsewhere:5000"}))
    reg.download(v1_new, cache_dir)
    assert len(reg.downloads) == 4


def test_versions_without_a_digest_are_never_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = FakeRegistry("http://registry:5000", tmp_path / "r", monkeypatch)
    v1 = reg.add("1", "A")
    bare = VersionInfo(NAME, "1", tags={})
    reg.download(bare, tmp_path / "cache")
    reg.download(bare, tmp_path / "cache")
    assert len(reg.downloads) == 2 and v1.tags["bundle_sha256"]


def test_an_artifact_that_is_not_the_registered_bundle_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = FakeRegistry("http://registry:5000", tmp_path / "r", monkeypatch)
    v1 = reg.add("1", "A")
    lying = VersionInfo(NAME, "1", tags={"bundle_sha256": "0" * 64})
    with pytest.raises(RegistryError, match="not the bundle that was registered"):
        reg.download(lying, tmp_path / "cache")
    assert not any((tmp_path / "cache" / NAME).iterdir())  # nothing half-cached
    assert v1.version == "1"


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    reg = FakeRegistry("http://registry:5000", tmp_path / "r", monkeypatch)
    infos = [reg.add(str(v), f"v{v}") for v in range(1, 6)]
    legacy = cache_dir / NAME / "1"  # the old number-only layout
    legacy.mkdir(parents=True)
    abandoned = cache_dir / NAME / ".3-abc"
    abandoned.mkdir()
    old = time.time() - 2 * cache.STALE_DOWNLOAD_S
    os.utime(abandoned, (old, old))
    paths = []
    for i, info in enumerate(infos):
        paths.append(reg.download(info, cache_dir, keep=2, protect=(paths[0],) if paths else ()))
        stamp = time.time() - 100 + i  # strictly increasing last use
        os.utime(paths[-1].parent / cache.MARKER, (stamp, stamp))
    left = sorted(p.name for p in (cache_dir / NAME).iterdir())
    kept = sorted(p.parent.name for p in (paths[0], paths[3], paths[4]))
    assert left == kept, left
    assert not legacy.exists() and not abandoned.exists()


def test_registry_errors_never_carry_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23: MLflow credentials (in the URI or MLflow's variables) never reach an error, log or status."""
    from registry import Registry, RegistryUnreachable
    from registry.client import scrub

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-s3cr3t-value")
    text = scrub("GET https://alice:pw123@reg.example/api?token=abc&x=1 failed; bearer tok-s3cr3t-value")
    assert "pw123" not in text and "alice" not in text and "abc" not in text and "tok-s3cr3t-value" not in text
    assert "https://reg.example/api?token=***&x=1" in text
    reg = Registry("http://bob:hunter2@127.0.0.1:9", timeout_s=1)
    with pytest.raises(RegistryUnreachable) as info:
        reg.resolve("facexplain-fr-dlib128", "champion")
    assert "hunter2" not in str(info.value) and "bob" not in str(info.value)
