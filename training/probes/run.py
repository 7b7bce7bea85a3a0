"""One probe training run end to end: faces -> identity-disjoint split -> frozen face-api features of clean
and degraded chips -> one logistic probe per label (L2 chosen on validation identities) -> held-out
figures per label, clean and degraded -> MLflow run -> ``attribute_probes`` bundle -> registered version.

Tracked in the MLflow experiment ``facexplain-probes`` when a tracking URI is given; without one the run
fits and writes its files only (``OUT/bundle``, ``OUT/summary.json``). The face set is the one every
pipeline shares (default FR pipeline, cached under ``var/cache/facesets``): probes read pixels and
landmarks, so which FR model aligned the chips only fixes the frame, the dlib chip every estimator reads.
The landmarks are the landmark net's on the chip itself, as the attribute catalogue finds them on any
face it measures (original or decoded), not the ones the FR pipeline aligned the chip with.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facexplain.artifacts.probes import KIND_ATTRIBUTE_PROBES, load_probe_bundle, save_probe_bundle
from facexplain.attributes.accessory import (
    FeatureExtractor,
    LinearProbeSet,
    attribute_name,
    degrade_faces,
    evaluate_probes,
    fit_probe_set,
    random_sigmas,
)
from facexplain.attributes.pose import image_landmarks
from facexplain.attributes.probe import identity_split
from facexplain.data.faces import FaceRecord
from facexplain.data.faceset import FaceSet, build_faceset, drop_sealed, records_from_spec
from facexplain.models.landmarks import FaceLandmark68Net
from facexplain.pipeline import DEFAULT_FR_KEY, FacePipeline
from training.common import (
    FACESET_CACHE,
    NullRun,
    TrackedRun,
    finite_rounded,
    open_registry,
    register_from_run,
    replace_dir,
    runtime_params,
    setup_run,
    write_summary,
)
from training.probes.config import TrainProbesConfig

EXPERIMENT = "facexplain-probes"
# Issue 6's bar on held-out identities (clean chips): the run records whether it is met.
GATES = {"Eyeglasses": 0.85, "Smiling": 0.85}


@dataclass
class ProbesRunSummary:
    run_id: str  # "" when the run was not tracked
    data_manifest_sha256: str
    faces: dict[str, int]
    labels: list[str]
    blocks: list[str]
    metrics: dict[str, float]  # test_<attr>_{auc,balanced_accuracy}, test_degraded_<attr>_..., val_..., C_...
    gates: dict[str, bool]
    seconds: dict[str, float]
    device: str
    registered: dict[str, str] = field(default_factory=dict)


def select_records(records: Sequence[FaceRecord], labels: Sequence[str], max_images: int) -> list[FaceRecord]:
    """A deterministic sample of ``max_images`` records that keeps rare labels learnable.

    Up to ``max_images / (2 * len(labels))`` positives of each label first, then the others, all in
    the order of a hash of the file name (no preference for any identity or file order).
    """
    if max_images <= 0 or max_images >= len(records):
        return list(records)
    ordered = sorted(records, key=lambda r: hashlib.sha256(r.path.name.encode()).hexdigest())
    per_label = max(1, max_images // (2 * len(labels)))
    chosen: dict[str, FaceRecord] = {}
    for label in labels:
        pos = [r for r in ordered if r.labels.get(label) == 1 and r.path.name not in chosen]
        for r in pos[:per_label]:
            chosen[r.path.name] = r
    for r in ordered:
        if len(chosen) >= max_images:
            break
        chosen.setdefault(r.path.name, r)
    return sorted(chosen.values(), key=lambda r: r.path.as_posix())


def load_faces(cfg: TrainProbesConfig, cache_dir: Path, progress: bool) -> FaceSet:
    """The face set of ``cfg.data`` (or its stratified sample), built once with the default pipeline and cached."""
    if cfg.faceset:
        faces = FaceSet.load(Path(cfg.faceset))
        absent = [label for label in cfg.label_list if label not in faces.label_names]
        if absent:
            raise ValueError(f"face set {cfg.faceset} has no label(s) {', '.join(absent)}")
        if cfg.max_images:
            raise ValueError("max_images samples records before the face set is built; it cannot apply to --faceset")
        return faces
    root, records, names = records_from_spec(cfg.data)
    missing = [label for label in cfg.label_list if label not in names]
    if missing:
        raise ValueError(f"{cfg.data} has no label(s) {', '.join(missing)}; it has: {', '.join(names) or 'none'}")
    picked = select_records(records, cfg.label_list, cfg.max_images)
    return build_faceset(
        root,
        picked,
        FacePipeline.default(),
        fr_key=DEFAULT_FR_KEY,
        label_names=names,
        cache_dir=cache_dir,
        progress=progress,
    )


def mirror(chips: torch.Tensor, landmarks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right mirrored chips and landmarks. Points keep their index: the crops only read boxes of
    point sets that are symmetric as sets (all 68, brows+eyes+nose), so no relabelling is needed."""
    side = chips.shape[-1]
    lm = landmarks.clone()
    lm[..., 0] = side - 1 - lm[..., 0]
    return chips.flip(-1), lm


