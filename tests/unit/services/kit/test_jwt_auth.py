"""JWTs verified against a JWKS file: keys made in the test, tokens signed by PyJWT or forged by hand."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from services.api.v1 import embedding_pb2
from services.kit.auth import Authenticator, AuthError, TokenStore, looks_like_jwt
from services.kit.jwt_auth import JwksFileError, JwksStore, JwtVerifier, parse_jwks

ISS, AUD = "https://idp.example", "facexplain"
EMBED = "/facexplain.v1.EmbeddingService/Embed"


class _Ctx:
    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "other-ec": ec.generate_private_key(ec.SECP256R1()),
    }


def _jwk(private: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    public = private.public_key()
    algorithm = {rsa.RSAPublicKey: RSAAlgorithm, ec.EllipticCurvePublicKey: ECAlgorithm}
    to_jwk = next((a for t, a in algorithm.items() if isinstance(public, t)), OKPAlgorithm).to_jwk
    jwk: dict[str, Any] = to_jwk(public, as_dict=True)
    return jwk | ({"kid": kid} if kid else {}) | extra


def _jwks(*entries: dict[str, Any]) -> str:
    return json.dumps({"keys": list(entries)})


ALG = {"rsa": "RS256", "ec": "ES256", "ed": "EdDSA", "other-ec": "ES256"}


def _token(keys: dict[str, Any], which: str = "ec", kid: str | None = "ec-1", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISS, "aud": AUD, "sub": "svc-audit", "exp": now + 300, "iat": now, "scope": "embed openid"}
    body |= claims
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, keys[which], algorithm=ALG[which], headers={"kid": kid} if kid else None)


@pytest.fixture
def store(tmp_path: Path, keys: dict[str, Any]) -> JwksStore:
    path = tmp_path / "jwks.json"
    path.write_text(_jwks(_jwk(keys["rsa"], "rsa-1"), _jwk(keys["ec"], "ec-1"), _jwk(keys["ed"], "ed-1")))
    return JwksStore(path, recheck_s=0)


def _refused(verifier: JwtVerifier, token: str, match: str) -> None:
    with pytest.raises(AuthError, match=match) as err:
        verifier.verify(token)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert token not in err.value.message and token.split(".")[1] not in err.value.message


def test_valid_tokens_of_every_allowed_algorithm(store: JwksStore, keys: dict[str, Any]) -> None:
    verifier = JwtVerifier(store, ISS, AUD)
    for which, kid in (("rsa", "rsa-1"), ("ec", "ec-1"), ("ed", "ed-1")):
        who = verifier.verify(_token(keys, which, kid))
        assert who.name == "svc-audit" and who.scopes == {"embed"}, which  # "openid" is not ours: ignored
    listed = verifier.verify(_token(keys, scope=None, scp=["embed", "admin", "profile"], aud=["other", AUD]))
    assert listed.scopes == {"embed", "admin"}
    assert verifier.verify(_token(keys, scope=None, scp="decode attributes")).scopes == {"decode", "attributes"}


def test_claims_checked_with_small_leeway(store: JwksStore, keys: dict[str, Any]) -> None:
    verifier = JwtVerifier(store, ISS, AUD, leeway_s=30)
    now = int(time.time())
    _refused(verifier, _token(keys, exp=now - 120), "JWT expired")
    assert verifier.verify(_token(keys, exp=now - 10)).name == "svc-audit"  # within the leeway: clock skew
    _refused(verifier, _token(keys, nbf=now + 120), "not valid yet")
    _refused(verifier, _token(keys, iss="https://evil.example"), "issuer is not trusted")
    _refused(verifier, _token(keys, aud="another-service"), "not for this audience")
    _refused(verifier, _token(keys, exp=None), "required claim 'exp'")
    _refused(verifier, _token(keys, sub=None), "required claim 'sub'")
    _refused(verifier, _token(keys, sub=""), "'sub' must be a non-empty string")


def test_forged_and_confused_tokens_are_refused(store: JwksStore, keys: dict[str, Any]) -> None:
    verifier = JwtVerifier(store, ISS, AUD)
    _refused(verifier, _token(keys, "other-ec", kid="ec-1"), "signature is invalid")  # a stranger's key, our kid
    _refused(verifier, _token(keys, "other-ec", kid="ec-9"), "does not know")
    _refused(verifier, _token(keys, "ec", kid=None), "no kid and the server's JWKS holds several keys")
    _refused(verifier, _token(keys, "ec", kid="rsa-1"), "does not match its key")  # ES256 header, RSA key
    good = _token(keys)
    head, body, sig = good.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(body + "=="))
    tampered["scope"] = "admin"
    forged_body = base64.urlsafe_b64encode(json.dumps(tampered).encode()).rstrip(b"=").decode()
    _refused(verifier, f"{head}.{forged_body}.{sig}", "signature is invalid")
    # alg none, and HS256 with the server's public key as the HMAC secret (the classic confusion)
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    _refused(verifier, jwt.encode(claims, None, algorithm="none"), "'none'")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = keys["rsa"].public_key().public_bytes(serialization.Encoding.PEM, spki)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': 'rsa-1', 'typ': 'JWT'}).encode())}.{body}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    _refused(verifier, f"{signing_input}.{b64(mac)}", "'HS256' is not allowed")
    _refused(verifier, "eyJhbGciOi.eyJzdWIi.c2ln", "malformed JWT")


def test_single_key_without_kid(tmp_path: Path, keys: dict[str, Any]) -> None:
    path = tmp_path / "one.json"
    path.write_text(_jwks(_jwk(keys["ed"], None)))
    verifier = JwtVerifier(JwksStore(path), ISS, AUD)
    assert verifier.verify(_token(keys, "ed", kid=None)).name == "svc-audit"


def test_issuer_and_audience_are_required(store: JwksStore) -> None:
    with pytest.raises(JwksFileError, match="FACEXPLAIN_AUTH_JWT_ISSUER and FACEXPLAIN_AUTH_JWT_AUDIENCE"):
        JwtVerifier(store, "", "")
    with pytest.raises(JwksFileError, match="FACEXPLAIN_AUTH_JWT_AUDIENCE"):
        JwtVerifier(store, ISS, " ")


def _bad_entries(keys: dict[str, Any]) -> list[tuple[str, str]]:
    private_rsa = RSAAlgorithm.to_jwk(keys["rsa"], as_dict=True)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return [
        ("{", "not valid JSON"),
        ('{"kids": []}', r'expected a JWK set \{"keys"'),
        (_jwks(), "holds no signing key"),
        (_jwks(private_rsa | {"kid": "x"}), r"keys\[0\]: holds private or symmetric key material \(d, dp, dq"),
        (_jwks({"kty": "oct", "k": "c2VjcmV0", "kid": "h"}), "private or symmetric"),
        (_jwks(_jwk(keys["ec"], "e", alg="HS256")), r"keys\[0\].alg: 'HS256' is not allowed"),
        (_jwks(_jwk(keys["ec"], "e", alg="none")), "'none' is not allowed"),
        (_jwks(_jwk(small, "s")), "RSA key of 1024 bits"),
        (_jwks(_jwk(ec.generate_private_key(ec.SECP384R1()), "p384")), "signs none of"),
        (_jwks(_jwk(keys["ec"], "e", alg="RS256")), "not a usable public key"),
        (_jwks(_jwk(keys["ec"], "e"), _jwk(keys["ed"], "e")), r"keys\[1\].kid: 'e' is already"),
        (_jwks({"kty": "RSA", "kid": "r"}), "not a usable public key"),
        (_jwks(_jwk(keys["ec"], "enc-only", use="enc")), "holds no signing key"),
    ]


def test_parse_errors_name_key_and_member(keys: dict[str, Any]) -> None:
    for text, message in _bad_entries(keys):
        with pytest.raises(JwksFileError, match=message):
            parse_jwks(text, "jwks.json")
    mixed = parse_jwks(_jwks(_jwk(keys["ec"], "enc", use="enc"), _jwk(keys["ed"], "sig")))
    assert set(mixed.by_kid) == {"sig"}  # an encryption key beside the signing keys is skipped


def test_rotation_reaches_the_server_without_restart(store: JwksStore, keys: dict[str, Any]) -> None:
    verifier = JwtVerifier(store, ISS, AUD)
    new = _token(keys, "other-ec", kid="ec-2")
    _refused(verifier, new, "does not know")
    old = _token(keys)
    entries = [_jwk(keys["ec"], "ec-1"), _jwk(keys["other-ec"], "ec-2")]

    def write(*e: dict[str, Any], text: str = "") -> None:
        store.path.write_text(text or _jwks(*e))
        os.utime(store.path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))

    write(*entries)  # the provider publishes the next key beside the current one
    assert verifier.verify(new).name == verifier.verify(old).name == "svc-audit"
    write(entries[1])  # and retires the old one
    _refused(verifier, old, "does not know")
    assert verifier.verify(new).name == "svc-audit"
    write(text='{"keys": "broken"}')
    _refused(verifier, new, "JWKS file is invalid")  # fails closed
    assert "expected a JWK set" in store.error
    write(entries[1])
    assert verifier.verify(new).name == "svc-audit"


def test_store_refuses_unusable_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(JwksFileError, match=r"FACEXPLAIN_AUTH_JWKS_FILE .*cannot read it"):
        JwksStore(tmp_path / "missing.json")


def test_authenticator_routes_jwts_to_the_jwks(tmp_path: Path, store: JwksStore, keys: dict[str, Any]) -> None:
    tokens = tmp_path / "tokens.json"
    digest = hashlib.sha256(b"opaque-token").hexdigest()
    tokens.write_text(json.dumps({"tokens": [{"principal": "kiosk", "sha256": digest, "scopes": ["embed"]}]}))
    verifier = JwtVerifier(store, ISS, AUD)
    both = Authenticator(TokenStore(tokens), verifier)
    jwt_only = Authenticator(None, verifier)

    def md(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    good = _token(keys)
    assert looks_like_jwt(good) and not looks_like_jwt("opaque-token")
    assert both.identify(md(good), _Ctx()).name == "svc-audit"  # type: ignore[arg-type]
    assert both.identify(md("opaque-token"), _Ctx()).name == "kiosk"  # type: ignore[arg-type]
    assert jwt_only.identify(md(good), _Ctx()).name == "svc-audit"  # type: ignore[arg-type]
    with pytest.raises(AuthError, match="accepts only JWTs") as err:
        jwt_only.identify(md("opaque-token"), _Ctx())  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(AuthError, match="missing credentials") as err:
        jwt_only.identify((), _Ctx())  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    # valid, but without the RPC's scope: PERMISSION_DENIED
    unscoped = jwt_only.identify(md(_token(keys, scope="openid profile")), _Ctx())  # type: ignore[arg-type]
    assert unscoped.scopes == frozenset()
    with pytest.raises(AuthError) as err:
        Authenticator.authorize(unscoped, EMBED, embedding_pb2.EmbedRequest())
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    Authenticator.authorize(jwt_only.identify(md(good), _Ctx()), EMBED, embedding_pb2.EmbedRequest())  # type: ignore[arg-type]
