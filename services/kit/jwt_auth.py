"""JWTs as bearer credentials, verified against a JWKS file with PyJWT (a maintained library, not our own crypto).

Auth is on whenever ``FACEXPLAIN_AUTH_JWKS_FILE`` is set (alone or beside the tokens file). The file is an
RFC 7517 key set of *public* signing keys, as an identity provider publishes at its ``jwks_uri``; the server
never fetches it over the network (a Secret or a sidecar writes it), and it is re-read when it changes, so a
key rotation (new ``kid`` added, old one removed later) reaches the server without a restart.

What a token must be to pass, each failure UNAUTHENTICATED with a message that never repeats the token:

- signed with an allowed algorithm (:data:`ALGORITHMS`: RS256, ES256, EdDSA) by a key of the set, picked by
  the header's ``kid`` and whose own algorithm is the header's: ``none``, the HS* family (where a public key
  would be used as an HMAC secret) and algorithm/key mismatches are refused before any signature check;
- ``iss`` equal to ``FACEXPLAIN_AUTH_JWT_ISSUER`` and ``aud`` containing ``FACEXPLAIN_AUTH_JWT_AUDIENCE``
  (both required: without an audience a token minted for another service of the same provider would pass);
- ``exp`` present and not passed, ``nbf`` (when present) reached, both with ``FACEXPLAIN_AUTH_JWT_LEEWAY_S``
  of clock skew; ``sub`` present: it names the principal in the access log.

Scopes come from the standard ``scope`` claim (space-separated, RFC 8693) or an ``scp`` list (or string);
names other than :data:`services.kit.auth.SCOPES` are ignored (an identity provider adds its own, such as
``openid``). A valid token without the RPC's scope is PERMISSION_DENIED like a tokens-file principal.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt import PyJWK

from services.kit.auth import SCOPES, AuthConfigError, AuthError, Principal, WatchedFile

log = logging.getLogger("facexplain.auth")

ALGORITHMS = ("RS256", "ES256", "EdDSA")
# What a key must be to sign with each allowed algorithm (the JWK's kty and, where it has one, crv).
_KEY_KINDS: dict[str, tuple[str, frozenset[str | None]]] = {
    "RS256": ("RSA", frozenset({None})),
    "ES256": ("EC", frozenset({"P-256"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_MIN_RSA_BITS = 2048
_REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]


class JwksFileError(AuthConfigError):
    """The JWKS file or a JWT setting cannot be used; the message says which key and member, and why."""


@dataclass(frozen=True)
class KeySet:
    by_kid: dict[str, PyJWK]
    unnamed: tuple[PyJWK, ...]  # keys without a kid: usable only when the set holds nothing else

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.unnamed)


def _parse_key(entry: Any, where: str) -> PyJWK | None:
    if not isinstance(entry, dict):
        raise JwksFileError(f"{where}: expected a JWK object with kty, kid and the public key members")
    private = sorted(_PRIVATE_MEMBERS & set(entry))
    if private:
        raise JwksFileError(
            f"{where}: holds private or symmetric key material ({', '.join(private)}); the server needs only the "
            "public keys: publish the provider's public JWKS and keep its private keys out of this file"
        )
    if entry.get("use", "sig") != "sig":
        return None  # an encryption key published beside the signing keys: not ours to use
    kty, alg = entry.get("kty"), entry.get("alg")
    if alg is not None and alg not in ALGORITHMS:
        raise JwksFileError(f"{where}.alg: {alg!r} is not allowed; allowed: {', '.join(ALGORITHMS)}")
    try:
        key = PyJWK.from_dict(entry)
    except (jwt.PyJWTError, ValueError, KeyError, TypeError) as exc:
        raise JwksFileError(f"{where}: not a usable public key (kty {kty!r}): {type(exc).__name__}") from None
    want_kty, crvs = _KEY_KINDS.get(key.algorithm_name, ("", frozenset()))
    if kty != want_kty or entry.get("crv") not in crvs:
        raise JwksFileError(
            f"{where}: a {kty} key (crv {entry.get('crv')!r}) signs none of {', '.join(ALGORITHMS)}; "
            "use RSA (RS256), EC P-256 (ES256) or OKP Ed25519/Ed448 (EdDSA)"
        )
    if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < _MIN_RSA_BITS:
        raise JwksFileError(f"{where}: RSA key of {key.key.key_size} bits; at least {_MIN_RSA_BITS} are required")
    return key


def parse_jwks(text: str, source: str = "JWKS file") -> KeySet:
    """Validate a JWKS document; every error names the key (by index) and member it is about."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JwksFileError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksFileError(f'{source}: expected a JWK set {{"keys": [...]}}')
    by_kid: dict[str, PyJWK] = {}
    unnamed: list[PyJWK] = []
    for i, entry in enumerate(doc["keys"]):
        where = f"{source}: keys[{i}]"
        key = _parse_key(entry, where)
        if key is None:
            continue
        kid = entry.get("kid")
        if kid is None:
            unnamed.append(key)
        elif not isinstance(kid, str) or not kid:
            raise JwksFileError(f"{where}.kid: must be a non-empty string")
        elif kid in by_kid:
            raise JwksFileError(f"{where}.kid: {kid!r} is already the kid of another key")
        else:
            by_kid[kid] = key
    keys = KeySet(by_kid, tuple(unnamed))
    if not len(keys):
        raise JwksFileError(f"{source}: holds no signing key (use 'sig') for {', '.join(ALGORITHMS)}")
    return keys


