"""Direction sets and equivariance maps as self-contained bundles (registry kind ``direction_set``).

An audit that says "moving along the eyes direction changes X" must be able to cite *which* direction
it used, and someone else must be able to load exactly those numbers later without the data or the
server that produced them. A bundle is the same directory form as a model bundle
(:mod:`facexplain.artifacts.bundle`): ``bundle.json`` with the metadata and a sha256 per file, plus the
numbers as ``.npy`` arrays:

* a **direction set** (method ``ssi``, ``centroid`` or ``regression``): ``vectors.npy`` (k, D) float32,
  per-direction names, eigenvalues, explained variance and standard deviations in the metadata, and
  for the centroid method ``centroids.npy`` (C, D) with the group names, values and counts;
* an **equivariance map set** (method ``equivariance``): ``maps.npz`` holding, per transform, the
  forward and inverse (D, D) matrices and their biases; the transforms and held-out cosines are in
  the metadata.

The metadata always names the FR model (name + version) whose template space the numbers live in,
the SHA-256 of the data manifest, the seed and the request parameters: that is what makes a set
citable. Templates or images are never stored, only derived vectors. No torch, no MLflow, no
protobuf here: the service converts to and from its wire types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import facexplain
from facexplain.artifacts.bundle import (
    BUNDLE_FORMAT,
    BundleError,
    open_bundle,
    write_metadata,
)
from facexplain.artifacts.kind import ArtifactKind, register

KIND_DIRECTION_SET = "direction_set"
# Registered names the API fixes as defaults (directions.proto) that name a role only: a direction set
# belongs to an FR model through its metadata, not its name, so there is no architecture suffix.
DEFAULT_DIRECTIONS_NAME = "facexplain-directions"
DEFAULT_EQUIVARIANCE_NAME = "facexplain-equivariance"
ROLE_ONLY_NAMES = (DEFAULT_DIRECTIONS_NAME, DEFAULT_EQUIVARIANCE_NAME)
DIRECTION_METHODS = ("ssi", "centroid", "regression")
METHOD_EQUIVARIANCE = "equivariance"
VECTORS_FILE = "vectors.npy"
CENTROIDS_FILE = "centroids.npy"
MAPS_FILE = "maps.npz"
TRANSFORM_KINDS = ("rotation", "translation", "scale")


def utc_now() -> str:
    """ISO-8601 UTC timestamp in milliseconds (``created_at``; orders sets made within one second)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class DirectionSetData:
    """One direction set as plain numbers: what a bundle stores and what a service serves."""

    set_id: str
    method: str  # "ssi", "centroid" or "regression"
    target: str  # the region (SSI) or the label (centroid, regression)
    fr_name: str
    fr_version: str
    vectors: np.ndarray  # (k, D) float32
    names: list[str]
    eigenvalues: list[float]
    explained_variance: list[float]
    stddev: list[float]
    data_manifest_sha256: str
    seed: int = 0
    n_items: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    # centroid method: group centroids, reference first
    centroid_names: list[str] = field(default_factory=list)
    centroid_values: list[float] = field(default_factory=list)
    centroid_counts: list[int] = field(default_factory=list)
    centroids: np.ndarray | None = None  # (C, D) float32
    centroids_normalized: bool = False
    created_at: str = field(default_factory=utc_now)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def check(self) -> None:
        """Raise :class:`BundleError` when the arrays and lists disagree (before writing or after reading)."""
        if self.method not in DIRECTION_METHODS:
            raise BundleError(f"method is {self.method!r}, expected one of {DIRECTION_METHODS}")
        v = self.vectors
        if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
            raise BundleError(f"vectors must be a (k >= 1, D >= 1) array, got shape {v.shape}")
        if not np.isfinite(v).all():
            raise BundleError("vectors contain NaN or infinite values")
        k = v.shape[0]
        for name, values in (
            ("names", self.names),
            ("eigenvalues", self.eigenvalues),
            ("explained_variance", self.explained_variance),
            ("stddev", self.stddev),
        ):
            if len(values) != k:
                raise BundleError(f"{len(values)} {name} for {k} directions")
        if self.centroids is not None:
            c = self.centroids
            if c.ndim != 2 or c.shape[1] != v.shape[1]:
                raise BundleError(f"centroids must be (C, {v.shape[1]}), got shape {c.shape}")
            n = c.shape[0]
            if not (len(self.centroid_names) == len(self.centroid_values) == len(self.centroid_counts) == n):
                raise BundleError(f"{n} centroids but names/values/counts of other lengths")


