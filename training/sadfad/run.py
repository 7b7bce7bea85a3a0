"""One SAD/FAD training run end to end: faces -> identity-disjoint split -> train one variant ->
evaluate on unseen identities -> MLflow run (params, curves, figures) -> trained model file.

Tracked in the MLflow experiment ``facexplain-sadfad`` when a tracking URI is given (any MLflow
URI: a server, ``sqlite:///...``, a local folder); without one the run trains and writes its files
only. Everything measured is in ``summary.json`` too: per-epoch losses, validation and test
verification (AUC, TAR at FAR 1% / 0.1%, clean and occluded), the peak-location statistics
(``facexplain.metrics.interpretability``) and the per-filter feature difference under occlusion.
Figures hold statistics (peak locations on the template mesh), never faces.

The trained weights are written to ``OUT/model.pt`` (``save_trained_model``): architecture config,
the embedder's weights (no identity head), the frontal template the occlusions and the peak maps
use, the calibrated verification threshold, the seed and the run id. Registering that as a served
embedder bundle needs a change in ``facexplain/artifacts/bundle.py`` (see ``training/sadfad/__init__.py``).
"""

from __future__ import annotations

import colorsys
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from facexplain.artifacts.embedder import KIND_EMBEDDER
from facexplain.data.faceset import FaceSet, build_faceset, drop_sealed, records_from_spec
from facexplain.faces.occlusion import FaceMesh
from facexplain.metrics.interpretability import PeakLocationReport
from facexplain.models.sadfad import SADFADConfig, SADFADNet
from facexplain.paths import REPO_ROOT, var_dir
from facexplain.pipeline import DEFAULT_FR_KEY, FacePipeline
from facexplain.viz import save_png
from training.common import (
    FACESET_CACHE,
    EpochLog,
    NullRun,
    TrackedRun,
    epoch_metrics,
    open_registry,
    register_from_run,
    replace_dir,
    runtime_params,
    saved_run_state,
    setup_run,
    write_summary,
)
from training.sadfad.config import TrainSADFADConfig
from training.sadfad.data import OcclusionSpec, SADFADSplit, split_faceset, template_mesh
from training.sadfad.export import export_bundle
from training.sadfad.model_file import MODEL_FILE, MODEL_FORMAT, load_trained_model, save_trained_model
from training.sadfad.trainer import FitResult, evaluate, fit

EXPERIMENT = "facexplain-sadfad"
__all__ = [  # the model file's names stay importable from here, where the run writes the file
    "EXPERIMENT",
    "MODEL_FILE",
    "MODEL_FORMAT",
    "SADFADRunSummary",
    "load_faces",
    "load_trained_model",
    "peak_location_figure",
    "save_trained_model",
    "train_sadfad",
]


@dataclass
class SADFADRunSummary:
    run_id: str  # "" when the run was not tracked
    variant: str
    seed: int
    data_manifest_sha256: str
    faces: dict[str, int]
    classes: int
    metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    steps: int
    stopped: str
    train_images_per_s: float
    train_seconds: float
    device: str
    model: dict[str, Any]
    model_file: str
    history: list[dict[str, Any]] = field(default_factory=list)
    registered: dict[str, str] = field(default_factory=dict)


def load_faces(cfg: TrainSADFADConfig, cache_dir: Path, progress: bool) -> FaceSet:
    """The run's faces: a cached face set file, or ``cfg.data`` aligned by the default pipeline (cached).

    A relative ``data`` path that does not exist from the working directory is read from the checkout.
    """
    if cfg.faceset:
        return FaceSet.load(Path(cfg.faceset).expanduser())
    spec = cfg.data
    first = Path(spec.split(",")[0]).expanduser()
    if not first.is_absolute() and not first.exists() and (REPO_ROOT / first).exists():
        spec = ",".join(str(REPO_ROOT / p) if not Path(p).is_absolute() else p for p in spec.split(","))
    root, records, _ = records_from_spec(spec)
    return build_faceset(
        root, records, FacePipeline.default(), fr_key=DEFAULT_FR_KEY, cache_dir=cache_dir, progress=progress
    )


