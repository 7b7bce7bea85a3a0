"""Which registered versions a service may serve, decided by the service, not by the bundle or the registry.

A bundle's checksums, golden input and metadata only prove that it is self-consistent; anyone who can
write to the registry can make a self-consistent bundle. With ``FACEXPLAIN_TRUSTED_DIGESTS_FILE``
(an allow-list of bundle digests) and/or ``FACEXPLAIN_TRUSTED_KEYS_FILE`` (Ed25519 public keys whose
signature, in the version tag ``bundle_signature``, vouches for a digest) configured, a version is
served only when the digest the service computes from the bundle it downloaded is on the list or
signed by one of the keys. Anything else is rejected before a weight file is parsed; the old version
keeps serving and ``ModelStatus.last_reload_error`` and the log say why.

The files are read again whenever they change (mtime/size), so adding a digest or rotating a key
needs no restart (then ``Reload``). A configured file that is missing or malformed trusts nothing
(fail closed) and, at start-up, stops the service with a message naming the file and line.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from facexplain.artifacts.bundle import BundleError
from registry.signing import TrustedKey, TrustFileError, parse_digests, parse_public_keys, verify_signature

log = logging.getLogger("facexplain.trust")


class UntrustedBundle(BundleError):
    """A version that no configured trust anchor vouches for."""


@dataclass
class _Cached:
    stamp: tuple[float, int] | None = None
    digests: dict[str, str] | None = None
    keys: list[TrustedKey] | None = None
    error: str = ""


class TrustPolicy:
    """The allow-list and the trusted keys of one service (either may be empty = not used)."""

    def __init__(self, digests_file: str = "", keys_file: str = "") -> None:
        self.digests_file = Path(digests_file) if digests_file else None
        self.keys_file = Path(keys_file) if keys_file else None
        self._lock = threading.Lock()
        self._digests = _Cached()
        self._keys = _Cached()

    @property
    def enabled(self) -> bool:
        return self.digests_file is not None or self.keys_file is not None

    def describe(self) -> str:
        parts = []
        if self.digests_file is not None:
            parts.append(f"allow-list {self.digests_file} (FACEXPLAIN_TRUSTED_DIGESTS_FILE)")
        if self.keys_file is not None:
            parts.append(f"Ed25519 keys {self.keys_file} (FACEXPLAIN_TRUSTED_KEYS_FILE)")
        return " or ".join(parts) if parts else "none: the bundle's own checks only"

    def stamp(self) -> tuple[tuple[float, int] | None, ...]:
        """Changes whenever a trust file changes: a version rejected as untrusted is retried by the next poll."""
        return tuple(self._stamp(p) for p in (self.digests_file, self.keys_file) if p is not None)

    # -- reading the files (cached by mtime and size) -------------------------------------------------------
    @staticmethod
    def _stamp(path: Path) -> tuple[float, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def _refresh(self, path: Path, cached: _Cached, digests: bool) -> _Cached:
        stamp = self._stamp(path)
        if stamp is not None and stamp == cached.stamp:
            return cached
        fresh = _Cached(stamp=stamp)
        try:
            text = path.read_text()
            if digests:
                fresh.digests = parse_digests(text, str(path))
            else:
                fresh.keys = parse_public_keys(text, str(path))
        except (OSError, UnicodeDecodeError) as exc:
            fresh.error = f"trust file {path} unreadable ({type(exc).__name__}); nothing is trusted"
        except TrustFileError as exc:
            fresh.error = f"{exc}; nothing is trusted"
        if fresh.error:
            log.error("%s", fresh.error)
        else:
            n = len(fresh.digests or {}) if digests else len(fresh.keys or [])
            log.info("trust file %s read: %d %s", path, n, "digest(s)" if digests else "key(s)")
        return fresh

    def load(self) -> None:
        """Read the files now; raise :class:`ValueError` if a configured one is unusable (start-up)."""
        errors = self._current()[2]
        if errors:
            raise ValueError("; ".join(errors))

    def _current(self) -> tuple[dict[str, str], list[TrustedKey], list[str]]:
        with self._lock:
            errors = []
            digests: dict[str, str] = {}
            keys: list[TrustedKey] = []
            if self.digests_file is not None:
                self._digests = self._refresh(self.digests_file, self._digests, True)
                digests = self._digests.digests or {}
                if self._digests.error:
                    errors.append(self._digests.error)
            if self.keys_file is not None:
                self._keys = self._refresh(self.keys_file, self._keys, False)
                keys = self._keys.keys or []
                if self._keys.error:
                    errors.append(self._keys.error)
            return digests, keys, errors

    # -- the decision -------------------------------------------------------------------------------------
    def check(self, digest: str, signature_tag: str = "") -> str:
        """How ``digest`` is trusted (for ModelStatus), or :class:`UntrustedBundle` saying why not.

        ``digest`` must be the one computed from the downloaded ``bundle.json``, never a registry tag.
        """
        if not self.enabled:
            return "bundle checks only"
        digests, keys, errors = self._current()
        if digest in digests:
            note = digests[digest]
            return f"allow-list{f' ({note})' if note else ''}"
        if signature_tag and keys:
            signer = verify_signature(keys, digest, signature_tag)
            if signer is not None:
                return f"signed by key {signer.key_id}{f' ({signer.comment})' if signer.comment else ''}"
        why = []
        if self.digests_file is not None:
            why.append("is not on the allow-list (FACEXPLAIN_TRUSTED_DIGESTS_FILE)")
        if self.keys_file is not None:
            why.append(
                "carries a signature no trusted key made (FACEXPLAIN_TRUSTED_KEYS_FILE)"
                if signature_tag
                else "carries no signature (version tag bundle_signature)"
            )
        msg = f"untrusted: bundle sha256 {digest[:16]}... " + " and ".join(why)
        if errors:
            msg += " [" + "; ".join(errors) + "]"
        raise UntrustedBundle(msg)