@dataclass
class _Data:
    """The labelled faces and their identity-disjoint split (probes are judged on identities they never saw)."""

    faces: FaceSet
    y: np.ndarray  # (faces, labels) 0/1
    ids: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray
    sizes: dict[str, int]


@dataclass
class _Features:
    """Frozen features: the rows the probes fit on, and the clean and degraded test rows they are judged on."""

    dim: int
    clean: np.ndarray
    x_rows: list[np.ndarray]
    y_rows: list[np.ndarray]
    id_rows: list[np.ndarray]
    degraded_test: np.ndarray | None
    seconds: float


def train_probes(
    cfg: TrainProbesConfig,
    *,
    out_dir: Path,
    tracking_uri: str | None = None,
    register: bool = True,
    progress: bool = True,
    faces: FaceSet | None = None,
    faceset_cache: Path = FACESET_CACHE,
) -> ProbesRunSummary:
    """Run the whole pipeline (see module docstring). ``faces`` replaces loading ``cfg.data`` (tests)."""
    t_start = time.perf_counter()
    device = setup_run(cfg.device, cfg.threads, out_dir)
    labels = list(cfg.label_list)
    blocks = list(cfg.block_list)
    data = _prepare_data(cfg, faces if faces is not None else load_faces(cfg, faceset_cache, progress), labels)
    feats = _features(cfg, data, blocks, device)
    t0 = time.perf_counter()
    probes = fit_probe_set(  # the L2 strength of each label is chosen on validation identities
        np.concatenate(feats.x_rows),
        np.concatenate(feats.y_rows),
        np.concatenate(feats.id_rows).tolist(),
        labels,
        blocks,
        c_grid=cfg.c_grid_values,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
    )
    fit_seconds = time.perf_counter() - t0
    metrics, gates = _evaluate(probes, data, feats, labels)
    mlrun = _track(cfg, data, feats, probes, metrics, gates, device, tracking_uri)
    seconds = {
        "features": round(feats.seconds, 2),
        "fit": round(fit_seconds, 2),
        "total": round(time.perf_counter() - t_start, 2),
    }
    summary = ProbesRunSummary(
        run_id=mlrun.run_id,
        data_manifest_sha256=probes.report["data_manifest_sha256"],
        faces=data.sizes,
        labels=labels,
        blocks=blocks,
        metrics=metrics,
        gates=gates,
        seconds=seconds,
        device=str(device),
    )
    # the bundle always, registration when tracked
    bundle = replace_dir(out_dir / "bundle")
    save_probe_bundle(bundle, probes, name=cfg.register_as, training=_training_meta(mlrun.run_id, cfg, summary))
    if tracking_uri and register:
        summary.registered = _register(cfg, bundle, tracking_uri, mlrun.run_id, metrics, gates)
    write_summary(mlrun, out_dir, summary)
    return summary


