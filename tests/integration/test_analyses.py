"""The DFD analyses the audit adds (occlusion §4.3.2, aggregation §4.4, privacy §4.5) over real services.

The services follow the session's registry (``facexplain-fr-dlib128`` v1 and the demo decoder trained
for it, both champion; fixtures in tests/servers.py) and run on loopback without TLS. Each test drives
one audit step (``sdk.audit.Audit``) against them on the bundled sample faces, as ``facexplain audit``
does, then checks the section it wrote and its pictures; the RPCs that serve the analyses are also fed
bad input and must answer with a precise status, and keep serving.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from PIL import Image

from cli.launcher import REPO, RunningMlflow, RunningService, start_service
from registry import VersionInfo
from sdk.audit import CLIENTS, Audit, AuditConfig, AuditInputs, load_faces
from sdk.audit_report import render_html
from sdk.client import image_from_path, wait_ready
from services.api.v1 import common_pb2, decoding_pb2
from tests.servers import start_side_by_side
from tests.service_env import registry_service_env

pytestmark = pytest.mark.integration

SAMPLE = REPO / "data" / "sample" / "celeba"
FLEET = ("decoding",)
SEED = 5


@pytest.fixture(scope="module")
def fleet(
    mlflow: RunningMlflow, decoder_v1: VersionInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningService]]:
    logs = tmp_path_factory.mktemp("analyses-svc")

    def start(name: str) -> RunningService:
        (logs / name).mkdir()
        env = registry_service_env(mlflow.uri, logs / name / "cache", FACEXPLAIN_MAX_BATCH_SIZE="16")
        return start_service(name, logs / name, env=env, timeout=600)

    running = start_side_by_side(FLEET, start)
    yield running
    for name, svc in running.items():
        code = svc.stop()
        assert code == 0, f"{name} service exit {code}; log tail:\n{svc.log_text()[-2000:]}"


@pytest.fixture(scope="module")
def audit(fleet: dict[str, RunningService], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audit]:
    """An audit connected to the fleet (only the services these steps use), once each has its decoder."""
    out = tmp_path_factory.mktemp("analyses-report")
    cfg = AuditConfig("facexplain-fr-dlib128@champion", data=SAMPLE, out=out, seed=SEED, quiet=True)
    cfg.max_occlusions = 2
    a = Audit(cfg)
    deadline = time.monotonic() + 300
    for name, svc in fleet.items():
        client = CLIENTS[name](svc.address, timeout=300)
        wait_ready(client.channel, 60)
        if name != "embedding":
            while not any(m.kind == "decoder" and m.serving for m in client.model_status().models):
                assert time.monotonic() < deadline, f"{name}: no decoder after 300 s"
                time.sleep(0.5)
        a.clients[name] = client
    yield a
    for client in a.clients.values():
        client.close()


@pytest.fixture(scope="module")
def inputs() -> AuditInputs:
    faces, labels, _ = load_faces(SAMPLE)
    return AuditInputs(faces, faces, labels)


def _step(audit: Audit, name: str, inputs: AuditInputs) -> dict[str, Any]:
    with audit.step(name) as sec:
        getattr(audit, name)(inputs, sec)
    return audit.result[name]


def _rejected(svc: RunningService, method: str, request: Any) -> grpc.RpcError:
    from services.api.v1 import decoding_pb2_grpc

    with grpc.insecure_channel(svc.address) as ch, pytest.raises(grpc.RpcError) as info:
        getattr(decoding_pb2_grpc.DecodingServiceStub(ch), method)(request, timeout=120)
    assert isinstance(info.value, grpc.RpcError)
    return info.value


# -- occlusion (DFD §4.3.2) --------------------------------------------------------------------------------


def test_occlusion_section(audit: Audit, inputs: AuditInputs) -> None:
    sec = _step(audit, "occlusion", inputs)
    assert len(sec["faces"]) == 2 and not sec["failed"]
    assert sec["decoder"]["version"] == "1" and sec["fr_model"]["version"] == "1"
    for f in sec["faces"]:
        assert [r["region"] for r in f["regions"]] == ["eyes", "nose", "mouth"]
        with Image.open(audit.out / f["grid"]) as im:
            assert im.size[0] > 2 * im.size[1]  # four columns: clean face, then each region
        for r in f["regions"]:
            assert 0.03 < r["occluded_fraction"] < 0.4
            # the occluder moved the template, but the template kept most of the face
            assert 0.5 < r["template_cosine"] < 0.9999
            # the decoder's picture inside the hidden region is nearer the face than the black occluder
            assert r["inside_to_original"] < r["inside_to_occluder"] and r["fills_in"]
    assert set(sec["summary"]) == {"eyes", "nose", "mouth"}
    assert all(s["n"] == 2 for s in sec["summary"].values())
    page = render_html({"audit": {"fr_model": "x", "seed": SEED}, "data": _data(), "occlusion": sec})
    assert 'id="occlusion"' in page and "inside: error to face" in page


def _data() -> dict[str, Any]:
    return {
        "name": "celeba",
        "n_images": 30,
        "n_identities": 10,
        "labels": [],
        "manifest_sha256": "0" * 64,
        "audited": [],
    }


def test_occlude_rejects_bad_requests_and_keeps_serving(fleet: dict[str, RunningService], audit: Audit) -> None:
    svc = fleet["decoding"]
    face = image_from_path(SAMPLE / "id7201" / "001085.jpg")
    err = _rejected(svc, "Occlude", decoding_pb2.OccludeRequest(image=face, regions=["ears"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown occlusion region 'ears'" in (err.details() or "")
    err = _rejected(svc, "Occlude", decoding_pb2.OccludeRequest(image=face, regions=["nose", "nose"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "named twice" in (err.details() or "")
    err = _rejected(svc, "Occlude", decoding_pb2.OccludeRequest(image=common_pb2.Image(encoded=b"not an image")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (128, 128, 128)).save(buf, "PNG")
    err = _rejected(svc, "Occlude", decoding_pb2.OccludeRequest(image=common_pb2.Image(encoded=buf.getvalue())))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    # still serving; one region only when asked for one
    resp = audit.clients["decoding"].occlude(face, ["mouth"])
    assert [r.region for r in resp.results] == ["mouth"] and svc.alive()
