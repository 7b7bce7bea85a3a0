"""Authentication and per-service scopes: bearer tokens checked against a tokens file, or JWTs checked against a
JWKS file (:mod:`services.kit.jwt_auth`), as a server interceptor.

Auth is on whenever ``FACEXPLAIN_AUTH_TOKENS_FILE`` or ``FACEXPLAIN_AUTH_JWKS_FILE`` is set. The tokens file
holds SHA-256 digests of the tokens, never the tokens themselves, so reading the file (a Secret, a backup)
does not let anyone call::

    {"tokens": [
      {"principal": "audit-pipeline", "sha256": "<hex sha256 of the token>", "scopes": ["embed", "decode"],
       "expires": "2027-01-01T00:00:00Z"},
      {"principal": "ops", "client_cn": "ops.facexplain", "scopes": ["admin"]}
    ]}

An entry with ``client_cn`` instead of ``sha256`` admits a caller by the common name of the client
certificate the server verified (mutual TLS, ``FACEXPLAIN_TLS_CLIENT_CA_FILE``); a bearer token, when
sent, always decides. ``expires`` (RFC 3339 with a zone) is optional. The file is re-read when it
changes (token rotation, revocation); a file that becomes invalid fails closed: every call is refused
until it is fixed, since serving an old list would keep a revoked token alive.

Missing, unknown or expired credentials -> UNAUTHENTICATED; a known caller without the RPC's scope ->
PERMISSION_DENIED. Health checking stays open (probes carry no credentials); reflection needs any valid
credential. :data:`METHOD_SCOPES` is the one table of which scope each RPC needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc

from services.kit.access_log import Behavior, client_common_name, current_call, split_method, wrap_handler

if TYPE_CHECKING:  # jwt_auth imports this module (Principal, AuthError, WatchedFile)
    from services.kit.jwt_auth import JwtVerifier

log = logging.getLogger("facexplain.auth")

EMBED, DECODE, DIRECTIONS, ATTRIBUTES, COUNTERFACTUAL, ADMIN = (
    "embed",
    "decode",
    "directions",
    "attributes",
    "counterfactual",
    "admin",
)
SCOPES = (EMBED, DECODE, DIRECTIONS, ATTRIBUTES, COUNTERFACTUAL, ADMIN)


@dataclass(frozen=True)
class Rule:
    """The scope an RPC needs; ``admin_if`` names a boolean request field that, when true, makes the call
    change shared state (register a model, log an MLflow run) and so also needs ``admin``."""

    scope: str
    admin_if: str = ""


_V1 = "facexplain.v1."
# The one table of who may call what. Read RPCs (computing on the caller's data, listing, model status)
# need their service's scope; anything that changes state shared with other callers needs admin: Reload
# (re-resolves aliases, swaps models), discovery jobs with `register` (writes a registry version), an
# importance run with `log_run` (writes an MLflow run). Discovery without `register` keeps its result in
# the server's memory for the caller to fetch: a read. A method missing here is refused (fail closed).
METHOD_SCOPES: dict[str, Rule] = {
    **{f"/{_V1}EmbeddingService/{m}": Rule(EMBED) for m in ("Embed", "EmbedBatch", "Verify", "Landmarks")},
    **{
        f"/{_V1}DecodingService/{m}": Rule(DECODE)
        for m in ("Decode", "DecodeBatch", "Reconstruct", "Interpolate", "Occlude")
    },
    **{
        f"/{_V1}DirectionsService/{m}": Rule(DIRECTIONS, admin_if="register")
        for m in ("DiscoverSSI", "DiscoverCentroid", "DiscoverRegression", "FitEquivariance")
    },
    **{
        f"/{_V1}DirectionsService/{m}": Rule(DIRECTIONS)
        for m in (
            "GetDirectionSet",
            "ListDirectionSets",
            "Traverse",
            "ApplyEquivariance",
            "Aggregate",
            "Suppress",
            "CentroidMDS",
        )
    },
    **{
        f"/{_V1}AttributesService/{m}": Rule(ATTRIBUTES)
        for m in ("RecoverAttributes", "DiffAttributes", "ListAttributes")
    },
    f"/{_V1}AttributesService/Importance": Rule(ATTRIBUTES, admin_if="log_run"),
    **{f"/{_V1}CounterfactualService/{m}": Rule(COUNTERFACTUAL) for m in ("Attack", "Explain", "DefenceReport")},
}
for _service, _scope in (
    ("EmbeddingService", EMBED),
    ("DecodingService", DECODE),
    ("DirectionsService", DIRECTIONS),
    ("AttributesService", ATTRIBUTES),
    ("CounterfactualService", COUNTERFACTUAL),
):
    METHOD_SCOPES[f"/{_V1}{_service}/ModelStatus"] = Rule(_scope)
    METHOD_SCOPES[f"/{_V1}{_service}/Reload"] = Rule(ADMIN)

OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
ANY_CREDENTIAL_SERVICES = frozenset({"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})


class AuthConfigError(ValueError):
    """A credentials file or setting cannot be used; the message names the file or setting and says why."""


class TokenFileError(AuthConfigError):
    """The tokens file cannot be used; the message says which entry and field, and why."""


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]
    expires: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires is not None and (now or datetime.now(UTC)) >= self.expires


@dataclass(frozen=True)
class Tokens:
    by_digest: dict[str, Principal]
    by_cn: dict[str, Principal]


_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _parse_expires(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TokenFileError(f"{where}.expires: must be an RFC 3339 time string like 2027-01-31T00:00:00Z")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise TokenFileError(
            f"{where}.expires: {value!r} is not an RFC 3339 time (e.g. 2027-01-31T00:00:00Z)"
        ) from None
    if when.tzinfo is None:
        raise TokenFileError(f"{where}.expires: {value!r} has no time zone; add Z or an offset such as +01:00")
    return when


def parse_tokens(text: str, source: str = "tokens file") -> Tokens:
    """Validate a tokens file's JSON; every error names the entry and field it is about."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenFileError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list):
        raise TokenFileError(f'{source}: expected an object {{"tokens": [...]}}')
    extra = sorted(set(doc) - {"tokens"})
    if extra:
        raise TokenFileError(f"{source}: unknown top-level key(s) {', '.join(extra)}; only 'tokens' is allowed")
    by_digest: dict[str, Principal] = {}
    by_cn: dict[str, Principal] = {}
    for i, entry in enumerate(doc["tokens"]):
        where = f"{source}: tokens[{i}]"
        if not isinstance(entry, dict):
            raise TokenFileError(f"{where}: expected an object with principal, sha256, scopes")
        if "token" in entry:
            raise TokenFileError(
                f"{where}: holds the token itself ('token'); store only its SHA-256 as 'sha256' "
                '(printf %s "$TOKEN" | sha256sum) and remove the token from the file'
            )
        unknown = sorted(set(entry) - {"principal", "sha256", "client_cn", "scopes", "expires"})
        if unknown:
            raise TokenFileError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed: principal, sha256, client_cn, scopes, expires"
            )
        name = entry.get("principal")
        if not isinstance(name, str) or not name.strip():
            raise TokenFileError(f"{where}.principal: must be a non-empty string naming the caller")
        scopes = entry.get("scopes")
        if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
            raise TokenFileError(f"{where}.scopes: must be a non-empty list of scope names ({', '.join(SCOPES)})")
        bad = sorted(set(scopes) - set(SCOPES))
        if bad:
            raise TokenFileError(f"{where}.scopes: unknown scope(s) {', '.join(bad)}; known: {', '.join(SCOPES)}")
        principal = Principal(name, frozenset(scopes), _parse_expires(entry.get("expires"), where))
        digest, cn = entry.get("sha256"), entry.get("client_cn")
        if (digest is None) == (cn is None):
            raise TokenFileError(f"{where}: give exactly one of sha256 (a bearer token's digest) or client_cn")
        if digest is not None:
            if not isinstance(digest, str) or not _HEX64.match(digest):
                raise TokenFileError(
                    f"{where}.sha256: must be 64 hex digits, the SHA-256 of the token (not the token itself)"
                )
            digest = digest.lower()
            if digest in by_digest:
                raise TokenFileError(f"{where}.sha256: the same token is already listed for {by_digest[digest].name!r}")
            by_digest[digest] = principal
        else:
            if not isinstance(cn, str) or not cn.strip():
                raise TokenFileError(f"{where}.client_cn: must be a non-empty certificate common name")
            if cn in by_cn:
                raise TokenFileError(f"{where}.client_cn: {cn!r} is already listed for {by_cn[cn].name!r}")
            by_cn[cn] = principal
    return Tokens(by_digest, by_cn)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