def peak_location_figure(report: PeakLocationReport, mesh: FaceMesh, min_side: int = 384) -> np.ndarray:
    """(H, W, 3) uint8 figure: the template mesh with each filter's mean positive (left) and negative
    (right) peak location, a circle of radius std around it; one colour per filter. No face pixels."""
    scale = max(1, math.ceil(min_side / mesh.size))
    size = mesh.size * scale
    head = 30
    panels = []
    for title, stats in (("positive peaks", report.positive), ("negative peaks", report.negative)):
        img = Image.new("RGB", (size, size + head), "white")
        draw = ImageDraw.Draw(img)
        pts = mesh.points.numpy() * scale + np.array([0.0, head])
        for tri in mesh.triangles.numpy():
            corners = [tuple(pts[i]) for i in (*tri, tri[0])]
            draw.line(corners, fill=(225, 225, 225), width=1)
        for x, y in pts[: len(mesh.landmark_index)]:
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(150, 150, 150))
        n = stats.mean.shape[0]
        for i in range(n):
            if int(stats.count[i]) == 0:
                continue
            r, g, b = colorsys.hsv_to_rgb(i / max(1, n), 0.85, 0.85)
            colour = (int(r * 255), int(g * 255), int(b * 255))
            x, y = float(stats.mean[i, 0]) * scale, float(stats.mean[i, 1]) * scale + head
            rad = float(stats.std[i]) * scale
            draw.ellipse([x - rad, y - rad, x + rad, y + rad], outline=colour, width=1)
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
        summary = stats.summary()
        draw.rectangle([0, 0, size, head - 1], fill="white")
        draw.text((4, 2), f"{title} of {n} filters over {report.faces} faces", fill=(0, 0, 0))
        draw.text(
            (4, 15),
            f"mean std {summary['std_mean']:.1f} px, spread d {summary['location_spread']:.1f} px "
            f"(frame {mesh.size} px)",
            fill=(0, 0, 0),
        )
        panels.append(np.asarray(img))
    gap = np.full((size + head, 6, 3), 255, dtype=np.uint8)
    return np.concatenate([panels[0], gap, panels[1]], axis=1)


def _split_sizes(splits: dict[str, SADFADSplit]) -> dict[str, int]:
    sizes = {k: len(v) for k, v in splits.items()}
    for k, v in splits.items():
        sizes[f"identities_{k}"] = len(set(v.identities))
    return sizes


@dataclass
class _Data:
    """The run's faces, split by identity, and the frontal template its occlusions and peak maps use."""

    faces: FaceSet
    splits: dict[str, SADFADSplit]
    classes: list[str]
    sizes: dict[str, int]
    mesh: FaceMesh
    occlusion: OcclusionSpec
    manifest: str
    model_config: SADFADConfig  # the architecture without a head: the split and the template need its frame


@dataclass
class _Fitted:
    result: FitResult
    train_seconds: float


def train_sadfad(
    cfg: TrainSADFADConfig,
    *,
    out_dir: Path | None = None,
    tracking_uri: str | None = None,
    faces: FaceSet | None = None,
    resume: bool = False,
    progress: bool = True,
    faceset_cache: Path = FACESET_CACHE,
    register: bool = True,
) -> SADFADRunSummary:
    """Run the whole pipeline (see the module docstring); returns what it measured and where the model is.

    ``faces`` replaces loading ``cfg.data`` (tests pass a face set they built once). ``tracking_uri``
    None trains without MLflow. ``out_dir`` defaults to ``var/train/sadfad-<variant>-seed<seed>``.
    With tracking and ``register``, the net is written as an embedder bundle (``OUT/bundle``) and
    registered from this run as ``cfg.register_as`` under ``cfg.alias``, ready to be served.
    """
    if out_dir is None:
        out_dir = var_dir() / "train" / f"sadfad-{cfg.variant}-seed{cfg.seed}"
    device = setup_run(cfg.device, cfg.threads, out_dir)
    data = _prepare_data(cfg, faces if faces is not None else load_faces(cfg, faceset_cache, progress))
    torch.manual_seed(cfg.seed)  # the weights' initialisation, after the (separately seeded) split
    model = SADFADNet(cfg.model_config(n_classes=len(data.classes)))
    run_state = saved_run_state(out_dir, resume)
    mlrun = _start_tracking(cfg, data, model, device, tracking_uri, run_state)
    fitted = _fit(cfg, data, model, device, out_dir, resume, mlrun, run_state, progress)
    metrics = _evaluate(model, data, fitted, device, out_dir, mlrun)
    threshold = metrics.get("val_clean_threshold_far1", metrics.get("test_clean_threshold_far1", float("nan")))
    model_file = out_dir / MODEL_FILE
    save_trained_model(
        model_file,
        model,
        data.mesh,
        variant=cfg.variant,
        seed=cfg.seed,
        run_id=mlrun.run_id,
        threshold=threshold,
        metrics=metrics,
    )
    summary = _summary(cfg, data, model, fitted, metrics, mlrun.run_id, device, model_file)
    if tracking_uri and register:
        summary.registered = _register(cfg, model_file, out_dir / "bundle", tracking_uri, mlrun.run_id, metrics)
    write_summary(mlrun, out_dir, summary)
    return summary


