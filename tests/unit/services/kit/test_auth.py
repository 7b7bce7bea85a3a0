"""The tokens file (parsing, every error message naming its entry), the scope table, and the checks."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.api.v1 import attributes_pb2, counterfactual_pb2, decoding_pb2, directions_pb2, embedding_pb2
from services.kit.auth import (
    ADMIN,
    METHOD_SCOPES,
    SCOPES,
    Authenticator,
    AuthError,
    Principal,
    TokenFileError,
    TokenStore,
    bearer_token,
    parse_tokens,
)

SHA = hashlib.sha256(b"tok-a").hexdigest()


def _doc(*entries: dict[str, Any]) -> str:
    return json.dumps({"tokens": list(entries)})


def _entry(**kw: Any) -> dict[str, Any]:
    return {"principal": "alice", "sha256": SHA, "scopes": ["embed"], **kw}


def test_parse_valid_file() -> None:
    tokens = parse_tokens(
        _doc(
            _entry(expires="2030-01-01T00:00:00Z"),
            {"principal": "ops", "client_cn": "ops.example", "scopes": ["admin", "embed"]},
            _entry(principal="bob", sha256=hashlib.sha256(b"tok-b").hexdigest().upper(), scopes=["decode"]),
        )
    )
    alice = tokens.by_digest[SHA]
    assert alice.name == "alice" and alice.scopes == {"embed"}
    assert alice.expires is not None and alice.expires.year == 2030 and not alice.expired()
    assert tokens.by_digest[hashlib.sha256(b"tok-b").hexdigest()].name == "bob"  # upper-case hex accepted
    assert tokens.by_cn["ops.example"].scopes == {"admin", "embed"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", 'expected an object {"tokens": [...]}'),
        (json.dumps({"tokens": [], "extra": 1}), "unknown top-level key(s) extra"),
        (_doc("alice"), "tokens[0]: expected an object"),
        (_doc(_entry(token="tok-a")), "tokens[0]: holds the token itself ('token'); store only its SHA-256"),
        (_doc(_entry(role="x")), "tokens[0]: unknown key(s) role"),
        (_doc(_entry(principal="")), "tokens[0].principal: must be a non-empty string"),
        (_doc(_entry(scopes=[])), "tokens[0].scopes: must be a non-empty list"),
        (_doc(_entry(scopes=["embed", "root"])), "tokens[0].scopes: unknown scope(s) root; known: embed, decode"),
        (_doc(_entry(sha256="tok-a")), "tokens[0].sha256: must be 64 hex digits"),
        (_doc({"principal": "a", "scopes": ["embed"]}), "tokens[0]: give exactly one of sha256"),
        (_doc(_entry(client_cn="x")), "tokens[0]: give exactly one of sha256"),
        (_doc(_entry(expires="tomorrow")), "tokens[0].expires: 'tomorrow' is not an RFC 3339 time"),
        (_doc(_entry(expires="2030-01-01T00:00:00")), "tokens[0].expires: '2030-01-01T00:00:00' has no time zone"),
        (_doc(_entry(expires=1893456000)), "tokens[0].expires: must be an RFC 3339 time string"),
        (_doc(_entry(), _entry(principal="bob")), "tokens[1].sha256: the same token is already listed for 'alice'"),
    ],
)
def test_parse_errors_name_entry_and_field(text: str, message: str) -> None:
    with pytest.raises(TokenFileError) as err:
        parse_tokens(text, "tokens.json")
    assert message in str(err.value)
    assert str(err.value).startswith("tokens.json")


def test_scope_table_covers_every_rpc_and_only_them() -> None:
    """A new RPC without a rule would be refused to everyone (fail closed); this test makes it visible."""
    methods = {
        f"/{svc.full_name}/{m.name}"
        for mod in (embedding_pb2, decoding_pb2, directions_pb2, attributes_pb2, counterfactual_pb2)
        for svc in mod.DESCRIPTOR.services_by_name.values()
        for m in svc.methods
    }
    assert set(METHOD_SCOPES) == methods
    assert {r.scope for r in METHOD_SCOPES.values()} == set(SCOPES)
    for method, rule in METHOD_SCOPES.items():
        assert (rule.scope == ADMIN) == method.endswith("/Reload"), method


def test_bearer_token_parsing() -> None:
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "bearer  abc "),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) == ""
    assert bearer_token((("x-other", "1"),)) is None
    assert bearer_token(None) is None


class _Ctx:
    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def _store(tmp_path: Path, text: str) -> TokenStore:
    path = tmp_path / "tokens.json"
    path.write_text(text)
    return TokenStore(path, recheck_s=0)


def _code(fn: Any) -> grpc.StatusCode:
    with pytest.raises(AuthError) as err:
        fn()
    return err.value.code


def test_identify_and_authorize(tmp_path: Path) -> None:
    past = "2020-01-01T00:00:00+00:00"
    expired_sha = hashlib.sha256(b"old").hexdigest()
    auth = Authenticator(_store(tmp_path, _doc(_entry(), _entry(principal="old", sha256=expired_sha, expires=past))))
    md = (("authorization", "Bearer tok-a"),)
    alice = auth.identify(md, _Ctx())  # type: ignore[arg-type]
    assert alice.name == "alice"
    assert _code(lambda: auth.identify((), _Ctx())) == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[arg-type]
    bad = (("authorization", "Bearer nope"),)
    assert _code(lambda: auth.identify(bad, _Ctx())) == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[arg-type]
    old = (("authorization", "Bearer old"),)
    with pytest.raises(AuthError, match="expired at 2020-01-01"):
        auth.identify(old, _Ctx())  # type: ignore[arg-type]
    embed = "/facexplain.v1.EmbeddingService/Embed"
    Authenticator.authorize(alice, embed, embedding_pb2.EmbedRequest())
    reload = "/facexplain.v1.EmbeddingService/Reload"
    assert _code(lambda: Authenticator.authorize(alice, reload, None)) == grpc.StatusCode.PERMISSION_DENIED
    ssi = "/facexplain.v1.DirectionsService/DiscoverSSI"
    dirs = Principal("d", frozenset({"directions"}))
    Authenticator.authorize(dirs, ssi, directions_pb2.DiscoverSSIRequest())
    registering = directions_pb2.DiscoverSSIRequest(register=True)
    with pytest.raises(AuthError, match=r"lacks scope 'admin' needed by .*DiscoverSSI with register set"):
        Authenticator.authorize(dirs, ssi, registering)
    Authenticator.authorize(Principal("d", frozenset({"directions", "admin"})), ssi, registering)
    assert _code(lambda: Authenticator.authorize(alice, "/x.Y/Z", None)) == grpc.StatusCode.PERMISSION_DENIED


def test_store_reloads_on_change_and_fails_closed(tmp_path: Path) -> None:
    store = _store(tmp_path, _doc(_entry()))
    tokens = store.tokens()
    assert tokens is not None and SHA in tokens.by_digest
    bob = hashlib.sha256(b"tok-b").hexdigest()
    time.sleep(0.01)
    store.path.write_text(_doc(_entry(principal="bob", sha256=bob)))
    os.utime(store.path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    tokens = store.tokens()
    assert tokens is not None and set(tokens.by_digest) == {bob}  # alice's token revoked without a restart
    store.path.write_text('{"tokens": [{"principal": "x"}]}')
    assert store.tokens() is None and "tokens[0].scopes" in store.error
    auth = Authenticator(store)
    with pytest.raises(AuthError, match="tokens file is invalid"):
        auth.identify((("authorization", "Bearer tok-b"),), _Ctx())  # type: ignore[arg-type]


def test_store_refuses_unusable_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read it"):
        TokenStore(tmp_path / "missing.json")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(TokenFileError, match=r'expected an object \{"tokens"'):
        TokenStore(tmp_path / "t.json")
