"""The local cache of downloaded bundles, keyed by what a version is, not by its number.

Version numbers restart at 1 in every registry (staging and production, a re-created registry, two
clusters sharing a cache volume), so ``<name>/<version>`` does not say which bundle a folder holds.
An entry is ``<cache>/<name>/<version>-<registry key>-<digest[:16]>/`` holding

* ``bundle/``: the downloaded bundle, as logged;
* ``source.json``: where it came from (registry URI without credentials, name, version, the version's
  ``bundle_sha256`` tag, run id, source) and when; its mtime records the entry's last use.

A cached entry is reused only when its marker names the same registry, name, version and digest and
the digest of the cached ``bundle.json`` (:func:`~facexplain.artifacts.bundle.bundle_digest`) equals
the version's ``bundle_sha256`` tag; the files themselves are checked against their sha256 by the
kind's loader, as for a fresh download. A version without that tag is never reused (downloaded every
time; services reject it anyway). Anything else is downloaded again.

Pruning keeps the :data:`KEEP` most recently used entries of a name, never the entry just used nor
any the caller protects (the version being served), and removes entries of the old number-only
layout and download folders abandoned for over an hour.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from facexplain.artifacts.bundle import BUNDLE_JSON, bundle_digest

log = logging.getLogger("facexplain.registry")

MARKER = "source.json"
BUNDLE_DIR = "bundle"
KEEP = 3  # most recently used entries kept per registered name
STALE_DOWNLOAD_S = 3600.0  # a ".<version>-..." download folder older than this was abandoned


def registry_key(public_registry_uri: str) -> str:
    """A short, stable key for a registry (its URI without credentials, trailing slash ignored)."""
    return hashlib.sha256(public_registry_uri.rstrip("/").encode()).hexdigest()[:8]


def entry_dir(cache_dir: Path | str, public_registry_uri: str, name: str, version: str, digest: str) -> Path:
    """Where the bundle of ``name`` v``version`` with ``digest`` from that registry is cached."""
    label = digest[:16] if digest else "unverified"
    return Path(cache_dir) / name / f"{version}-{registry_key(public_registry_uri)}-{label}"


def read_marker(entry: Path) -> dict[str, Any]:
    try:
        data = json.loads((entry / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(
    entry: Path, public_registry_uri: str, name: str, version: str, tags: dict[str, str], **extra: str
) -> None:
    marker = {
        "registry": public_registry_uri,
        "name": name,
        "version": version,
        "bundle_sha256": tags.get("bundle_sha256", ""),
        **extra,
        "downloaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (entry / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def metadata_digest(bundle: Path) -> str:
    """``bundle_digest`` of the bundle's ``bundle.json`` as it is on disk; "" when it cannot be read."""
    try:
        meta = json.loads((bundle / BUNDLE_JSON).read_text())
        return bundle_digest(meta) if isinstance(meta, dict) else ""
    except (OSError, json.JSONDecodeError, TypeError, ValueError):
        return ""


def reusable(entry: Path, public_registry_uri: str, name: str, version: str, digest: str) -> Path | None:
    """The cached bundle of ``entry`` if it is provably the version the registry describes, else None."""
    if not digest:
        return None
    bundle = entry / BUNDLE_DIR
    marker = read_marker(entry)
    same_source = (
        marker.get("registry") == public_registry_uri
        and marker.get("name") == name
        and str(marker.get("version")) == version
        and marker.get("bundle_sha256") == digest
    )
    if not same_source or metadata_digest(bundle) != digest:
        return None
    touch(entry)
    return bundle


def touch(entry: Path) -> None:
    """Record a use of ``entry`` (pruning keeps the most recently used)."""
    with contextlib.suppress(OSError):
        os.utime(entry / MARKER)


def _last_use(entry: Path) -> float:
    try:
        return (entry / MARKER).stat().st_mtime
    except OSError:
        try:
            return entry.stat().st_mtime
        except OSError:
            return 0.0


def prune(cache_dir: Path | str, name: str, *, keep: int = KEEP, protect: tuple[Path, ...] = ()) -> list[Path]:
    """Remove the entries of ``name`` beyond the ``keep`` most recently used (see the module docstring).

    ``protect`` lists entries (or the bundles inside them) never removed, on top of the ``keep``. Best
    effort: returns what was removed and ignores what cannot be (another process may prune it too).
    """
    root = Path(cache_dir) / name
    if not root.is_dir():
        return []
    kept = {p.resolve() for p in protect} | {p.parent.resolve() for p in protect if p.name == BUNDLE_DIR}
    now = time.time()
    entries: list[Path] = []
    removed: list[Path] = []
    for path in root.iterdir():
        if not path.is_dir() or path.resolve() in kept:
            continue
        if path.name.startswith("."):  # a download in progress, or one a crash abandoned
            if now - _last_use(path) > STALE_DOWNLOAD_S:
                removed.append(path)
        elif path.name.isdigit():  # the old layout, keyed by number only: never trusted again
            removed.append(path)
        else:
            entries.append(path)
    entries.sort(key=_last_use, reverse=True)
    removed += entries[max(0, keep) :]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    if removed:
        log.info("pruned %d cached bundle(s) of %s", len(removed), name)
    return removed


def evict(cache_dir: Path | str, public_registry_uri: str, name: str, version: str) -> None:
    """Drop every cached entry of ``name`` v``version`` from that registry (a rejected version)."""
    root = Path(cache_dir) / name
    for path in root.glob(f"{version}-{registry_key(public_registry_uri)}-*"):
        shutil.rmtree(path, ignore_errors=True)