def _prepare_data(cfg: TrainProbesConfig, faces: FaceSet, labels: list[str]) -> _Data:
    """The label matrix and the identity-disjoint train / test split, refused early when a label is absent."""
    sealed_dropped = 0
    if cfg.exclude_sealed:  # the shipped models' sealed identities go before the split
        faces, sealed_dropped = drop_sealed(faces)
    if faces.labels is None:
        raise ValueError("the face set has no labels (a CelebA-style labels.csv is needed)")
    missing = [label for label in labels if label not in faces.label_names]
    if missing:
        raise ValueError(f"the face set has no label(s) {', '.join(missing)}; it has: {', '.join(faces.label_names)}")
    y = faces.labels[:, [faces.label_names.index(label) for label in labels]].numpy().astype(np.float64)
    train_idx, test_idx = identity_split(faces.identities, cfg.test_fraction, cfg.split_seed)
    if len(train_idx) == 0:
        raise ValueError("no training identities: lower test_fraction or add data")
    ids = np.array(faces.identities)
    sizes = {
        "faces": len(faces),
        "train": len(train_idx),
        "test": len(test_idx),
        "identities_train": len(set(ids[train_idx].tolist())),
        "identities_test": len(set(ids[test_idx].tolist())),
        "failed": len(faces.failed),
    }
    if cfg.exclude_sealed:
        sizes["sealed_identities_dropped"] = sealed_dropped
    return _Data(faces, y, ids, train_idx, test_idx, sizes)


def _features(cfg: TrainProbesConfig, data: _Data, blocks: list[str], device: torch.device) -> _Features:
    """Frozen face-api features of the clean chips, of degraded copies (the test copy at the fixed
    evaluation blur, so probes are judged on what decoded faces look like) and of mirrored chips."""
    t0 = time.perf_counter()
    extractor = FeatureExtractor(blocks, device=device)
    chips = data.faces.chips
    lms = image_landmarks(FaceLandmark68Net.from_faceapi().to(device), chips, batch_size=cfg.batch_size)
    y, ids, train_idx, test_idx = data.y, data.ids, data.train_idx, data.test_idx

    def feats(images: torch.Tensor, landmarks: torch.Tensor) -> np.ndarray:
        return extractor(images, landmarks, batch_size=cfg.batch_size)

    clean = feats(chips, lms)
    x_rows, y_rows, id_rows = [clean[train_idx]], [y[train_idx]], [ids[train_idx]]
    degraded_test = None
    for k in range(max(cfg.degraded_copies, 1)):
        sigma = random_sigmas(len(data.faces), cfg.seed + k, cfg.blur_sigma_max)
        sigma[torch.as_tensor(test_idx, dtype=torch.long)] = cfg.eval_sigma
        take = train_idx if k < cfg.degraded_copies else np.zeros(0, dtype=np.int64)
        sel = np.concatenate([take, test_idx]) if k == 0 else take
        if len(sel) == 0:
            continue
        d_img, d_lm = degrade_faces(
            chips[sel], lms[sel], sigma[torch.as_tensor(sel, dtype=torch.long)], cfg.degrade_size
        )
        f = feats(d_img, d_lm)
        x_rows.append(f[: len(take)])
        y_rows.append(y[take])
        id_rows.append(ids[take])
        if k == 0:
            degraded_test = f[len(take) :]
    if cfg.flip:
        m_img, m_lm = mirror(chips[train_idx], lms[train_idx])
        x_rows.append(feats(m_img, m_lm))
        y_rows.append(y[train_idx])
        id_rows.append(ids[train_idx])
    return _Features(extractor.dim, clean, x_rows, y_rows, id_rows, degraded_test, time.perf_counter() - t0)


