"""Attribute probe bundles (kind ``attribute_probes``): linear probes on frozen face-api features.

The probes themselves (:mod:`facexplain.attributes.accessory`) read pixels, never templates: a bundle
names no FR model but the CelebA labels, the feature blocks and the probe arrays, and copies the
face-api weights the features come from byte for byte, so a registered version keeps reading the same
features even if the installed face-api files change. Its golden check is a fixed synthetic input
(:func:`golden_batch`) and the probabilities recorded for it when the bundle was written.

torch and the probe code are imported inside the functions: the registry reads :data:`KIND` for its
conventions, and ``facexplain registry list`` should not pay for torch.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import facexplain
from facexplain.artifacts.bundle import (
    BUNDLE_FORMAT,
    BundleError,
    copy_faceapi,
    open_bundle,
    write_metadata,
)
from facexplain.artifacts.kind import ArtifactKind, register
from facexplain.paths import faceapi_model_dir, var_dir

if TYPE_CHECKING:
    import numpy as np
    import torch

    from facexplain.attributes.accessory import AccessoryEstimator, LinearProbeSet
    from facexplain.attributes.catalog import FaceBatch

KIND_ATTRIBUTE_PROBES = "attribute_probes"
DEFAULT_PROBES_MODEL = "facexplain-probes-faceapi"
GOLDEN_MAX_ABS = 1e-3  # largest golden-probability drift accepted at load, whatever a bundle says


def golden_batch() -> FaceBatch:
    """A fixed synthetic input for the bundle's golden check: two smooth seeded images and mean-face landmarks.

    No face data is needed (or stored): the check is that a loaded bundle gives, on a fixed input, the
    probabilities recorded when it was written (catching changed weights, NaNs and batch-size traps).
    """
    import torch
    import torch.nn.functional as F

    from facexplain.attributes.catalog import FaceBatch
    from facexplain.faces.align import _FIRST_TEMPLATE_POINT, _MEAN_FACE_X, _MEAN_FACE_Y

    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(2, 3, 6, 6, generator=gen)
    images = F.interpolate(coarse, size=(112, 112), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    inner = torch.tensor(list(zip(_MEAN_FACE_X, _MEAN_FACE_Y, strict=True)), dtype=torch.float32)
    t = torch.linspace(0.0, math.pi, _FIRST_TEMPLATE_POINT)  # jaw: a half ellipse under the brows
    jaw = torch.stack([0.5 - 0.5 * torch.cos(t), 0.2 + 0.8 * torch.sin(t)], dim=1)
    unit = torch.cat([jaw, inner])  # (68, 2) in face-square units
    pts = (0.25 + unit) / 1.5 * 112
    return FaceBatch(images, torch.stack([pts, pts + 2.0]))


def save_probe_bundle(
    out_dir: Path | str,
    probes: LinearProbeSet,
    *,
    name: str = DEFAULT_PROBES_MODEL,
    faceapi_dir: Path | None = None,
    training: dict[str, Any] | None = None,
    description: str = "",
) -> dict[str, Any]:
    """Write a self-contained ``attribute_probes`` bundle and return its metadata.

    The face-api weights the features come from are copied byte for byte, so a registered version
    keeps reading the same features even if the installed face-api files change."""
    from facexplain.attributes.accessory import (
        FACEAPI_MANIFESTS,
        PROBES_ARCH,
        PROBES_ARRAYS,
        PROBES_JSON,
        AccessoryEstimator,
        FeatureExtractor,
        attribute_name,
    )

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty")
    (out / "weights").mkdir(parents=True, exist_ok=True)
    src = Path(faceapi_dir) if faceapi_dir else faceapi_model_dir()
    components: dict[str, dict[str, Any]] = {}
    for net in dict.fromkeys(b.split(":")[0] for b in probes.blocks):
        copy_faceapi(src, FACEAPI_MANIFESTS[net], out / "weights")
        components[net] = {"arch": f"faceapi_{net}_features", "format": "faceapi", "manifest": FACEAPI_MANIFESTS[net]}
    probes.save(out / "probes")
    meta: dict[str, Any] = {
        "format_version": BUNDLE_FORMAT,
        "kind": KIND_ATTRIBUTE_PROBES,
        "name": name,
        "architecture": PROBES_ARCH,
        "description": description
        or "logistic-regression probes for CelebA attributes on frozen face-api features (not the FR model)",
        "labels": list(probes.labels),
        "attributes": [attribute_name(label) for label in probes.labels],
        "features": {"blocks": list(probes.blocks), "dim": probes.dim},
        "input": {
            "normalisation": "aligned faces (N, 3, S, S), [0, 1] or [0, 255], with their 68 landmarks in pixels",
        },
        "probes": {"arrays": f"probes/{PROBES_ARRAYS}", "spec": f"probes/{PROBES_JSON}"},
        "components": components,
        "training": training or {},
        "source": "@vladmandic/face-api 1.7.15 weights (npm, MIT), PyTorch port; probes trained by facexplain",
        "created_by": f"facexplain {facexplain.__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    est = AccessoryEstimator(probes, FeatureExtractor(probes.blocks, model_dir=out / "weights"))
    meta["golden"] = {"probabilities": _golden_probabilities(est).tolist(), "max_abs": GOLDEN_MAX_ABS}
    write_metadata(out, meta)
    return meta


def _golden_probabilities(est: AccessoryEstimator) -> np.ndarray:
    """The estimator's probabilities on :func:`golden_batch` (recorded at save, compared at load)."""
    faces = golden_batch()
    return est.probes.probabilities(est.extractor(faces.images, faces.landmarks))


