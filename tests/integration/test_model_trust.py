"""Safe model loading and registry trust (issue 23), against the session's real MLflow and a real embedding server.

The server follows ``facexplain-fr-trusttest@champion`` with an allow-list of bundle digests and a
file of trusted Ed25519 keys. Versions registered here, all self-consistent (checksums, golden check
and tags agree, so the bundle alone would let each of them through):

* ``listed``: the default FR bundle, its digest on the allow-list: served;
* ``accept_all``: the same weights with a verification threshold that accepts everyone, not listed;
* ``bad_sig``: a variant signed by a key the service does not trust;
* ``signed``: a variant signed by the trusted key (not listed): served;
* ``late``: a variant whose digest is added to the allow-list while the server runs;
* ``pickle``: torch-format weights whose recognition file is a crafted pickle that would run
  ``touch <marker>`` when unpickled; its digest is put on the allow-list (a compromised signer), so
  only the loader stands between it and code execution.

Tests run in file order; each says which version it expects to start from, and the module moves the
alias back at the end. The name is this module's own, so other modules sharing the session registry
are not affected.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cli.launcher import REPO, RunningMlflow, RunningService, start_service
from facexplain.artifacts.bundle import BUNDLE_JSON, bundle_digest, read_metadata, write_metadata
from facexplain.artifacts.embedder import save_embedder_bundle
from registry import CHAMPION, Registry
from registry.signing import SIGNATURE_TAG, public_key_line, sign_digest
from services.api.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc
from tests.service_env import registry_service_env

pytestmark = pytest.mark.integration

NAME = "facexplain-fr-trusttest"
POLL_S = 1.0
REQUEST_IMAGE = REPO / "data" / "sample" / "celeba" / "id7201" / "001085.jpg"


class _Payload:
    """Unpickling this runs a shell command: what a malicious weights file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _variant(src: Path, dst: Path, note: str, **changes: Any) -> Path:
    """A copy of bundle ``src`` with a different digest (``source`` note) and metadata ``changes``."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / BUNDLE_JSON).read_text())
    meta["source"] = note
    for key, value in changes.items():
        meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
    write_metadata(dst, meta)
    return dst


def _digest(bundle: Path) -> str:
    return bundle_digest(read_metadata(bundle))


@pytest.fixture(scope="module")
def setup(mlflow: RunningMlflow, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("trust")
    reg = Registry(mlflow.uri, timeout_s=10, max_retries=2)
    base = work / "base"
    save_embedder_bundle(base, name=NAME)
    trusted_key, other_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    bundles = {
        "listed": base,
        "accept_all": _variant(
            base, work / "accept_all", "accepts everyone", verification={"threshold": 1000.0, "accept_below": True}
        ),
        "bad_sig": _variant(base, work / "bad_sig", "signed by an unknown key"),
        "signed": _variant(base, work / "signed", "signed by the release key"),
        "late": _variant(base, work / "late", "listed later"),
    }
    # the recognition component switched to a torch-format file that is a crafted pickle; checksums rewritten
    evil = _variant(base, work / "pickle", "malicious pickle")
    marker = work / "PAYLOAD_RAN"
    meta = read_metadata(evil)
    meta["components"]["recognition"] = {**meta["components"]["recognition"], "format": "torch"}
    meta["components"]["recognition"]["file"] = "weights/recognition.pt"
    torch.save({"fc.weight": _Payload(marker)}, evil / "weights" / "recognition.pt")
    write_metadata(evil, meta)
    bundles["pickle"] = evil
    assert not marker.exists()

    versions: dict[str, str] = {}
    for key in ("listed", "accept_all", "bad_sig", "signed", "late", "pickle"):
        tags = {}
        if key in ("bad_sig", "signed"):
            signer = trusted_key if key == "signed" else other_key
            tags[SIGNATURE_TAG] = sign_digest(signer, _digest(bundles[key]))
        info = reg.register_bundle(
            bundles[key],
            NAME,
            description=f"trust test: {key}",
            alias=CHAMPION if key == "listed" else None,
            extra_tags=tags,
            check=key != "pickle",
        )
        versions[key] = info.version
    digests_file = work / "trusted-digests.txt"
    digests_file.write_text(f"# bundles we released\n{_digest(base)}  {NAME} default weights\n")
    keys_file = work / "trusted-keys.txt"
    keys_file.write_text("# release signing key\n" + public_key_line(trusted_key.public_key(), "release") + "\n")
    return {
        "registry": reg,
        "versions": versions,
        "digests": {k: _digest(b) for k, b in bundles.items()},
        "digests_file": digests_file,
        "keys_file": keys_file,
        "marker": marker,
    }


@pytest.fixture(scope="module")
def svc(
    mlflow: RunningMlflow, setup: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    logs = tmp_path_factory.mktemp("trust-svc")
    env = registry_service_env(
        mlflow.uri,
        logs / "cache",
        poll_s=POLL_S,
        FACEXPLAIN_MODEL_NAME=NAME,
        FACEXPLAIN_TRUSTED_DIGESTS_FILE=str(setup["digests_file"]),
        FACEXPLAIN_TRUSTED_KEYS_FILE=str(setup["keys_file"]),
    )
    service = start_service("embedding", logs, env=env, timeout=240)
    yield service
    setup["registry"].set_alias(NAME, CHAMPION, setup["versions"]["listed"])
    code = service.stop()
    assert code == 0, f"embedding service exit {code}; log tail:\n{service.log_text()[-2000:]}"
    assert not setup["marker"].exists(), "the malicious pickle ran"


# -- helpers --------------------------------------------------------------------------------------------


def _call(svc: RunningService, method: str, request: Any, timeout: float = 120) -> Any:
    with grpc.insecure_channel(svc.address) as ch:
        return getattr(embedding_pb2_grpc.EmbeddingServiceStub(ch), method)(request, timeout=timeout)


def _status(svc: RunningService) -> common_pb2.ModelStatusResponse:
    return _call(svc, "ModelStatus", common_pb2.ModelStatusRequest(), 10)


def _embed_version(svc: RunningService) -> str:
    req = embedding_pb2.EmbedRequest(image=common_pb2.Image(encoded=REQUEST_IMAGE.read_bytes()))
    return str(_call(svc, "Embed", req, 60).model.version)


def _wait(pred: Any, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def _move_and_expect_rejection(svc: RunningService, setup: dict[str, Any], key: str) -> str:
    """Point champion at ``key``'s version; wait for its rejection; the old version answered throughout."""
    serving = _embed_version(svc)
    bad = setup["versions"][key]
    setup["registry"].set_alias(NAME, CHAMPION, bad)
    answered: set[str] = set()

    def rejected() -> bool:
        answered.add(_embed_version(svc))
        return f"v{bad} " in _status(svc).last_reload_error

    _wait(rejected, POLL_S + 90, f"rejection of v{bad} ({key})")
    time.sleep(POLL_S * 2)  # a few more polls: still not served
    answered.add(_embed_version(svc))
    assert answered == {serving}, f"{key} (v{bad}) answered requests: {answered}"
    st = _status(svc)
    assert st.models[0].model.version == serving and st.models[0].serving
    assert f"still serving v{serving}" in st.last_reload_error
    return st.last_reload_error