def _evaluate(
    probes: LinearProbeSet, data: _Data, feats: _Features, labels: list[str]
) -> tuple[dict[str, float], dict[str, bool]]:
    """Held-out identities, clean and degraded, per label; the gates; the report the bundle carries."""
    metrics: dict[str, float] = {}
    evaluations: dict[str, dict[str, dict[str, float]]] = {}
    y, test_idx = data.y, data.test_idx
    if len(test_idx):
        evaluations["clean"] = evaluate_probes(probes, feats.clean[test_idx], y[test_idx])
        assert feats.degraded_test is not None
        evaluations["degraded"] = evaluate_probes(probes, feats.degraded_test, y[test_idx])
    for label in labels:
        attr = attribute_name(label)
        info = probes.report["labels"][label]
        metrics[f"C_{attr}"] = float(info["C"])
        metrics[f"val_{attr}_balanced_accuracy"] = float(info["val_balanced_accuracy"])
        for variant, prefix in (("clean", "test_"), ("degraded", "test_degraded_")):
            for key in ("balanced_accuracy", "auc"):
                metrics[f"{prefix}{attr}_{key}"] = float(evaluations.get(variant, {}).get(label, {}).get(key, math.nan))
    gates = {
        label: bool(metrics.get(f"test_{attribute_name(label)}_balanced_accuracy", math.nan) >= bound)
        for label, bound in GATES.items()
        if label in labels
    }
    probes.report["test"] = evaluations
    probes.report["faces"] = data.sizes
    probes.report["data_manifest_sha256"] = str(data.faces.meta.get("manifest_sha256", ""))
    return metrics, gates


def _track(
    cfg: TrainProbesConfig,
    data: _Data,
    feats: _Features,
    probes: LinearProbeSet,
    metrics: dict[str, float],
    gates: dict[str, bool],
    device: torch.device,
    tracking_uri: str | None,
) -> NullRun:
    """The MLflow run, written once the probes are fitted and measured (a no-op without a URI)."""
    mlrun: NullRun
    if tracking_uri:
        mlrun = TrackedRun(
            tracking_uri, EXPERIMENT, None, run_name="probes-faceapi", tags={"facexplain.kind": KIND_ATTRIBUTE_PROBES}
        )
    else:
        mlrun = NullRun()
    mlrun.params(
        {
            **cfg.to_params(),
            "data_manifest_sha256": probes.report["data_manifest_sha256"],
            **{f"faces_{k}": v for k, v in data.sizes.items()},
            "feature_dim": feats.dim,
            **runtime_params(device),
        }
    )
    mlrun.metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=0)
    mlrun.dict(probes.report, "probes/report.json")
    mlrun.tag("gates_passed", str(bool(gates) and all(gates.values())).lower())
    return mlrun


def _training_meta(run_id: str, cfg: TrainProbesConfig, summary: ProbesRunSummary) -> dict[str, Any]:
    return {
        "mlflow_run_id": run_id,
        "data_manifest_sha256": summary.data_manifest_sha256,
        "split_seed": cfg.split_seed,
        "seed": cfg.seed,
        "faces": summary.faces,
        "metrics": finite_rounded(summary.metrics),
    }


def _register(
    cfg: TrainProbesConfig, bundle: Path, uri: str, run_id: str, metrics: dict[str, float], gates: dict[str, bool]
) -> dict[str, str]:
    """Register the bundle from the training run itself, so the version links to its figures."""
    tags = {k: f"{v:.4f}" for k, v in metrics.items() if k.startswith("test_") and "balanced" in k and math.isfinite(v)}
    tags["gates_passed"] = str(bool(gates) and all(gates.values())).lower()
    if tags["gates_passed"] == "false":
        tags["gates_failed"] = ",".join(k for k, ok in gates.items() if not ok) or "no gates evaluated"
    return register_from_run(open_registry(uri), bundle, cfg.register_as, cfg.alias, tags, run_id)


def load_registered(uri: str, name: str, ref: str, cache_dir: Path, device: str = "cpu") -> Any:
    """A registered probe version (``ref`` = alias or version number) as an ``AccessoryEstimator``."""
    registry = open_registry(uri)
    info = registry.get_version(name, ref) if ref.isdigit() else registry.resolve(name, ref)
    return load_probe_bundle(registry.download(info, cache_dir), device)