@dataclass
class EquivarianceMapData:
    """The maps of one transform, both ways: ``t' = M t + b`` on raw column-vector templates."""

    kind: str  # "rotation", "translation" or "scale"
    angle_degrees: float
    dx: float
    dy: float
    scale: float
    forward: np.ndarray  # (D, D) float32: template of a face -> template of the transformed face
    forward_bias: np.ndarray  # (D,) float32
    inverse: np.ndarray  # (D, D) float32: template of the transformed face -> untransformed
    inverse_bias: np.ndarray  # (D,) float32
    forward_cosine: float
    inverse_cosine: float
    baseline_cosine: float

    def transform_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "angle_degrees": self.angle_degrees,
            "dx": self.dx,
            "dy": self.dy,
            "scale": self.scale,
        }


@dataclass
class EquivarianceSetData:
    """Equivariance maps fitted on one dataset for one FR model version."""

    set_id: str
    fr_name: str
    fr_version: str
    maps: list[EquivarianceMapData]
    data_manifest_sha256: str
    seed: int = 0
    n_items: int = 0
    params: dict[str, str] = field(default_factory=dict)
    created_at: str = field(default_factory=utc_now)

    @property
    def dim(self) -> int:
        return int(self.maps[0].forward.shape[0])

    def check(self) -> None:
        if not self.maps:
            raise BundleError("an equivariance set needs at least one map")
        d = self.maps[0].forward.shape[0]
        for i, m in enumerate(self.maps):
            if m.kind not in TRANSFORM_KINDS:
                raise BundleError(f"map {i}: transform kind {m.kind!r}, expected one of {TRANSFORM_KINDS}")
            for name, arr, shape in (
                ("forward", m.forward, (d, d)),
                ("inverse", m.inverse, (d, d)),
                ("forward_bias", m.forward_bias, (d,)),
                ("inverse_bias", m.inverse_bias, (d,)),
            ):
                if arr.shape != shape:
                    raise BundleError(f"map {i}: {name} has shape {arr.shape}, expected {shape}")
                if not np.isfinite(arr).all():
                    raise BundleError(f"map {i}: {name} contains NaN or infinite values")


def _prepare(out_dir: Path | str) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _common_meta(name: str, dim: int, fr_name: str, fr_version: str, method: str) -> dict[str, Any]:
    return {
        "format_version": BUNDLE_FORMAT,
        "kind": KIND_DIRECTION_SET,
        "name": name,
        "method": method,
        "template_dim": dim,
        "fr_model": {"name": fr_name, "version": fr_version},
        "source": "discovered by facexplain (services/directions)",
        "created_by": f"facexplain {facexplain.__version__}",
    }


def save_direction_set(out_dir: Path | str, data: DirectionSetData, *, name: str, description: str = "") -> dict:
    """Write ``data`` as a bundle named ``name`` (the registered model it is meant for); return the metadata."""
    data.check()
    out = _prepare(out_dir)
    np.save(out / VECTORS_FILE, np.ascontiguousarray(data.vectors, dtype=np.float32))
    meta = _common_meta(name, data.dim, data.fr_name, data.fr_version, data.method)
    meta.update(
        {
            "description": description
            or f"{data.method} directions for {data.target} ({data.fr_name} v{data.fr_version})",
            "set_id": data.set_id,
            "target": data.target,
            "data_manifest_sha256": data.data_manifest_sha256,
            "seed": int(data.seed),
            "n_items": int(data.n_items),
            "params": {str(k): str(v) for k, v in data.params.items()},
            "metrics": {str(k): float(v) for k, v in data.metrics.items()},
            "directions": [
                {"name": n, "eigenvalue": float(e), "explained_variance": float(x), "stddev": float(s)}
                for n, e, x, s in zip(data.names, data.eigenvalues, data.explained_variance, data.stddev, strict=True)
            ],
            "vectors": VECTORS_FILE,
            "created_at": data.created_at,
        }
    )
    if data.centroids is not None:
        np.save(out / CENTROIDS_FILE, np.ascontiguousarray(data.centroids, dtype=np.float32))
        meta["centroids"] = {
            "file": CENTROIDS_FILE,
            "normalized": bool(data.centroids_normalized),
            "groups": [
                {"name": n, "value": float(v), "count": int(c)}
                for n, v, c in zip(data.centroid_names, data.centroid_values, data.centroid_counts, strict=True)
            ],
        }
    write_metadata(out, meta)
    return meta