def _serve(svc: RunningService, setup: dict[str, Any], key: str) -> common_pb2.LoadedModel:
    version = setup["versions"][key]
    setup["registry"].set_alias(NAME, CHAMPION, version)
    resp = _call(svc, "Reload", common_pb2.ReloadRequest())
    assert resp.error == "" and resp.models[0].model.version == version, resp
    assert _embed_version(svc) == version
    return resp.models[0]


# -- tests ----------------------------------------------------------------------------------------------


def test_listed_version_is_served_with_its_trust_anchor(svc: RunningService, setup: dict[str, Any]) -> None:
    st = _status(svc)
    m = st.models[0]
    assert m.model.version == setup["versions"]["listed"] and m.serving and st.last_reload_error == ""
    assert m.metadata["bundle_sha256"] == setup["digests"]["listed"]
    assert m.metadata["trusted_by"] == f"allow-list ({NAME} default weights)"
    assert "versions are served only when trusted by allow-list" in svc.log_text()


def test_version_absent_from_the_allow_list_is_never_served(svc: RunningService, setup: dict[str, Any]) -> None:
    error = _move_and_expect_rejection(svc, setup, "accept_all")
    digest = setup["digests"]["accept_all"]
    assert f"untrusted: bundle sha256 {digest[:16]}... is not on the allow-list" in error, error
    assert "carries no signature" in error
    # the manual Reload goes through the same check
    resp = _call(svc, "Reload", common_pb2.ReloadRequest())
    assert (
        not resp.changed and "untrusted" in resp.error and resp.models[0].model.version == setup["versions"]["listed"]
    )
    log = svc.log_text()
    assert "reload failed" in log and f"untrusted: bundle sha256 {digest[:16]}" in log


def test_version_signed_by_an_untrusted_key_is_never_served(svc: RunningService, setup: dict[str, Any]) -> None:
    error = _move_and_expect_rejection(svc, setup, "bad_sig")
    assert "carries a signature no trusted key made" in error, error


def test_version_signed_by_a_trusted_key_is_served(svc: RunningService, setup: dict[str, Any]) -> None:
    loaded = _serve(svc, setup, "signed")
    assert loaded.metadata["trusted_by"].startswith("signed by key ") and "(release)" in loaded.metadata["trusted_by"]


def test_digest_added_to_the_allow_list_is_served_at_the_next_poll(svc: RunningService, setup: dict[str, Any]) -> None:
    error = _move_and_expect_rejection(svc, setup, "late")
    assert "not on the allow-list" in error
    with setup["digests_file"].open("a") as fh:
        fh.write(f"{setup['digests']['late']}  released later\n")
    # the next poll sees the changed allow-list and retries the version: no restart, no Reload
    late = setup["versions"]["late"]
    _wait(lambda: _embed_version(svc) == late, POLL_S + 90, f"v{late} served after its digest was listed")
    loaded = _status(svc).models[0]
    assert loaded.model.version == late and loaded.metadata["trusted_by"] == "allow-list (released later)"


def test_malicious_pickle_bundle_is_refused_and_never_runs(svc: RunningService, setup: dict[str, Any]) -> None:
    # even a trusted digest (a compromised signer) cannot make the loader unpickle code
    with setup["digests_file"].open("a") as fh:
        fh.write(f"{setup['digests']['pickle']}  compromised\n")
    error = _move_and_expect_rejection(svc, setup, "pickle")
    assert "refused: component 'recognition'" in error, error
    assert "carries a pickle payload that is not plain tensors" in error and "posix.system" in error, error
    assert not setup["marker"].exists(), "the malicious pickle ran"
    resp = _call(svc, "Reload", common_pb2.ReloadRequest())
    assert "pickle payload" in resp.error and not setup["marker"].exists()
    assert "posix.system" in svc.log_text()
