"""Ed25519 signatures over bundle digests: trust in a version that does not come from the registry.

Whoever can write to the registry can register a bundle whose checksums, golden input and metadata
are all self-consistent (a model that accepts everyone passes its own validation). A signature made
offline with a key the registry never sees, and checked by the services against public keys they
are configured with (``FACEXPLAIN_TRUSTED_KEYS_FILE``), is what such a writer cannot forge.

What is signed is the bundle digest (:func:`~facexplain.artifacts.bundle.bundle_digest`): one hash
over ``bundle.json``, which lists the sha256 of every other file, so it covers every byte a loader
reads. The signature travels as the version tag :data:`SIGNATURE_TAG` (``ed25519:<base64>``); the
service recomputes the digest from the bundle it downloaded and never trusts the ``bundle_sha256`` tag.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_TAG = "bundle_signature"
_DOMAIN = b"facexplain-bundle-sha256:"  # a signature over a digest is never valid for anything else
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_PEM_RE = re.compile(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", re.S)


class TrustFileError(ValueError):
    """A trust file (digests or keys) that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class TrustedKey:
    key: Ed25519PublicKey
    key_id: str  # first 16 hex of the sha256 of the raw public key: names a key in messages
    comment: str = ""


def _message(digest: str) -> bytes:
    if not _DIGEST_RE.match(digest):
        raise ValueError(f"not a bundle digest (64 lower-case hex): {digest[:80]!r}")
    return _DOMAIN + digest.encode()


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_digest(private_key: Ed25519PrivateKey, digest: str) -> str:
    """The tag value signing ``digest``: ``ed25519:<base64 signature>``."""
    return "ed25519:" + base64.b64encode(private_key.sign(_message(digest))).decode()


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustFileError("the signing key must be an Ed25519 private key (PEM, PKCS#8)")
    return key


def public_key_line(key: Ed25519PublicKey, comment: str = "") -> str:
    """One line of a keys file: ``ed25519:<base64 raw key> <comment>``."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"ed25519:{base64.b64encode(raw).decode()}" + (f" {comment}" if comment else "")


def parse_public_keys(text: str, source: str = "keys file") -> list[TrustedKey]:
    """Ed25519 public keys from PEM blocks and/or lines ``[ed25519:]<base64 of the 32 raw bytes> [comment]``.

    ``#`` starts a comment line. Anything unreadable raises :class:`TrustFileError` naming the line:
    a trust file that is half understood must not silently trust less (or more) than it says.
    """
    keys: list[TrustedKey] = []
    for block in _PEM_RE.findall(text):
        try:
            key = serialization.load_pem_public_key(block.encode())
        except ValueError as exc:
            raise TrustFileError(f"{source}: unreadable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise TrustFileError(f"{source}: a PEM key is not Ed25519")
        keys.append(TrustedKey(key, key_id(key), "pem"))
    for n, line in enumerate(_PEM_RE.sub("", text).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token, _, comment = line.partition(" ")
        token = token.removeprefix("ed25519:")
        try:
            raw = base64.b64decode(token, validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError):
            raise TrustFileError(
                f"{source} line {n}: not an Ed25519 public key (want 'ed25519:<base64 of 32 bytes> [comment]')"
            ) from None
        keys.append(TrustedKey(key, key_id(key), comment.strip()))
    return keys


def parse_digests(text: str, source: str = "digests file") -> dict[str, str]:
    """``digest -> comment`` from lines ``<sha256 hex> [comment]`` (``#`` lines are comments)."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token, _, comment = line.partition(" ")
        token = token.lower().removeprefix("sha256:")
        if not _DIGEST_RE.match(token):
            raise TrustFileError(f"{source} line {n}: not a sha256 bundle digest (64 hex digits)")
        out[token] = comment.strip().lstrip("#").strip()
    return out


def verify_signature(keys: Iterable[TrustedKey], digest: str, tag_value: str) -> TrustedKey | None:
    """The trusted key that signed ``digest`` in ``tag_value``, or None (absent, malformed or no key matches)."""
    if not tag_value.startswith("ed25519:"):
        return None
    try:
        signature = base64.b64decode(tag_value.removeprefix("ed25519:"), validate=True)
        message = _message(digest)
    except (binascii.Error, ValueError):
        return None
    for trusted in keys:
        try:
            trusted.key.verify(signature, message)
        except InvalidSignature:
            continue
        return trusted
    return None