def save_equivariance_set(out_dir: Path | str, data: EquivarianceSetData, *, name: str, description: str = "") -> dict:
    """Write equivariance maps as a bundle named ``name``; return the metadata."""
    data.check()
    out = _prepare(out_dir)
    arrays: dict[str, np.ndarray] = {}
    for i, m in enumerate(data.maps):
        arrays[f"forward_{i}"] = np.asarray(m.forward, dtype=np.float32)
        arrays[f"forward_bias_{i}"] = np.asarray(m.forward_bias, dtype=np.float32)
        arrays[f"inverse_{i}"] = np.asarray(m.inverse, dtype=np.float32)
        arrays[f"inverse_bias_{i}"] = np.asarray(m.inverse_bias, dtype=np.float32)
    np.savez(out / MAPS_FILE, **arrays)  # type: ignore[arg-type]
    meta = _common_meta(name, data.dim, data.fr_name, data.fr_version, METHOD_EQUIVARIANCE)
    meta.update(
        {
            "description": description or f"geometric equivariance maps ({data.fr_name} v{data.fr_version})",
            "set_id": data.set_id,
            "target": "geometry",
            "data_manifest_sha256": data.data_manifest_sha256,
            "seed": int(data.seed),
            "n_items": int(data.n_items),
            "params": {str(k): str(v) for k, v in data.params.items()},
            "maps": [
                {
                    "transform": m.transform_dict(),
                    "forward_cosine": float(m.forward_cosine),
                    "inverse_cosine": float(m.inverse_cosine),
                    "baseline_cosine": float(m.baseline_cosine),
                }
                for m in data.maps
            ],
            "arrays": MAPS_FILE,
            "created_at": data.created_at,
        }
    )
    write_metadata(out, meta)
    return meta


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path.name}: {exc}") from None