def _prepare_data(cfg: TrainSADFADConfig, faces: FaceSet) -> _Data:
    """Identity-disjoint split (validation and test identities are never trained on) and the template
    of the training faces only, so nothing about the held-out faces leaks into the occluders."""
    model_cfg = cfg.model_config(n_classes=0)
    sealed_dropped = 0
    if cfg.exclude_sealed:  # the shipped models' sealed identities go before the split
        faces, sealed_dropped = drop_sealed(faces)
    splits, classes = split_faceset(
        faces,
        model_cfg,
        test_fraction=cfg.test_fraction,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        min_faces_per_identity=cfg.min_faces_per_identity,
    )
    sizes = _split_sizes(splits)
    sizes["failed"] = len(faces.failed)
    if cfg.exclude_sealed:
        sizes["sealed_identities_dropped"] = sealed_dropped
    return _Data(
        faces=faces,
        splits=splits,
        classes=classes,
        sizes=sizes,
        mesh=template_mesh(splits["train"], model_cfg),
        occlusion=OcclusionSpec(cfg.occluder_width, cfg.occluder_height, cfg.occluder_jitter),
        manifest=str(faces.meta.get("manifest_sha256", "")),
        model_config=model_cfg,
    )


def _start_tracking(
    cfg: TrainSADFADConfig,
    data: _Data,
    model: SADFADNet,
    device: torch.device,
    tracking_uri: str | None,
    run_state: dict[str, Any],
) -> NullRun:
    """The MLflow run (continued on resume, a no-op without a URI) with every setting and the data's hash,
    so a registered version can be traced to exactly what it was trained on."""
    mlrun: NullRun
    if tracking_uri:
        mlrun = TrackedRun(
            tracking_uri,
            EXPERIMENT,
            run_state.get("mlflow_run_id"),
            run_name=f"sadfad-{cfg.variant}-seed{cfg.seed}",
            tags={"facexplain.kind": KIND_EMBEDDER, "facexplain.variant": cfg.variant},
        )
    else:
        mlrun = NullRun()
    run_state["mlflow_run_id"] = mlrun.run_id
    mlrun.params(
        {
            **cfg.to_params(),
            "data_manifest_sha256": data.manifest,
            "data_root": str(data.faces.meta.get("root", "")),
            **{f"faces_{k}": v for k, v in data.sizes.items()},
            "classes": len(data.classes),
            "fad_keep_resolved": cfg.loss_weights().keep_for(cfg.n_filters),
            "lmf_keep_per_map": data.model_config.lmf_keep,
            "model_parameters": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head.")),
            **runtime_params(device),
        }
    )
    mlrun.tag("data_manifest_sha256", data.manifest)
    mlrun.dict({"failed": data.faces.failed, "faces": data.sizes}, "data/faces.json")
    return mlrun