T = TypeVar("T")


class WatchedFile(Generic[T]):
    """A credentials file parsed at start and re-parsed when it changes (checked at most every ``recheck_s``
    seconds), so a Kubernetes Secret rotation reaches the server without a restart. An unusable file at start
    raises; one that becomes unusable later makes :meth:`current` None (fail closed: serving the old content
    would keep a revoked credential alive) until it is fixed."""

    error_cls: type[AuthConfigError] = AuthConfigError

    def __init__(
        self, path: Path | str, parse: Callable[[str, str], T], setting: str, what: str, recheck_s: float
    ) -> None:
        self.path = Path(path)
        self.recheck_s = recheck_s
        self._parse, self._setting, self._what = parse, setting, what
        self._lock = threading.Lock()
        self._stamp = self._stat_or_fail()
        self._value: T | None = self._read()  # an unusable file at start stops the server
        self.error = ""
        self._checked = time.monotonic()

    def _stat_or_fail(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise self.error_cls(f"{self._setting} {self.path}: cannot read it ({exc.strerror})") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> T:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise self.error_cls(f"{self.path}: cannot read it ({exc.strerror})") from None
        return self._parse(text, str(self.path))

    def current(self) -> T | None:
        """The file's current content; None while the file is unusable (then :attr:`error` says why)."""
        now = time.monotonic()
        if now - self._checked < self.recheck_s:
            return self._value
        with self._lock:
            self._checked = now
            try:
                stamp = self._stat_or_fail()
                if stamp == self._stamp:
                    return self._value
                self._stamp = stamp
                self._value, self.error = self._read(), ""
                log.info("%s reloaded: %s", self._what, self.path)
            except AuthConfigError as exc:
                self._value, self.error = None, str(exc)
                log.error("%s unusable, refusing the calls it decides until it is fixed: %s", self._what, exc)
            return self._value


class TokenStore(WatchedFile[Tokens]):
    """The tokens file (``FACEXPLAIN_AUTH_TOKENS_FILE``), re-read when it changes."""

    error_cls = TokenFileError

    def __init__(self, path: Path | str, recheck_s: float = 1.0) -> None:
        super().__init__(path, parse_tokens, "FACEXPLAIN_AUTH_TOKENS_FILE", "tokens file", recheck_s)

    def tokens(self) -> Tokens | None:
        """The current tokens; None while the file is unusable (then :attr:`error` says why)."""
        return self.current()


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


def looks_like_jwt(token: str) -> bool:
    """A compact JWS: three base64url parts. Decides only where a bearer is checked, never whether it is valid."""
    return _JWT_SHAPE.match(token) is not None


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


class Authenticator:
    """Who the caller is and whether the method (and request) is within their scopes.

    With both a tokens file and a JWKS file, a bearer shaped like a JWT (three base64url parts) is verified
    against the JWKS, any other against the tokens file; a caller without a bearer may still be admitted by
    its client certificate (tokens file ``client_cn``)."""

    def __init__(self, store: TokenStore | None, jwt: JwtVerifier | None = None) -> None:
        if store is None and jwt is None:
            raise ValueError("an Authenticator needs a tokens file, a JWKS file or both")
        self.store, self.jwt = store, jwt

    def identify(self, metadata: Any, context: grpc.ServicerContext) -> Principal:
        token = bearer_token(metadata)
        if token == "":
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, "malformed authorization metadata; expected 'Bearer <token>'"
            )
        if token is not None and self.jwt is not None and looks_like_jwt(token):
            return self.jwt.verify(token)
        if self.store is None:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send 'authorization: Bearer <JWT>' (FACEXPLAIN_TOKEN or --token)"
                if token is None
                else "invalid token: this server accepts only JWTs signed by a key of its JWKS",
            )
        tokens = self.store.tokens()
        if tokens is None:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, "credentials cannot be checked: the server's tokens file is invalid"
            )
        principal: Principal | None
        if token is not None:
            principal = tokens.by_digest.get(token_digest(token))
            if principal is None:
                raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        else:
            cn = client_common_name(context)
            principal = tokens.by_cn.get(cn) if cn else None
            if principal is None:
                raise AuthError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing credentials: send 'authorization: Bearer <token>' (FACEXPLAIN_TOKEN or --token)",
                )
        if principal.expired():
            assert principal.expires is not None
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"credentials of {principal.name!r} expired at {principal.expires.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}",
            )
        return principal

    @staticmethod
    def authorize(principal: Principal, method: str, request: Any) -> None:
        rule = METHOD_SCOPES.get(method)
        if rule is None:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to any scope")
        if rule.scope not in principal.scopes:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED, f"{principal.name!r} lacks scope {rule.scope!r} needed by {method}"
            )
        if rule.admin_if and getattr(request, rule.admin_if, False) and ADMIN not in principal.scopes:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.name!r} lacks scope 'admin' needed by {method} with {rule.admin_if} set",
            )


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Checks every call but health before its handler runs; names the principal in the access log."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.auth = authenticator

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        service, _ = split_method(details.method)
        if handler is None or service in OPEN_SERVICES:
            return handler
        method, metadata = details.method, details.invocation_metadata
        any_credential = service in ANY_CREDENTIAL_SERVICES

        def check(request: Any, context: grpc.ServicerContext) -> None:
            try:
                principal = self.auth.identify(metadata, context)
                rec = current_call.get()
                if rec is not None:
                    rec.principal = principal.name
                if not any_credential:
                    self.auth.authorize(principal, method, request)
            except AuthError as exc:
                context.abort(exc.code, exc.message)

        def wrap(behavior: Behavior, streams: bool) -> Behavior:
            if streams:

                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    check(request, context)
                    yield from behavior(request, context)

                return stream

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                check(request, context)
                return behavior(request, context)

            return unary

        return wrap_handler(handler, wrap)
