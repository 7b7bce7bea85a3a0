"""The service-side trust decision: allow-listed digests and Ed25519 signatures, failing closed."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from registry.signing import TrustFileError, parse_digests, parse_public_keys, public_key_line, sign_digest
from services.kit.trust import TrustPolicy, UntrustedBundle

A = hashlib.sha256(b"a").hexdigest()
B = hashlib.sha256(b"b").hexdigest()


def test_no_files_trusts_the_bundle_checks_only() -> None:
    assert TrustPolicy().check(A) == "bundle checks only"


def test_allow_list_with_comments(tmp_path: Path) -> None:
    f = tmp_path / "digests"
    f.write_text(f"# released\n{A}  fr v1\n\nsha256:{B.upper()}\n")
    policy = TrustPolicy(digests_file=str(f))
    assert policy.check(A) == "allow-list (fr v1)" and policy.check(B) == "allow-list"
    with pytest.raises(UntrustedBundle, match="is not on the allow-list"):
        policy.check(hashlib.sha256(b"c").hexdigest())


def test_allow_list_is_reread_when_it_changes(tmp_path: Path) -> None:
    f = tmp_path / "digests"
    f.write_text(f"{A}\n")
    policy = TrustPolicy(digests_file=str(f))
    with pytest.raises(UntrustedBundle):
        policy.check(B)
    time.sleep(0.01)
    f.write_text(f"{A}\n{B} added later\n")
    assert policy.check(B) == "allow-list (added later)"


def test_signatures_by_trusted_keys_only(tmp_path: Path) -> None:
    trusted, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pem = trusted.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    keys = tmp_path / "keys"
    keys.write_text("# release keys\n" + pem.decode())
    policy = TrustPolicy(keys_file=str(keys))
    assert policy.check(A, sign_digest(trusted, A)).startswith("signed by key ")
    with pytest.raises(UntrustedBundle, match="signature no trusted key made"):
        policy.check(A, sign_digest(other, A))
    with pytest.raises(UntrustedBundle, match="signature no trusted key made"):
        policy.check(B, sign_digest(trusted, A))  # a signature of another digest
    with pytest.raises(UntrustedBundle, match="carries no signature"):
        policy.check(A)


def test_key_lines_and_bad_lines(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    parsed = parse_public_keys(public_key_line(key.public_key(), "release") + "\n")
    assert len(parsed) == 1 and parsed[0].comment == "release"
    with pytest.raises(TrustFileError, match="line 2: not an Ed25519 public key"):
        parse_public_keys("# ok\nnot-a-key\n")
    with pytest.raises(TrustFileError, match="line 1: not a sha256"):
        parse_digests("abc123 too short\n")


def test_unreadable_or_malformed_file_fails_closed(tmp_path: Path) -> None:
    missing = TrustPolicy(digests_file=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unreadable"):
        missing.load()
    with pytest.raises(UntrustedBundle, match="nothing is trusted"):
        missing.check(A)
    bad = tmp_path / "bad"
    bad.write_text(f"{A}\ngarbage\n")
    policy = TrustPolicy(digests_file=str(bad))
    with pytest.raises(UntrustedBundle, match="line 2"):
        policy.check(A)  # half a file is not trusted
