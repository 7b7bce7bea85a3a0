"""The bundle format: the on-disk form of a registered model version, whatever its kind.

A bundle is a directory that a service (or a fresh process) can load with the facexplain package
alone: no training code, no MLflow, no network. Every kind shares

* ``bundle.json``: format version, kind, name, the fields the kind requires
  (:attr:`~facexplain.artifacts.kind.ArtifactKind.required_metadata`), the golden input check, and a
  sha256 for every other file (so a corrupt artifact is caught before any weight is read, with a
  message naming the file);
* ``weights/``: either face-api's own manifest + ``.bin`` shards copied byte for byte (the default
  models: smallest, and provably the published weights) or ``torch.save`` state dicts (models
  facexplain trains); each component says which in ``components``;
* ``golden/``: a fixed input and, in ``bundle.json``, what the model produced for it when the bundle
  was written; the kind's validation runs the input again and compares.

What a kind adds (how to save, load and validate it) lives in one module per kind beside this one.

Why not ``mlflow.pytorch.log_model``: its torch.export path fixes the batch size to the input
example's, and it would make loading depend on MLflow. The registry stores this directory as
plain run artifacts instead (``registry/client.py``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facexplain.artifacts.kind import KINDS
from facexplain.paths import REPO_ROOT

if TYPE_CHECKING:
    import torch

# torch and numpy are imported inside the functions that need them: the registry CLI and the registry
# client read and write metadata only, and ``facexplain registry list`` should not pay for torch.

BUNDLE_FORMAT = 1
BUNDLE_JSON = "bundle.json"
GOLDEN_IMAGE = REPO_ROOT / "data" / "golden" / "face.png"
WEIGHT_FORMATS = ("faceapi", "torch")


class BundleError(ValueError):
    """A bundle that cannot be read, loaded or validated; the message says which file or check and why."""


@dataclass(frozen=True)
class GoldenReport:
    """What validation measured on the golden input (numbers only, no biometric data)."""

    template_dim: int
    norm: float
    cosine_to_expected: float
    batch_max_abs_diff: float
    seconds: float


# -- reading -------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(bundle_dir: Path | str) -> dict[str, Any]:
    """Parse and check ``bundle.json``: format, kind, and the fields that kind requires."""
    path = Path(bundle_dir) / BUNDLE_JSON
    if not path.is_file():
        raise BundleError(f"not a model bundle: {path} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{BUNDLE_JSON} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{BUNDLE_JSON} must hold a JSON object")
    errors = metadata_errors(meta)
    if errors:
        raise BundleError("bundle metadata invalid: " + "; ".join(errors))
    return meta


def metadata_errors(meta: dict[str, Any]) -> list[str]:
    """Every problem with a metadata dict (empty when it is usable); used by loaders and the registry."""
    errors: list[str] = []
    fmt = meta.get("format_version")
    if fmt != BUNDLE_FORMAT:
        errors.append(f"format_version is {fmt!r}, this code reads {BUNDLE_FORMAT}")
    kind = KINDS.get(str(meta.get("kind")))
    if kind is None:
        errors.append(f"kind is {meta.get('kind')!r}, expected one of {', '.join(KINDS)}")
        return errors
    required = kind.required_metadata
    missing = [f for f in required if f not in meta]
    if missing:
        errors.append(f"{kind.name} bundle lacks {', '.join(missing)}")
    dim = meta.get("template_dim")
    if "template_dim" in required and not (isinstance(dim, int) and dim > 0):
        errors.append(f"template_dim must be a positive integer, got {dim!r}")
    fr = meta.get("fr_model")
    if "fr_model" in required and not (isinstance(fr, dict) and fr.get("name") and str(fr.get("version", ""))):
        errors.append("fr_model must name the FR model and version it belongs to ({'name': ..., 'version': ...})")
    for comp, spec in (meta.get("components") or {}).items():
        if spec.get("format") not in WEIGHT_FORMATS:
            errors.append(f"component {comp!r} has format {spec.get('format')!r}, expected one of {WEIGHT_FORMATS}")
    return errors


def verify_files(bundle_dir: Path | str, meta: dict[str, Any]) -> None:
    """Check every file listed in ``files`` against its sha256: a corrupt artifact fails here, by name."""
    root = Path(bundle_dir)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError("bundle metadata lists no files (and checksums)")
    for rel, digest in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise BundleError(f"corrupt artifact: {rel} is listed in {BUNDLE_JSON} but missing")
        actual = file_sha256(path)
        if actual != digest:
            raise BundleError(
                f"corrupt artifact: sha256 of {rel} is {actual[:12]}..., {BUNDLE_JSON} says {str(digest)[:12]}..."
            )


def open_bundle(bundle_dir: Path | str, kind: str, *, verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """(directory, metadata) of a bundle that must be of ``kind``, its checksums verified first unless
    ``verify=False``: every loader starts here, so no loader parses a file it has not checked."""
    root = Path(bundle_dir)
    meta = read_metadata(root)
    if meta["kind"] != kind:
        raise BundleError(f"{root.name}: this bundle is a {meta['kind']!r}, not a {kind!r}")
    if verify:
        verify_files(root, meta)
    return root, meta


def bundle_digest(meta: dict[str, Any]) -> str:
    """One hash over the weight files' hashes and the metadata that changes behaviour.

    ``register-defaults`` uses it to recognise a version that is already registered.
    """
    keep = {k: v for k, v in meta.items() if k not in ("created_at", "created_by", "description", "golden")}
    # The golden template is recomputed at every save (float noise across machines); its image is in ``files``.
    keep["golden_min_cosine"] = (meta.get("golden") or {}).get("min_cosine")
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def flat_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """String-to-string view for registry tags and ModelStatus (no golden template, no file list)."""
    out: dict[str, str] = {
        "kind": str(meta["kind"]),
        "bundle_format": str(meta.get("format_version")),
    }
    if "template_dim" in meta:
        out["template_dim"] = str(meta["template_dim"])
    inp = meta.get("input") or {}
    if inp:
        out["input_size"] = str(inp.get("chip_size", ""))
        out["normalisation"] = (
            f"(x - mean_rgb{tuple(inp.get('mean_rgb', ()))}) / {inp.get('divisor')}, RGB in [0, 255]"
            if "divisor" in inp
            else str(inp.get("normalisation", ""))
        )
    ali = meta.get("alignment") or {}
    if ali:
        out["alignment"] = str(ali.get("template", ""))
        out["chip_size"] = str(ali.get("chip_size", ""))
        out["chip_padding"] = str(ali.get("padding", ""))
    ver = meta.get("verification") or {}
    if ver:
        out["verification_metric"] = str(ver.get("metric", ""))
        out["verification_threshold"] = str(ver.get("threshold", ""))
        out["verification_accept_below"] = str(bool(ver.get("accept_below"))).lower()
    fr = meta.get("fr_model") or {}
    if fr:
        out["fr_model_name"] = str(fr.get("name", ""))
        out["fr_model_version"] = str(fr.get("version", ""))
    if "architecture" in meta:
        out["architecture"] = str(meta["architecture"])
    kind = KINDS.get(str(meta["kind"]))
    if kind is not None and kind.describe is not None:
        out.update(kind.describe(meta))
    if "source" in meta:
        out["source"] = str(meta["source"])[:250]
    return out


# -- writing -------------------------------------------------------------------------------------------


def copy_faceapi(faceapi_dir: Path, stem: str, dest: Path) -> list[Path]:
    """Copy one face-api network (manifest and shards) into ``dest``, byte for byte."""
    manifest = faceapi_dir / f"{stem}-weights_manifest.json"
    if not manifest.is_file():
        raise BundleError(f"{manifest} not found: run `make setup` or set FACEXPLAIN_FACEAPI_DIR")
    copied = [manifest]
    for group in json.loads(manifest.read_text()):
        copied += [faceapi_dir / p for p in group["paths"]]
    out = []
    for src in copied:
        shutil.copy2(src, dest / src.name)
        out.append(dest / src.name)
    return out


def write_metadata(out: Path, meta: dict[str, Any]) -> None:
    meta["files"] = {
        p.relative_to(out).as_posix(): file_sha256(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != BUNDLE_JSON
    }
    (out / BUNDLE_JSON).write_text(json.dumps(meta, indent=1, allow_nan=True) + "\n")


# -- golden input --------------------------------------------------------------------------------------


def load_golden_image(path: Path) -> torch.Tensor:
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
