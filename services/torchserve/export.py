"""Registered version -> TorchServe ``.mar``, and the ``config.properties`` that serves such archives.

Export does what a service's watcher does before it loads a version (``services.kit.reload``): resolve
the alias, download the bundle, check its metadata against the registry tags, verify its layout and every
file's checksum, and apply the trust policy (``FACEXPLAIN_TRUSTED_*``) to the digest computed from what
was downloaded. Only then is the bundle packed, unchanged, with ``facexplain_handler.py`` and a
``model-config.yaml`` carrying TorchServe's own batching (``batchSize``, ``maxBatchDelay``): TorchServe
reads those when it registers the archive, so a plain ``torchserve --models NAME=FILE.mar`` batches.

``torch-model-archiver`` (pinned in ``requirements-torchserve.lock``) runs as a subprocess of this
interpreter; nothing here imports TorchServe itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facexplain.artifacts.bundle import BundleError, bundle_digest, open_bundle, read_metadata
from facexplain.artifacts.decoder import KIND_DECODER
from facexplain.artifacts.embedder import KIND_EMBEDDER
from registry import Registry, VersionInfo
from registry.signing import SIGNATURE_TAG
from services.kit.reload import metadata_problems
from services.kit.trust import TrustPolicy
from services.torchserve import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_DELAY_MS,
    DEFAULT_RESPONSE_TIMEOUT_S,
    facexplain_handler,
)
from services.torchserve.facexplain_handler import BUNDLE_DIR, EXPORT_JSON

EXPORTABLE = (KIND_EMBEDDER, KIND_DECODER)


class ExportError(ValueError):
    """A version that cannot be exported, or an archiver that failed; the message says which and why."""


@dataclass(frozen=True)
class Exported:
    """One written archive and what it serves."""

    mar: Path
    model_name: str  # TorchServe's name for it (the URL path /predictions/<model_name>)
    name: str
    version: str
    kind: str
    bundle_sha256: str
    trusted_by: str


@dataclass(frozen=True)
class BatchingSettings:
    """TorchServe's per-model settings written into the archive's ``model-config.yaml``."""

    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_delay_ms: int = DEFAULT_MAX_BATCH_DELAY_MS
    workers: int = 1
    response_timeout_s: int = DEFAULT_RESPONSE_TIMEOUT_S

    def yaml(self) -> str:
        # One worker: a second process would split the batch and compete for the same cores.
        return (
            f"minWorkers: {self.workers}\n"
            f"maxWorkers: {self.workers}\n"
            f"batchSize: {self.batch_size}\n"
            f"maxBatchDelay: {self.max_batch_delay_ms}\n"
            f"responseTimeout: {self.response_timeout_s}\n"
        )


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME@ALIAS`` or ``NAME@vN`` / ``NAME@N`` (a version number) -> (name, alias, version)."""
    name, sep, at = ref.partition("@")
    if not name or not sep or not at:
        raise ExportError(f"expected NAME@ALIAS or NAME@VERSION, got {ref!r}")
    number = re.fullmatch(r"v?(\d+)", at)
    return (name, None, number.group(1)) if number else (name, at, None)