def load_direction_bundle(bundle_dir: Path | str, *, verify: bool = True) -> DirectionSetData | EquivarianceSetData:
    """Read a ``direction_set`` bundle back (checksums first unless ``verify=False``)."""
    root, meta = open_bundle(bundle_dir, KIND_DIRECTION_SET, verify=verify)
    fr = meta["fr_model"]
    method = str(meta.get("method", ""))
    try:
        if method == METHOD_EQUIVARIANCE:
            with np.load(root / str(meta.get("arrays", MAPS_FILE)), allow_pickle=False) as z:
                maps = []
                for i, spec in enumerate(meta["maps"]):
                    t = spec["transform"]
                    maps.append(
                        EquivarianceMapData(
                            kind=str(t["kind"]),
                            angle_degrees=float(t.get("angle_degrees", 0.0)),
                            dx=float(t.get("dx", 0.0)),
                            dy=float(t.get("dy", 0.0)),
                            scale=float(t.get("scale", 0.0)),
                            forward=z[f"forward_{i}"],
                            forward_bias=z[f"forward_bias_{i}"],
                            inverse=z[f"inverse_{i}"],
                            inverse_bias=z[f"inverse_bias_{i}"],
                            forward_cosine=float(spec["forward_cosine"]),
                            inverse_cosine=float(spec["inverse_cosine"]),
                            baseline_cosine=float(spec["baseline_cosine"]),
                        )
                    )
            eq = EquivarianceSetData(
                set_id=str(meta.get("set_id", "")),
                fr_name=str(fr["name"]),
                fr_version=str(fr["version"]),
                maps=maps,
                data_manifest_sha256=str(meta.get("data_manifest_sha256", "")),
                seed=int(meta.get("seed", 0)),
                n_items=int(meta.get("n_items", 0)),
                params={str(k): str(v) for k, v in (meta.get("params") or {}).items()},
                created_at=str(meta.get("created_at", "")),
            )
            eq.check()
            return eq
        dirs = meta["directions"]
        cent = meta.get("centroids") or {}
        groups = cent.get("groups") or []
        data = DirectionSetData(
            set_id=str(meta.get("set_id", "")),
            method=method,
            target=str(meta.get("target", "")),
            fr_name=str(fr["name"]),
            fr_version=str(fr["version"]),
            vectors=_load_npy(root / str(meta.get("vectors", VECTORS_FILE))).astype(np.float32),
            names=[str(d["name"]) for d in dirs],
            eigenvalues=[float(d.get("eigenvalue", 0.0)) for d in dirs],
            explained_variance=[float(d.get("explained_variance", 0.0)) for d in dirs],
            stddev=[float(d.get("stddev", 0.0)) for d in dirs],
            data_manifest_sha256=str(meta.get("data_manifest_sha256", "")),
            seed=int(meta.get("seed", 0)),
            n_items=int(meta.get("n_items", 0)),
            metrics={str(k): float(v) for k, v in (meta.get("metrics") or {}).items()},
            params={str(k): str(v) for k, v in (meta.get("params") or {}).items()},
            centroid_names=[str(g["name"]) for g in groups],
            centroid_values=[float(g["value"]) for g in groups],
            centroid_counts=[int(g["count"]) for g in groups],
            centroids=_load_npy(root / str(cent["file"])).astype(np.float32) if cent else None,
            centroids_normalized=bool(cent.get("normalized", False)),
            created_at=str(meta.get("created_at", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"direction bundle metadata is incomplete: {type(exc).__name__}: {exc}") from None
    if data.vectors.ndim == 2 and data.vectors.shape[1] != int(meta["template_dim"]):
        raise BundleError(f"vectors have dimension {data.vectors.shape[1]}, metadata says {meta['template_dim']}")
    data.check()
    return data


def bundle_tags(meta: dict[str, Any]) -> dict[str, str]:
    """Registry tags beyond the common ones: what the set is, so the UI shows it without a download."""
    tags = {
        "method": str(meta.get("method", "")),
        "target": str(meta.get("target", "")),
        "direction_set_id": str(meta.get("set_id", "")),
        "data_manifest_sha256": str(meta.get("data_manifest_sha256", "")),
        "seed": str(meta.get("seed", 0)),
        "n_items": str(meta.get("n_items", 0)),
    }
    params = meta.get("params") or {}
    if params:
        tags["params"] = json.dumps(params, sort_keys=True)[:4000]
    return tags


# -- the kind ------------------------------------------------------------------------------------------


def save_direction_bundle(
    out_dir: Path | str, data: DirectionSetData | EquivarianceSetData, *, name: str, description: str = ""
) -> dict:
    """Either form of set as a bundle (the kind's one ``save``)."""
    if isinstance(data, EquivarianceSetData):
        return save_equivariance_set(out_dir, data, name=name, description=description)
    return save_direction_set(out_dir, data, name=name, description=description)


def _load(
    path: Path, device: str, *, name: str | None = None, version: str | None = None
) -> DirectionSetData | EquivarianceSetData:
    return load_direction_bundle(path)


def _validate(model: DirectionSetData | EquivarianceSetData, path: Path, meta: dict[str, Any]) -> dict[str, str]:
    """Numbers only: loading already checked shapes, finiteness and the dimension against the metadata."""
    return {"method": str(meta.get("method", ""))}


KIND = register(
    ArtifactKind(
        name=KIND_DIRECTION_SET,
        required_metadata=("name", "template_dim", "fr_model"),
        required_tags=("template_dim", "fr_model_name", "fr_model_version", "method"),
        default_model=DEFAULT_DIRECTIONS_NAME,
        save=save_direction_bundle,
        load=_load,
        validate=_validate,
    )
)
