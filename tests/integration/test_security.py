"""Security over real gRPC on loopback: TLS, mutual TLS, bearer tokens with scopes, the access log.

All five services run once for the module with TLS (a CA and server certificate made at test time), a
tokens file and a JWKS file (an identity provider's key made at test time), without a registry: the scope
checks sit in front of every RPC, so ModelStatus and Reload show them on services that have no model to
serve; the embedding service (local weights) also answers real RPCs on real faces. A second embedding server
requires client certificates (mutual TLS).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from jwt.algorithms import ECAlgorithm

from cli.launcher import REPO, RunningService, start_service
from sdk.client import ClientSecurity, open_channel
from services.api.v1 import common_pb2, decoding_pb2, embedding_pb2
from tests.certs import CA, Issued, issue, make_ca
from tests.servers import start_side_by_side

pytestmark = pytest.mark.integration

SERVICES = {
    "embedding": "facexplain.v1.EmbeddingService",
    "decoding": "facexplain.v1.DecodingService",
    "directions": "facexplain.v1.DirectionsService",
    "attributes": "facexplain.v1.AttributesService",
    "counterfactual": "facexplain.v1.CounterfactualService",
}
SCOPE = {"embedding": "embed", "decoding": "decode", "directions": "directions", "attributes": "attributes"}
SCOPE["counterfactual"] = "counterfactual"
SAMPLE = REPO / "data" / "sample"
FACES = [SAMPLE / "celeba" / "id7201" / "001085.jpg", *sorted((SAMPLE / "celeba" / "id7205").iterdir())[:2]]

TOKENS = {
    "admin": ("ops", ["admin", *SCOPE.values()], None),
    "reader": ("auditor", list(SCOPE.values()), "2099-01-01T00:00:00Z"),
    "embed-only": ("kiosk", ["embed"], None),
    "expired": ("former", ["admin", *SCOPE.values()], "2020-01-01T00:00:00Z"),
}


def _token(name: str) -> str:
    return f"test-token-{name}-0123456789abcdef"


JWT_ISSUER, JWT_AUDIENCE = "https://idp.test.example", "facexplain-test"
# The identity provider's signing keys, made for the module: idp-1 is published in the JWKS at start, idp-2
# only by the rotation test; stranger is never published.
JWT_KEYS = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("idp-1", "idp-2", "stranger")}


def _public_jwk(private: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return jwk | {"kid": kid, "use": "sig", "alg": "ES256"}


def _jwt(scopes: list[str], kid: str = "idp-1", key: str = "", lifetime_s: int = 600, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": "jwt-caller", "iat": now, "exp": now + lifetime_s}
    body |= {"scope": " ".join(scopes)} | claims
    return jwt.encode(body, JWT_KEYS[key or kid], algorithm="ES256", headers={"kid": kid})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ca, client_ca = make_ca(d / "ca", "server CA"), make_ca(d / "client-ca", "client CA")
    tokens = [
        {"principal": who, "sha256": hashlib.sha256(_token(name).encode()).hexdigest(), "scopes": scopes}
        | ({"expires": expires} if expires else {})
        for name, (who, scopes, expires) in TOKENS.items()
    ]
    tokens.append({"principal": "cert-ops", "client_cn": "auditor.example", "scopes": ["embed"]})
    (d / "tokens.json").write_text(json.dumps({"tokens": tokens}))
    (d / "jwks.json").write_text(json.dumps({"keys": [_public_jwk(JWT_KEYS["idp-1"], "idp-1")]}))
    return {
        "ca": ca,
        "server": issue(ca, d / "server", "localhost", server=True),
        "client_ca": client_ca,
        "client": issue(client_ca, d / "client", "auditor.example", server=False),
        "tokens": d / "tokens.json",
        "jwks": d / "jwks.json",
        "logs": tmp_path_factory.mktemp("security-logs"),
    }


def _server_env(pki: dict[str, Any], **extra: str) -> dict[str, str]:
    server: Issued = pki["server"]
    return {
        "FACEXPLAIN_TLS_CERT_FILE": str(server.cert_file),
        "FACEXPLAIN_TLS_KEY_FILE": str(server.key_file),
        "FACEXPLAIN_AUTH_TOKENS_FILE": str(pki["tokens"]),
        # both credentials at once: a bearer shaped like a JWT is checked against the JWKS, others the tokens file
        "FACEXPLAIN_AUTH_JWKS_FILE": str(pki["jwks"]),
        "FACEXPLAIN_AUTH_JWT_ISSUER": JWT_ISSUER,
        "FACEXPLAIN_AUTH_JWT_AUDIENCE": JWT_AUDIENCE,
        "FACEXPLAIN_TORCH_THREADS": "1",
        "FACEXPLAIN_REGISTRY_URI": "",
        **extra,
    }


@pytest.fixture(scope="module")
def secured(pki: dict[str, Any]) -> Iterator[dict[str, RunningService]]:
    """The five services with TLS and tokens, started side by side (each loads its models on its own)."""
    running = start_side_by_side(
        SERVICES, lambda name: start_service(name, pki["logs"], env=_server_env(pki), timeout=300)
    )
    try:
        yield running
    finally:
        for svc in running.values():
            svc.stop()


@pytest.fixture(scope="module")
def mutual(pki: dict[str, Any]) -> Iterator[RunningService]:
    (pki["logs"] / "mtls").mkdir(exist_ok=True)
    svc = start_service(
        "embedding",
        pki["logs"] / "mtls",
        env=_server_env(pki, FACEXPLAIN_TLS_CLIENT_CA_FILE=str(pki["client_ca"].cert_file)),
        timeout=300,
    )
    yield svc
    svc.stop()


def _channel(
    svc: RunningService, pki: dict[str, Any], token: str | None = None, raw_token: str = "", **kw: Any
) -> grpc.Channel:
    ca: CA = pki["ca"]
    sec = ClientSecurity(ca_file=str(ca.cert_file), token=raw_token or (_token(token) if token else ""), **kw)
    return open_channel(svc.address, security=sec, retries=1)


def _unary(channel: grpc.Channel, service: str, method: str, request: Any, response_cls: Any) -> Any:
    call = channel.unary_unary(
        f"/{service}/{method}", request_serializer=type(request).SerializeToString,
        response_deserializer=response_cls.FromString,
    )  # fmt: skip
    return call(request, timeout=60)


def _status(channel: grpc.Channel, service: str, method: str, request: Any, response_cls: Any) -> grpc.StatusCode:
    try:
        _unary(channel, service, method, request, response_cls)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]


def _model_status(ch: grpc.Channel, service: str) -> grpc.StatusCode:
    return _status(ch, service, "ModelStatus", common_pb2.ModelStatusRequest(), common_pb2.ModelStatusResponse)


def _reload(ch: grpc.Channel, service: str) -> grpc.StatusCode:
    return _status(ch, service, "Reload", common_pb2.ReloadRequest(), common_pb2.ReloadResponse)


# -- TLS -------------------------------------------------------------------------------------------------


def test_plaintext_client_cannot_connect(secured: dict[str, RunningService]) -> None:
    channel = grpc.insecure_channel(secured["embedding"].address)
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=3)
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_tls_client_with_the_ca_embeds_a_real_face(secured: dict[str, RunningService], pki: dict[str, Any]) -> None:
    with _channel(secured["embedding"], pki, "embed-only") as ch:
        stub_req = embedding_pb2.EmbedRequest(image=common_pb2.Image(encoded=FACES[0].read_bytes()))
        resp = _unary(ch, SERVICES["embedding"], "Embed", stub_req, embedding_pb2.EmbedResponse)
    values = np.asarray(resp.template.values, dtype=np.float32)
    assert values.shape == (128,) and np.isfinite(values).all() and 1.0 < np.linalg.norm(values) < 2.0


def test_tls_client_with_another_ca_is_refused(
    secured: dict[str, RunningService], pki: dict[str, Any], tmp_path: Path
) -> None:
    stranger = make_ca(tmp_path, "stranger CA")
    sec = ClientSecurity(ca_file=str(stranger.cert_file), token=_token("admin"))
    with open_channel(secured["embedding"].address, security=sec, retries=1) as ch:
        assert _model_status(ch, SERVICES["embedding"]) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_certificate(mutual: RunningService, pki: dict[str, Any]) -> None:
    with _channel(mutual, pki, "admin") as ch:
        assert _model_status(ch, SERVICES["embedding"]) == grpc.StatusCode.UNAVAILABLE
    client: Issued = pki["client"]
    cert = {"cert_file": str(client.cert_file), "key_file": str(client.key_file)}
    with _channel(mutual, pki, "reader", **cert) as ch:
        assert _model_status(ch, SERVICES["embedding"]) == grpc.StatusCode.OK
    # the verified certificate's CN is a principal of the tokens file (client_cn): no token needed
    with _channel(mutual, pki, None, **cert) as ch:
        assert _model_status(ch, SERVICES["embedding"]) == grpc.StatusCode.OK
        assert _reload(ch, SERVICES["embedding"]) == grpc.StatusCode.PERMISSION_DENIED
    log = mutual.log_text()
    assert '"principal": "cert-ops"' in log and '"principal": "auditor"' in log


# -- tokens and scopes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SERVICES))
def test_tokens_and_scopes(name: str, secured: dict[str, RunningService], pki: dict[str, Any]) -> None:
    svc, service = secured[name], SERVICES[name]
    with _channel(svc, pki) as ch:
        assert _model_status(ch, service) == grpc.StatusCode.UNAUTHENTICATED
        assert _reload(ch, service) == grpc.StatusCode.UNAUTHENTICATED
        # health stays open (probes carry no credentials) and means ready: without a registry the decoding and
        # attributes services have no decoder, so they are NOT_SERVING; the others serve local FR weights
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        ready = name not in ("decoding", "attributes")
        assert health.status == (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        # reflection needs a credential
        with pytest.raises(grpc.RpcError) as err:
            _list_services(ch)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with _channel(svc, pki, "embed-only") as ch:
        assert _reload(ch, service) == grpc.StatusCode.PERMISSION_DENIED
        expected = grpc.StatusCode.OK if name == "embedding" else grpc.StatusCode.PERMISSION_DENIED
        assert _model_status(ch, service) == expected
        assert service in _list_services(ch)
    with _channel(svc, pki, "reader") as ch:
        assert _model_status(ch, service) == grpc.StatusCode.OK
        assert _reload(ch, service) == grpc.StatusCode.PERMISSION_DENIED
    with _channel(svc, pki, "admin") as ch:
        assert _reload(ch, service) not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    with _channel(svc, pki, "expired") as ch:
        assert _model_status(ch, service) == grpc.StatusCode.UNAUTHENTICATED
    bad = ClientSecurity(ca_file=str(pki["ca"].cert_file), token="not-a-known-token")
    with open_channel(svc.address, security=bad, retries=1) as ch:
        assert _model_status(ch, service) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("name", list(SERVICES))
def test_jwts_and_scopes(name: str, secured: dict[str, RunningService], pki: dict[str, Any]) -> None:
    """The same contract with JWTs from the JWKS as with the tokens file, on every service."""
    svc, service = secured[name], SERVICES[name]
    everything = ["admin", *SCOPE.values()]
    with _channel(svc, pki, raw_token=_jwt([SCOPE[name]])) as ch:
        assert _model_status(ch, service) == grpc.StatusCode.OK
        assert _reload(ch, service) == grpc.StatusCode.PERMISSION_DENIED  # no admin scope
    with _channel(svc, pki, raw_token=_jwt(["openid", "profile"])) as ch:  # valid, none of our scopes
        assert _model_status(ch, service) == grpc.StatusCode.PERMISSION_DENIED
    with _channel(svc, pki, raw_token=_jwt(everything)) as ch:
        assert _reload(ch, service) not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    refused = {
        "expired": _jwt(everything, lifetime_s=-300),  # beyond the 30 s leeway
        "signed by a stranger under our kid": _jwt(everything, key="stranger"),
        "unknown kid": _jwt(everything, kid="stranger"),
        "another issuer": _jwt(everything, iss="https://evil.example"),
        "another audience": _jwt(everything, aud="some-other-service"),
    }
    for why, token in refused.items():
        with _channel(svc, pki, raw_token=token) as ch:
            assert _model_status(ch, service) == grpc.StatusCode.UNAUTHENTICATED, why


def test_jwt_embeds_a_real_face_and_jwks_rotation_needs_no_restart(
    secured: dict[str, RunningService], pki: dict[str, Any]
) -> None:
    svc, service = secured["embedding"], SERVICES["embedding"]
    request = embedding_pb2.EmbedRequest(image=common_pb2.Image(encoded=FACES[0].read_bytes()))
    with _channel(svc, pki, raw_token=_jwt(["embed"])) as ch:
        resp = _unary(ch, service, "Embed", request, embedding_pb2.EmbedResponse)
    assert len(resp.template.values) == 128
    rotated = _jwt(["embed"], kid="idp-2")
    with _channel(svc, pki, raw_token=rotated) as ch:
        assert _model_status(ch, service) == grpc.StatusCode.UNAUTHENTICATED
    jwks: Path = pki["jwks"]
    original = jwks.read_text()
    keys = json.loads(original)["keys"] + [_public_jwk(JWT_KEYS["idp-2"], "idp-2")]
    try:
        tmp = jwks.with_suffix(".new")
        tmp.write_text(json.dumps({"keys": keys}))
        tmp.replace(jwks)  # atomically, as a Secret's volume swaps its files
        deadline = time.monotonic() + 10
        with _channel(svc, pki, raw_token=rotated) as ch:
            while _model_status(ch, service) != grpc.StatusCode.OK:
                assert time.monotonic() < deadline, "the server did not pick up the rotated JWKS"
                time.sleep(0.2)
    finally:
        tmp.write_text(original)
        tmp.replace(jwks)
    log = svc.log_text()
    assert '"principal": "jwt-caller"' in log
    assert rotated not in log and rotated.split(".")[2] not in log  # tokens are never logged


def _list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return [s.name for r in responses for s in r.list_services_response.service]


# -- the access log ---------------------------------------------------------------------------------------


def _numbers(values: Any) -> set[str]:
    """How a template value could be printed: repr, str of float32, and short fixed/general formats."""
    out: set[str] = set()
    for v in values:
        f = float(v)
        out |= {repr(f), str(np.float32(f)), f"{f:.6g}", f"{f:.5f}", f"{f:.4f}"}
    return {s for s in out if len(s.lstrip("-").replace(".", "").lstrip("0")) >= 4}  # at least 4 digits


def test_access_log_names_every_call_and_never_its_data(
    secured: dict[str, RunningService], pki: dict[str, Any]
) -> None:
    emb, dec = secured["embedding"], secured["decoding"]
    images = [p.read_bytes() for p in FACES]
    request_ids: list[str] = []
    templates: list[Any] = []

    def call(ch: grpc.Channel, service: str, method: str, request: Any, response_cls: Any, token: str = "") -> Any:
        rid = f"sec-test-{len(request_ids)}"
        request_ids.append(rid)
        metadata = [("x-request-id", rid)] + ([("authorization", f"Bearer {_token(token)}")] if token else [])
        fn = ch.unary_unary(
            f"/{service}/{method}", request_serializer=type(request).SerializeToString,
            response_deserializer=response_cls.FromString,
        )  # fmt: skip
        try:
            return fn(request, timeout=120, metadata=metadata)
        except grpc.RpcError as err:
            return err

    img = [common_pb2.Image(encoded=b) for b in images]
    with _channel(emb, pki, "reader") as ch:
        svc = SERVICES["embedding"]
        one = embedding_pb2.EmbedRequest(image=img[0], return_aligned=True)
        r = call(ch, svc, "Embed", one, embedding_pb2.EmbedResponse)
        templates.append(r.template)
        rb = call(ch, svc, "EmbedBatch", embedding_pb2.EmbedBatchRequest(images=img), embedding_pb2.EmbedBatchResponse)
        templates += [item.ok.template for item in rb.results]
        pair = embedding_pb2.VerifyRequest(a=common_pb2.Probe(image=img[1]), b=common_pb2.Probe(template=templates[0]))
        v = call(ch, svc, "Verify", pair, embedding_pb2.VerifyResponse)
        assert v.ByteSize() > 0
        lm = call(ch, svc, "Landmarks", embedding_pb2.LandmarksRequest(image=img[0]), embedding_pb2.LandmarksResponse)
        assert lm.ByteSize() > 0
        call(ch, svc, "Embed", embedding_pb2.EmbedRequest(image=common_pb2.Image(encoded=images[0][:500])),
             embedding_pb2.EmbedResponse)  # fmt: skip  # truncated image: INVALID_ARGUMENT, logged all the same
    # no decoder without a registry: UNAVAILABLE, which the SDK's channel would retry (two calls, two lines)
    creds = ClientSecurity(ca_file=str(pki["ca"].cert_file)).channel_credentials()
    with grpc.secure_channel(dec.address, creds) as ch:
        call(ch, SERVICES["decoding"], "Decode", decoding_pb2.DecodeRequest(template=templates[0]),
             decoding_pb2.DecodeResponse, token="reader")  # fmt: skip
    with _channel(emb, pki, None) as ch:
        call(ch, SERVICES["embedding"], "Embed", embedding_pb2.EmbedRequest(image=img[0]), embedding_pb2.EmbedResponse)
    assert len(templates) == 4 and all(len(t.values) == 128 for t in templates)

    raw = emb.log_path.read_bytes() + dec.log_path.read_bytes()
    text = raw.decode(errors="replace")
    # exactly one structured line per call, with every field
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{") and '"facexplain.access"' in line]
    by_id = {rid: [x for x in lines if x.get("request_id") == rid] for rid in request_ids}
    assert all(len(v) == 1 for v in by_id.values()), {k: len(v) for k, v in by_id.items()}
    codes = [by_id[rid][0]["code"] for rid in request_ids]
    assert codes == ["OK", "OK", "OK", "OK", "INVALID_ARGUMENT", "UNAVAILABLE", "UNAUTHENTICATED"], codes
    for rid in request_ids:
        entry = by_id[rid][0]
        assert {"principal", "service", "method", "code", "ms", "request_id", "peer"} <= set(entry)
        assert entry["peer"].startswith("ipv4:127.0.0.1:")
    assert [by_id[r][0]["principal"] for r in request_ids] == ["auditor"] * 6 + ["-"]
    assert by_id[request_ids[5]][0]["service"] == SERVICES["decoding"]
    # never a byte of an image, raw or base64, nor a template number, nor a token
    for data in images:
        for start in range(0, len(data) - 48, max(1, len(data) // 40)):
            chunk = data[start : start + 48]
            assert chunk not in raw
            assert base64.b64encode(chunk)[8:56] not in raw
    numbers = set().union(*(_numbers(t.values) for t in templates))

    def leaked(log: str) -> set[str]:
        return {n for n in numbers if re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", log)}

    planted = json.dumps({"msg": "oops", "values": [float(v) for v in templates[1].values[:3]]})
    assert len(leaked(planted)) >= 3, "the detector must see a template printed as a log would print it"
    assert not leaked(text), f"template numbers in the log: {sorted(leaked(text))[:10]}"
    assert not any(_token(name) in text for name in TOKENS)


# -- the audit passes TLS and the token on ------------------------------------------------------------------


def _audit(secured: dict[str, RunningService], tmp_path: Path, *extra: str, token: str = "") -> Any:
    targets = [f"{n}={secured[n].address}" for n in SERVICES]
    cmd = [sys.executable, "-m", "cli.main", "audit", "--fr-model", "facexplain-fr-dlib128@champion"]
    cmd += ["--data", str(SAMPLE / "celeba"), "--out", str(tmp_path / "audit"), "--connect-timeout", "10"]
    cmd += ["--targets", *targets, *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEXPLAIN_")}
    if token:
        env["FACEXPLAIN_TOKEN"] = token
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_audit_reaches_the_services_with_tls_and_token(
    secured: dict[str, RunningService], pki: dict[str, Any], tmp_path: Path
) -> None:
    """The audit gets TLS from --tls-ca-file and the token from FACEXPLAIN_TOKEN or --token: it passes the
    connection step and gets ModelStatus answers (then stops: these services follow no registry)."""
    ca = str(pki["ca"].cert_file)
    plain = _audit(secured, tmp_path)
    assert plain.returncode == 3 and "not reachable" in plain.stderr, plain.stderr[-2000:]
    no_token = _audit(secured, tmp_path, "--tls-ca-file", ca)
    assert no_token.returncode == 3 and "ModelStatus failed: UNAUTHENTICATED" in no_token.stderr, no_token.stderr
    for proc in (
        _audit(secured, tmp_path, "--tls-ca-file", ca, token=_token("reader")),
        _audit(secured, tmp_path, "--tls-ca-file", ca, "--token", _token("reader")),
    ):
        out = proc.stdout + proc.stderr
        assert "UNAUTHENTICATED" not in out and "PERMISSION_DENIED" not in out and "not reachable" not in out, out
        # the audit read ModelStatus and stopped at its first check of what it says
        assert "the embedding service follows no model registry" in out, out[-3000:]
