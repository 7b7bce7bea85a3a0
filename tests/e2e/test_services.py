"""Every service end to end, wherever tests/e2e points (conftest.py): one call of each service's main RPCs,
a bad request per service with its precise status, and the decoder's alias moved under load.

The audit (test_audit.py) already drives SSI and centroid discovery, Importance, Explain and the
reconstructions through the CLI; here each service's request/response RPCs are called directly, and every
response must name the model versions behind ``champion`` in the registry the services follow.

The alias move: the served decoder's bundle is registered again as a new version (same weights, so every
service that follows it, decoding, directions, attributes, counterfactual, stays consistent), ``champion``
moves to it while clients call Decode back to back, the responses switch to the new version, then
``champion`` moves back and the responses switch back. Not one call may fail (RESOURCE_EXHAUSTED would count
as refused, not failed; it must not happen at this load either). The alias ends where it started, so the
suite can run again against the same staging.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cli.launcher import REPO
from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL
from registry import CHAMPION, Registry
from sdk.client import (
    AttributesClient,
    CounterfactualClient,
    DecodingClient,
    DirectionsClient,
    EmbeddingClient,
    image_from_path,
    open_channel,
)
from services.api.v1 import (
    attributes_pb2,
    common_pb2,
    counterfactual_pb2,
    decoding_pb2,
    decoding_pb2_grpc,
    directions_pb2,
    embedding_pb2,
)
from tests.e2e.conftest import Deployment
from tests.loadgen import run_calls

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

SAMPLE = REPO / "data" / "sample" / "celeba"
FACE_A = SAMPLE / "id7201" / "001085.jpg"
FACE_B = SAMPLE / "id7205" / "020711.jpg"
DIM = 128
LOAD_CLIENTS = 4


@pytest.fixture(scope="module")
def registry(deployment: Deployment) -> Registry:
    return Registry(deployment.registry_uri, timeout_s=30, max_retries=2)


@pytest.fixture(scope="module")
def champions(registry: Registry) -> dict[str, str]:
    return {m: registry.resolve(m, CHAMPION).version for m in (DEFAULT_FR_MODEL, DEFAULT_DECODER_MODEL)}


def _client(deployment: Deployment, cls: type[Any], name: str, timeout: float = 120) -> Any:
    return cls(deployment.addresses[name], timeout=timeout, security=deployment.security)


@pytest.fixture(scope="module")
def clients(deployment: Deployment) -> Iterator[dict[str, Any]]:
    out = {
        "embedding": _client(deployment, EmbeddingClient, "embedding"),
        "decoding": _client(deployment, DecodingClient, "decoding"),
        "directions": _client(deployment, DirectionsClient, "directions"),
        "attributes": _client(deployment, AttributesClient, "attributes", 300),
        "counterfactual": _client(deployment, CounterfactualClient, "counterfactual", 300),
    }
    yield out
    for c in out.values():
        c.close()


def _ref(m: common_pb2.ModelRef) -> tuple[str, str]:
    return m.name, m.version


@pytest.fixture(scope="module")
def template(clients: dict[str, Any]) -> common_pb2.Template:
    t: common_pb2.Template = clients["embedding"].embed(image_from_path(FACE_A)).template
    return t


def test_every_service_answers_its_main_rpcs(
    clients: dict[str, Any], template: common_pb2.Template, champions: dict[str, str]
) -> None:
    fr = (DEFAULT_FR_MODEL, champions[DEFAULT_FR_MODEL])
    dec = (DEFAULT_DECODER_MODEL, champions[DEFAULT_DECODER_MODEL])
    a, b = image_from_path(FACE_A), image_from_path(FACE_B)

    emb: EmbeddingClient = clients["embedding"]
    r = emb.embed(a)
    assert _ref(r.model) == fr and r.template.dim == DIM and np.isfinite(r.template.values).all()
    batch = emb.embed_batch([a, b])
    assert _ref(batch.model) == fr and len(batch.results) == 2
    same = emb.verify(common_pb2.Probe(image=a), common_pb2.Probe(image=a))
    other = emb.verify(common_pb2.Probe(image=a), common_pb2.Probe(image=b))
    assert _ref(same.model) == fr and same.same_person and not other.same_person
    marks = emb.landmarks(a)
    assert len(marks.faces) == 1 and len(marks.faces[0].landmarks.points) == 68 and marks.model.name

    decoding: DecodingClient = clients["decoding"]
    d = decoding.decode(template)
    assert (_ref(d.decoder), _ref(d.fr_model)) == (dec, fr) and d.image.encoded[:4] == b"\x89PNG"
    db = decoding.decode_batch([template, template])
    assert _ref(db.decoder) == dec and len(db.results) == 2
    rec = decoding.reconstruct(b)
    assert (_ref(rec.decoder), _ref(rec.fr_model)) == (dec, fr)
    inter = decoding.interpolate(template, rec.template, steps=3)
    assert _ref(inter.decoder) == dec and len(inter.frames) == 3

    directions: DirectionsClient = clients["directions"]
    inline = directions_pb2.Direction(name="e1", vector=[1.0] + [0.0] * (DIM - 1))
    tr = directions.traverse(common_pb2.Probe(template=template), inline=inline, alphas=[0.0, 0.5], decode=True)
    assert (_ref(tr.fr_model), _ref(tr.decoder)) == (fr, dec) and len(tr.templates) == 2
    directions.list_direction_sets()  # answers (sets appear once the audit or a user registers them)

    attributes: AttributesClient = clients["attributes"]
    listed = attributes.list_attributes()
    assert listed.attributes and (_ref(listed.fr_model), _ref(listed.decoder)) == (fr, dec)
    recovered = attributes.recover_attributes(common_pb2.Probe(image=a), attributes=["yaw", "age"])
    assert (_ref(recovered.fr_model), _ref(recovered.decoder)) == (fr, dec) and len(recovered.recovered) == 2
    diff = attributes.diff_attributes(common_pb2.Probe(image=a), common_pb2.Probe(image=b), attributes=["age"])
    assert _ref(diff.fr_model) == fr

    counterfactual: CounterfactualClient = clients["counterfactual"]
    spec = counterfactual_pb2.AttackSpec(method=counterfactual_pb2.AttackSpec.METHOD_IFGSM, steps=2)
    attack = counterfactual.attack(a, b, spec)
    assert attack.adversarial.encoded[:4] == b"\x89PNG" and 0 < attack.linf <= 32 / 255 + 1e-6
    assert _ref(attack.target) == fr


def _bad_requests() -> list[tuple[str, str, str, Any, grpc.StatusCode, str]]:
    """(service, stub class, method, request, status, fragment of the message) per service."""
    probe = common_pb2.Probe(image=image_from_path(FACE_A))
    spec = counterfactual_pb2.AttackSpec(steps=-1)
    return [
        (
            "embedding",
            "EmbeddingService",
            "Embed",
            embedding_pb2.EmbedRequest(image=common_pb2.Image(encoded=b"this is not an image at all" * 10)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a decodable image",
        ),
        (
            "decoding",
            "DecodingService",
            "Decode",
            decoding_pb2.DecodeRequest(template=common_pb2.Template(values=[0.1] * 100, dim=100)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dimension 100",
        ),
        (
            "directions",
            "DirectionsService",
            "Traverse",
            directions_pb2.TraverseRequest(probe=probe, inline=directions_pb2.Direction(vector=[1.0] * 10)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dimension 10",
        ),
        (
            "attributes",
            "AttributesService",
            "RecoverAttributes",
            attributes_pb2.RecoverAttributesRequest(probe=common_pb2.Probe(template=common_pb2.Template(
                values=[1.0] * 64, dim=64))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dimension 64",
        ),
        (
            "counterfactual",
            "CounterfactualService",
            "Attack",
            counterfactual_pb2.AttackRequest(probe=probe.image, reference=image_from_path(FACE_B), spec=spec),
            grpc.StatusCode.INVALID_ARGUMENT,
            "steps",
        ),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: f"{c[0]}-{c[2]}")
def test_a_bad_request_gets_a_precise_status_and_the_service_keeps_serving(
    deployment: Deployment, case: tuple[str, str, str, Any, grpc.StatusCode, str]
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    service, stub_name, method, request, code, fragment = case
    channel = open_channel(deployment.addresses[service], security=deployment.security)
    with channel:
        call = channel.unary_unary(
            f"/facexplain.v1.{stub_name}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=120)
        assert err.value.code() == code, f"{service}.{method}: {err.value.code().name}: {err.value.details()}"
        assert fragment in (err.value.details() or ""), f"{service}.{method}: {err.value.details()!r}"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)
    return time.monotonic() - t0


def test_alias_move_under_load_fails_no_request(
    deployment: Deployment,
    registry: Registry,
    champions: dict[str, str],
    template: common_pb2.Template,
    tmp_path: Path,
) -> None:
    old = champions[DEFAULT_DECODER_MODEL]
    bundle = registry.download(registry.resolve(DEFAULT_DECODER_MODEL, CHAMPION), tmp_path / "cache")
    new = registry.register_bundle(bundle, DEFAULT_DECODER_MODEL, description="e2e: the champion's bundle again")
    request = decoding_pb2.DecodeRequest(template=template)
    lock = threading.Lock()
    last: dict[str, str] = {}  # the decoder version of the latest answer
    stop = threading.Event()

    def decode(channel: grpc.Channel, n: int) -> str:
        resp = decoding_pb2_grpc.DecodingServiceStub(channel).Decode(request, timeout=120)
        with lock:
            last["version"] = resp.decoder.version
        return str(resp.decoder.version)

    def served(version: str) -> Callable[[], bool]:
        return lambda: last.get("version") == version

    result: dict[str, Any] = {}
    address, security = deployment.addresses["decoding"], deployment.security

    def channel() -> grpc.Channel:
        return open_channel(address, security=security)

    def generate() -> None:
        result["load"] = run_calls(channel, decode, clients=LOAD_CLIENTS, until=stop.is_set)

    load = threading.Thread(target=generate, daemon=True)
    load.start()
    try:
        _until(served(old), 120, f"answers from decoder v{old} under load")
        registry.set_alias(DEFAULT_DECODER_MODEL, CHAMPION, new.version)
        to_new = _until(served(new.version), 180, f"the move to decoder v{new.version} under load")
        time.sleep(1.0)  # a few answers from the new version before moving back
        registry.set_alias(DEFAULT_DECODER_MODEL, CHAMPION, old)
        back = _until(served(old), 180, f"the move back to decoder v{old} under load")
        time.sleep(1.0)
    finally:
        stop.set()
        load.join(timeout=300)
        registry.set_alias(DEFAULT_DECODER_MODEL, CHAMPION, old)
    res = result["load"]
    print(f"\nalias move under load: {res.summary()}; v{new.version} after {to_new:.1f} s, v{old} after {back:.1f} s")
    assert res.failed == 0 and res.rejected == 0, res.summary()
    assert res.answers[new.version] > 0 and res.answers[old] > 0 and set(res.answers) == {old, new.version}, res.answers