def _fit(
    cfg: TrainSADFADConfig,
    data: _Data,
    model: SADFADNet,
    device: torch.device,
    out_dir: Path,
    resume: bool,
    mlrun: NullRun,
    run_state: dict[str, Any],
    progress: bool,
) -> _Fitted:
    """Train with per-epoch tracking; an interrupted run is marked KILLED and stays resumable."""

    def on_epoch(log: EpochLog) -> None:
        mlrun.metrics(epoch_metrics(log), step=log.epoch)

    t0 = time.perf_counter()
    try:
        result = fit(
            model,
            data.splits,
            variant=cfg.variant,
            weights=cfg.loss_weights(),
            mesh=data.mesh,
            occlusion=data.occlusion,
            optimizer=cfg.optimizer,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            max_minutes=cfg.max_minutes,
            crop_jitter=cfg.crop_jitter,
            eval_faces=cfg.eval_faces,
            seed=cfg.seed,
            device=device,
            checkpoint_dir=out_dir,
            resume=resume,
            on_epoch=on_epoch,
            run_state=run_state,
            progress=progress,
        )
    except BaseException:
        mlrun.end("KILLED")  # resumable: the checkpoint of the last finished epoch is kept
        raise
    return _Fitted(result, time.perf_counter() - t0)


def _evaluate(
    model: SADFADNet, data: _Data, fitted: _Fitted, device: torch.device, out_dir: Path, mlrun: NullRun
) -> dict[str, float]:
    """The best weights on every validation and test identity (per-epoch validation sees a sample),
    with the peak-location figure and per-filter statistics of the test split (validation without one)."""
    result = fitted.result
    metrics: dict[str, float] = {"best_epoch": float(result.best_epoch), "train_seconds": fitted.train_seconds}
    metrics["train_images_per_s_overall"] = result.train_images_per_s
    peaks: PeakLocationReport | None = None
    diff = torch.zeros(0)
    for name in ("val", "test"):
        if not len(data.splits[name]):
            continue
        m, report, d = evaluate(model, data.splits[name], data.mesh, data.occlusion, device, with_peaks=True)
        metrics.update({f"{name}_{k}": v for k, v in m.items()})
        if report is not None and (peaks is None or name == "test"):
            peaks, diff = report, d
    mlrun.metrics(metrics, step=len(result.history))
    if peaks is not None:
        fig = peak_location_figure(peaks, data.mesh)
        save_png(fig, out_dir / "peak_locations.png")
        mlrun.image(fig, "figures/peak_locations.png")
        per_filter = {
            "feature_difference": [round(float(v), 6) for v in diff.tolist()],
            "positive_mean_xy": peaks.positive.mean.tolist(),
            "positive_std": peaks.positive.std.tolist(),
            "negative_mean_xy": peaks.negative.mean.tolist(),
            "negative_std": peaks.negative.std.tolist(),
        }
        (out_dir / "per_filter.json").write_text(json.dumps(per_filter, allow_nan=True) + "\n")
        mlrun.artifact(out_dir / "per_filter.json", "evaluation")
    return metrics


def _summary(
    cfg: TrainSADFADConfig,
    data: _Data,
    model: SADFADNet,
    fitted: _Fitted,
    metrics: dict[str, float],
    run_id: str,
    device: torch.device,
    model_file: Path,
) -> SADFADRunSummary:
    result = fitted.result
    return SADFADRunSummary(
        run_id=run_id,
        variant=cfg.variant,
        seed=cfg.seed,
        data_manifest_sha256=data.manifest,
        faces=data.sizes,
        classes=len(data.classes),
        metrics=metrics,
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        steps=result.steps,
        stopped=result.stopped,
        train_images_per_s=result.train_images_per_s,
        train_seconds=fitted.train_seconds,
        device=str(device),
        model=model.config.to_dict(),
        model_file=str(model_file),
        history=[{"epoch": h.epoch, "train": h.train, "val": h.val} for h in result.history],
    )


def _register(
    cfg: TrainSADFADConfig, model_file: Path, bundle: Path, uri: str, run_id: str, metrics: dict[str, float]
) -> dict[str, str]:
    """Bundle the trained net and register it from its own run (the version links back to the run)."""
    export_bundle(model_file, replace_dir(bundle), name=cfg.register_as)
    tags = {k: f"{v:.4f}" for k, v in metrics.items() if k.startswith(("val_", "test_")) and math.isfinite(v)}
    tags["variant"] = cfg.variant
    return register_from_run(open_registry(uri), bundle, cfg.register_as, cfg.alias, tags, run_id)
