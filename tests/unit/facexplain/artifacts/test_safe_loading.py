"""Bundles are data, never code: crafted pickles and files outside the checksum list are refused."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from facexplain.artifacts.bundle import (
    BUNDLE_JSON,
    BundleError,
    check_layout,
    file_sha256,
    load_tensor_file,
    pickle_globals,
)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_plain_state_dict_loads(tmp_path: Path) -> None:
    state = {"w": torch.randn(3, 2), "n": torch.tensor(5, dtype=torch.long), "h": torch.ones(2).half()}
    torch.save(state, tmp_path / "ok.pt")
    back = load_tensor_file(tmp_path / "ok.pt", "net")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_reduce_payload_is_refused_by_name_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"w": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(
        BundleError, match=r"refused: component 'recognition': evil.pt carries a pickle payload .*posix\.system"
    ):
        load_tensor_file(tmp_path / "evil.pt", "recognition")
    assert not marker.exists()


def test_protocol_4_stack_global_is_resolved_and_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    data = pickle.dumps({"w": _Payload(marker)}, protocol=4)
    assert "posix system" in pickle_globals(data)
    # the same pickle inside a torch-shaped archive: refused before torch.load sees it
    with zipfile.ZipFile(tmp_path / "evil4.pt", "w") as zf:
        zf.writestr("evil4/data.pkl", data)
    with pytest.raises(BundleError, match=r"posix\.system"):
        load_tensor_file(tmp_path / "evil4.pt", "decoder")
    assert not marker.exists()


def test_legacy_or_foreign_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with pytest.raises(BundleError, match="not a torch zip archive"):
        load_tensor_file(tmp_path / "raw.pt", "decoder")


def _bundle(root: Path, files: dict[str, bytes], meta_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    meta = {"files": {rel: file_sha256(root / rel) for rel in files}, **(meta_extra or {})}
    (root / BUNDLE_JSON).write_text(json.dumps(meta))
    return meta


def test_layout_accepts_a_listed_bundle(tmp_path: Path) -> None:
    meta = _bundle(
        tmp_path, {"weights/a.pt": b"a", "golden/face.png": b"b"}, {"components": {"x": {"file": "weights/a.pt"}}}
    )
    check_layout(tmp_path, meta)


def test_unlisted_file_is_refused(tmp_path: Path) -> None:
    meta = _bundle(tmp_path, {"weights/a.pt": b"a"})
    (tmp_path / "weights" / "extra.pt").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"weights/extra\.pt is in the bundle but not listed"):
        check_layout(tmp_path, meta)


def test_component_reading_an_unlisted_path_is_refused(tmp_path: Path) -> None:
    meta = _bundle(tmp_path, {"weights/a.pt": b"a"}, {"components": {"recognition": {"file": "../outside.pt"}}})
    with pytest.raises(BundleError, match=r"component 'recognition' reads '\.\./outside\.pt'"):
        check_layout(tmp_path, meta)


def test_listed_path_escaping_the_bundle_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (tmp_path / "secret").write_bytes(b"s")
    meta = {"files": {"../secret": file_sha256(tmp_path / "secret")}}
    (root / BUNDLE_JSON).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="lies outside the bundle"):
        check_layout(root, meta)


def test_symlink_is_refused(tmp_path: Path) -> None:
    meta = _bundle(tmp_path, {"weights/a.pt": b"a"})
    (tmp_path / "weights" / "link.pt").symlink_to(tmp_path / "weights" / "a.pt")
    with pytest.raises(BundleError, match="symbolic link"):
        check_layout(tmp_path, meta)