def load_probe_bundle(
    bundle_dir: Path | str, device: str | torch.device = "cpu", *, verify: bool = True, validate: bool = True
) -> AccessoryEstimator:
    """An ``attribute_probes`` bundle -> its :class:`AccessoryEstimator`; checksums, then the golden check."""
    import numpy as np

    from facexplain.attributes.accessory import AccessoryEstimator, FeatureExtractor, LinearProbeSet

    root, meta = open_bundle(bundle_dir, KIND_ATTRIBUTE_PROBES, verify=verify)
    try:
        probes = LinearProbeSet.load(root / Path(meta["probes"]["arrays"]).parent)
        extractor = FeatureExtractor(probes.blocks, device=device, model_dir=root / "weights")
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"probe bundle {root}: {exc}") from None
    est = AccessoryEstimator(probes, extractor, model_key=str(meta["name"]))
    if validate:
        expected = np.asarray(meta["golden"]["probabilities"], dtype=np.float64)
        got = _golden_probabilities(est)
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        # The tolerance is ours: a bundle may ask for a tighter one, never a looser one.
        tolerance = min(GOLDEN_MAX_ABS, float(meta["golden"].get("max_abs", GOLDEN_MAX_ABS)))
        if not np.isfinite(got).all() or not diff <= tolerance:
            raise BundleError(
                f"validation: golden probabilities differ from those recorded at registration (max abs {diff:.3g})"
            )
    return est


def default_estimator(bundle_dir: Path | str | None = None, device: str | torch.device = "cpu") -> AccessoryEstimator:
    """The estimator of a probe bundle: ``bundle_dir``, else ``$FACEXPLAIN_PROBES_BUNDLE``, else the
    bundle ``facexplain train probes`` writes by default (``var/train/probes/bundle``)."""
    path = Path(bundle_dir or os.environ.get("FACEXPLAIN_PROBES_BUNDLE") or var_dir() / "train" / "probes" / "bundle")
    if not (path / "bundle.json").is_file():
        raise FileNotFoundError(f"no probe bundle at {path}: run `make train-probes` or set FACEXPLAIN_PROBES_BUNDLE")
    return load_probe_bundle(path, device)


# -- the kind ------------------------------------------------------------------------------------------


def _load(path: Path, device: str, *, name: str | None = None, version: str | None = None) -> AccessoryEstimator:
    """Checksums verified, and the golden probabilities re-computed and compared: a version that fails
    is never served."""
    return load_probe_bundle(path, device)


def _validate(model: AccessoryEstimator, path: Path, meta: dict[str, Any]) -> dict[str, str]:
    """The golden check already ran in the loader; report what the set estimates."""
    return {"attributes": ",".join(s.name for s in model.specs)}


def _describe(meta: dict[str, Any]) -> dict[str, str]:
    return {"labels": ",".join(map(str, meta["labels"]))[:250]} if "labels" in meta else {}


KIND = register(
    ArtifactKind(
        name=KIND_ATTRIBUTE_PROBES,
        # Probes read pixels, never templates: no FR model, but the labels and the features they read.
        required_metadata=("name", "labels", "features", "probes", "components", "golden"),
        required_tags=("architecture", "labels"),
        default_model=DEFAULT_PROBES_MODEL,
        save=save_probe_bundle,
        load=_load,
        validate=_validate,
        describe=_describe,
    )
)