class JwksStore(WatchedFile[KeySet]):
    """The JWKS file (``FACEXPLAIN_AUTH_JWKS_FILE``), re-read when it changes (key rotation)."""

    error_cls = JwksFileError

    def __init__(self, path: Path | str, recheck_s: float = 1.0) -> None:
        super().__init__(path, parse_jwks, "FACEXPLAIN_AUTH_JWKS_FILE", "JWKS file", recheck_s)


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    names: set[str] = set()
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            names.update(value.split())
        elif isinstance(value, list):
            names.update(v for v in value if isinstance(v, str))
    return frozenset(names & set(SCOPES))


def _short(value: Any) -> str:
    """An attacker-chosen header value, bounded before it reaches a status message or a log line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _refuse(message: str) -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message)


class JwtVerifier:
    """Checks a JWT's signature and claims; returns the principal it names, with the scopes it grants."""

    def __init__(self, store: JwksStore, issuer: str, audience: str, leeway_s: float = 30.0) -> None:
        missing = [name for name, value in (("ISSUER", issuer), ("AUDIENCE", audience)) if not value.strip()]
        if missing:
            raise JwksFileError(
                f"FACEXPLAIN_AUTH_JWKS_FILE is set but {' and '.join('FACEXPLAIN_AUTH_JWT_' + m for m in missing)} "
                "not: a JWT is accepted only from the configured issuer and for the configured audience"
            )
        self.store, self.issuer, self.audience, self.leeway_s = store, issuer, audience, leeway_s

    def _key(self, keys: KeySet, header: dict[str, Any]) -> PyJWK:
        kid = header.get("kid")
        if kid is None:
            if len(keys) == 1:
                return (*keys.by_kid.values(), *keys.unnamed)[0]
            raise _refuse("JWT header has no kid and the server's JWKS holds several keys")
        key = keys.by_kid.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise _refuse(f"JWT signed by a key the server does not know (kid {_short(kid)})")
        return key

    def verify(self, token: str) -> Principal:
        keys = self.store.current()
        if keys is None:
            raise _refuse("JWTs cannot be checked: the server's JWKS file is invalid")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refuse("malformed JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise _refuse(f"JWT algorithm {_short(alg)} is not allowed; allowed: {', '.join(ALGORITHMS)}")
        key = self._key(keys, header)
        if key.algorithm_name != alg:
            raise _refuse(f"JWT algorithm {alg} does not match its key ({key.algorithm_name})")
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise _refuse("JWT expired") from None
        except jwt.ImmatureSignatureError:
            raise _refuse("JWT not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidSignatureError:
            raise _refuse("JWT signature is invalid") from None
        except jwt.InvalidAudienceError:
            raise _refuse(f"JWT is not for this audience ({self.audience})") from None
        except jwt.InvalidIssuerError:
            raise _refuse("JWT issuer is not trusted by this server") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _refuse(f"JWT lacks the required claim {exc.claim!r}") from None
        except jwt.PyJWTError as exc:
            raise _refuse(f"invalid JWT ({type(exc).__name__})") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip():
            raise _refuse("JWT 'sub' must be a non-empty string naming the caller")
        return Principal(sub, _scopes(claims))
