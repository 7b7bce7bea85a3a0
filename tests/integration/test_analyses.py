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

DATA = REPO / "data" / "sample"  # CelebA and ORL faces; labels.csv holds the CelebA faces' labels
SAMPLE = DATA / "celeba"
FLEET = ("embedding", "decoding", "directions", "attributes")
SEED = 5


@pytest.fixture(scope="module")
def fleet(
    mlflow: RunningMlflow, decoder_v1: VersionInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningService]]:
    logs = tmp_path_factory.mktemp("analyses-svc")

    def start(name: str) -> RunningService:
        (logs / name).mkdir()
        env = registry_service_env(
            mlflow.uri,
            logs / name / "cache",
            FACEXPLAIN_MAX_BATCH_SIZE="16",
            FACEXPLAIN_MIN_LABEL_ITEMS="2",
            FACEXPLAIN_REGISTRY_TIMEOUT_S="30",
        )
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
    cfg = AuditConfig("facexplain-fr-dlib128@champion", data=DATA, out=out, seed=SEED, quiet=True)
    cfg.max_occlusions = 2
    cfg.max_centroids = 3
    cfg.aggregation_repeats = 3
    cfg.privacy_decoded = 16
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
    """The 30 CelebA sample faces (10 people, 3 photos each) with their CelebA labels."""
    faces, labels, _ = load_faces(DATA)
    celeba = [f for f in faces if f.rel.startswith("celeba/")]
    return AuditInputs(celeba, celeba, labels)


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
        with Image.open(audit.out / f["grid"]) as im:  # four columns (clean face, then each region), two rows
            assert im.size[0] >= 4 * 112 and 2 * 112 <= im.size[1] < 3 * 112
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


# -- aggregation (DFD §4.4) -------------------------------------------------------------------------------


def test_aggregation_section(audit: Audit, inputs: AuditInputs) -> None:
    sec = _step(audit, "aggregation", inputs)
    assert not sec.get("skipped") and sec["faces"] >= 28
    # 3 photos per identity: enrolments of 1 and 2 photos, each against a third
    assert [p["n"] for p in sec["curve"]] == [1, 2]
    one, two = sec["curve"]
    assert one["identities"] == two["identities"] >= 9 and one["n_genuine"] == one["identities"] * 3
    assert sec["rule"]["metric"] == "l2" and sec["rule"]["accept_below"]
    for p in sec["curve"]:
        assert 0 <= p["far"] <= p["tar"] <= 1 and p["auc"] > 0.9
    # averaging two photos brings the enrolment nearer the person's other photo
    assert two["genuine_score_mean"] < one["genuine_score_mean"]
    assert len(sec["centroids"]) == 3 and (audit.out / sec["centroids_grid"]).stat().st_size > 1000
    assert sec["decoder"]["version"] == "1"


# -- privacy (DFD §4.5) -----------------------------------------------------------------------------------


def test_privacy_section(audit: Audit, inputs: AuditInputs) -> None:
    sec = _step(audit, "privacy", inputs)
    assert not sec.get("skipped"), sec.get("skipped")
    assert sec["label"] == "Smiling" and sec["faces"] >= 27 and 0 < sec["positives"] < sec["faces"]
    assert sec["set"]["method"] == "centroid" and sec["set"]["target"] == "Smiling"
    # the modification changes the templates, but not beyond recognition
    assert 0.5 < sec["cosine_to_original"]["mean"] < 0.9999
    # what verification keeps: pairs of the same person still score far above pairs of two people
    before, after = sec["verification"]["before"], sec["verification"]["after"]
    assert before["genuine_pairs"] == after["genuine_pairs"] >= 27
    assert after["auc"] > 0.85 and before["auc"] > 0.9
    # what is suppressed: the probe fitted on the originals reads less of Smiling from the modified templates
    p = sec["probe"]
    assert p["r2_fixed_probe_after"] < p["r2_before"]
    dec = sec["decoded"]
    assert not dec.get("skipped"), dec.get("skipped")
    # the accessory probe when the service has one, else the expression net's "happy"
    assert dec["attribute"] in ("smiling", "expression:happy") and dec["mean_abs_change"] > 0 and dec["faces"] == 16
    assert 0 <= dec["auc_before"] <= 1 and 0 <= dec["auc_after"] <= 1
    assert (audit.out / sec["grid"]).stat().st_size > 1000


def test_suppress_rejects_bad_requests_and_keeps_serving(fleet: dict[str, RunningService], audit: Audit) -> None:
    from services.api.v1 import directions_pb2, directions_pb2_grpc

    svc = fleet["directions"]
    t = audit.template(audit_faces()[0])
    probe = common_pb2.Probe(template=t)
    axis = directions_pb2.Direction(name="axis", vector=[1.0] + [0.0] * 127)

    def rejected(req: directions_pb2.SuppressRequest) -> grpc.RpcError:
        with grpc.insecure_channel(svc.address) as ch, pytest.raises(grpc.RpcError) as info:
            directions_pb2_grpc.DirectionsServiceStub(ch).Suppress(req, timeout=120)
        assert isinstance(info.value, grpc.RpcError)
        return info.value

    cases = [
        (directions_pb2.SuppressRequest(inline=axis), grpc.StatusCode.INVALID_ARGUMENT, "no probes"),
        (directions_pb2.SuppressRequest(probes=[probe]), grpc.StatusCode.INVALID_ARGUMENT, "no direction"),
        (
            directions_pb2.SuppressRequest(probes=[probe], inline=directions_pb2.Direction(vector=[0.0] * 128)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "zero vector",
        ),
        (
            directions_pb2.SuppressRequest(probes=[probe], inline=directions_pb2.Direction(vector=[1.0] * 5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dimension 5",
        ),
        (directions_pb2.SuppressRequest(probes=[probe] * 17, inline=axis), grpc.StatusCode.RESOURCE_EXHAUSTED, "17"),
        (
            directions_pb2.SuppressRequest(
                probes=[probe],
                set_direction=directions_pb2.SetDirection(set=common_pb2.DirectionSetRef(id="no-such-set")),
            ),
            grpc.StatusCode.NOT_FOUND,
            "no-such-set",
        ),
    ]
    for req, code, text in cases:
        err = rejected(req)
        assert err.code() == code and text in (err.details() or ""), (code, err.details())
    # still serving: the axis is gone from the template and its norm is kept
    r = audit.clients["directions"].suppress([probe], inline=axis)
    assert abs(r.templates[0].values[0]) < 1e-6 and svc.alive()
    n0 = sum(v * v for v in t.values) ** 0.5
    n1 = sum(v * v for v in r.templates[0].values) ** 0.5
    assert abs(n0 - n1) < 1e-4 and 0 < r.cosine_to_original[0] < 1


def audit_faces() -> list[Any]:
    return load_faces(DATA)[0]