def torchserve_model_name(name: str) -> str:
    """TorchServe model names are URL path segments: keep letters, digits, '-' and '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def export_version(
    registry: Registry,
    ref: str,
    out_dir: Path,
    *,
    batching: BatchingSettings | None = None,
    trust: TrustPolicy | None = None,
    model_name: str | None = None,
) -> Exported:
    """Resolve ``ref`` (NAME@ALIAS or NAME@VERSION) in ``registry`` and write ``<out_dir>/<model_name>.mar``."""
    name, alias, version = parse_ref(ref)
    info = registry.get_version(name, version) if version else registry.resolve(name, str(alias))
    trust = trust or TrustPolicy()
    with tempfile.TemporaryDirectory(prefix="fx-ts-export-") as tmp:
        bundle = registry.download(info, Path(tmp) / "cache")
        meta = read_metadata(bundle)
        kind = str(meta["kind"])
        if kind not in EXPORTABLE:
            raise ExportError(f"{info.name} v{info.version} is a {kind!r}; TorchServe export serves {EXPORTABLE}")
        problems = metadata_problems(kind, info, meta)
        if problems:
            raise ExportError(f"{info.name} v{info.version}: metadata incompatible: " + "; ".join(problems))
        signature = info.tags.get(SIGNATURE_TAG, "")
        trust.load()
        trusted_by = trust.check(bundle_digest(meta), signature)
        return pack_bundle(
            bundle, info, out_dir, batching=batching, model_name=model_name, signature=signature, trusted_by=trusted_by
        )


def pack_bundle(
    bundle: Path,
    info: VersionInfo,
    out_dir: Path,
    *,
    batching: BatchingSettings | None = None,
    model_name: str | None = None,
    signature: str = "",
    trusted_by: str = "bundle checks only",
) -> Exported:
    """Pack a verified bundle directory as ``<out_dir>/<model_name>.mar`` labelled ``info.name`` v``info.version``.

    :func:`export_version` calls it after the registry checks; the serving benchmark calls it on a bundle it
    just wrote (no registry in a benchmark's loop).
    """
    batching = batching or BatchingSettings()
    meta = read_metadata(bundle)
    kind = str(meta["kind"])
    if kind not in EXPORTABLE:
        raise ExportError(f"{info.name} v{info.version} is a {kind!r}; TorchServe export serves {EXPORTABLE}")
    open_bundle(bundle, kind)  # layout and every file's sha256, by name
    digest = bundle_digest(meta)
    ts_name = model_name or torchserve_model_name(info.name)
    with tempfile.TemporaryDirectory(prefix="fx-ts-pack-") as tmp:
        stage = Path(tmp) / "stage"
        shutil.copytree(bundle, stage / BUNDLE_DIR)
        spec = _export_spec(info, kind, digest, signature, trusted_by, batching)
        (stage / EXPORT_JSON).write_text(json.dumps(spec, indent=1) + "\n")
        config = Path(tmp) / "model-config.yaml"
        config.write_text(batching.yaml())
        out_dir.mkdir(parents=True, exist_ok=True)
        _archive(ts_name, info.version, stage, config, out_dir)
    return Exported(out_dir / f"{ts_name}.mar", ts_name, info.name, info.version, kind, digest, trusted_by)


def _export_spec(
    info: VersionInfo, kind: str, digest: str, signature: str, trusted_by: str, batching: BatchingSettings
) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "alias": info.alias,
        "kind": kind,
        "bundle_sha256": digest,
        "bundle_signature": signature,
        "trusted_by_at_export": trusted_by,
        "registry_run_id": info.run_id,
        "batch_size": batching.batch_size,
        "max_batch_delay_ms": batching.max_batch_delay_ms,
    }


def _archive(ts_name: str, version: str, stage: Path, config: Path, out_dir: Path) -> None:
    """Run torch-model-archiver; a missing install says how to get one."""
    handler = Path(facexplain_handler.__file__)
    cmd = [
        sys.executable, "-m", "model_archiver.model_packaging",
        "--model-name", ts_name, "--version", version, "--handler", str(handler),
        "--extra-files", str(stage), "--config-file", str(config), "--export-path", str(out_dir), "--force",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if "No module named model_archiver" in proc.stderr:
            raise ExportError("torch-model-archiver is not installed: run `make setup-torchserve`")
        raise ExportError(f"torch-model-archiver failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")


def check_bundle(path: Path) -> dict[str, Any]:
    """Metadata of an exported bundle directory after verifying it (used by tests on an extracted archive)."""
    meta = read_metadata(path)
    if meta["kind"] not in EXPORTABLE:
        raise BundleError(f"kind {meta['kind']!r} is not exportable")
    open_bundle(path, str(meta["kind"]))
    return meta


# -- serving: TorchServe's config.properties -------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    """TorchServe's listeners; all bound to loopback by :func:`write_config`."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071


def write_config(path: Path, model_store: Path, ports: Ports, *, host: str = "127.0.0.1") -> Path:
    """A ``config.properties`` serving ``model_store`` on ``host`` only.

    Token authorisation is off (TorchServe 0.12 turns it on by default and writes its keys into the
    working directory): these listeners are loopback-only, like an unauthenticated facexplain service, and
    the model API stays disabled, so nothing can register or unregister archives over the network.
    """
    lines = [
        "# Written by facexplain (services/torchserve/export.py): loopback only, see notes/torchserve-README.md",
        f"inference_address=http://{host}:{ports.inference}",
        f"management_address=http://{host}:{ports.management}",
        f"metrics_address=http://{host}:{ports.metrics}",
        f"grpc_inference_address={host}",
        f"grpc_management_address={host}",
        f"grpc_inference_port={ports.grpc_inference}",
        f"grpc_management_port={ports.grpc_management}",
        f"model_store={model_store}",
        "disable_token_authorization=true",
        "enable_model_api=false",
        "default_workers_per_model=1",
        "install_py_dep_per_model=false",
        # Requests of up to 16 MiB (the services' FACEXPLAIN_MAX_MESSAGE_BYTES default); TorchServe's is 6.5 MB.
        "max_request_size=16777216",
        "max_response_size=16777216",
        "disable_system_metrics=true",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
