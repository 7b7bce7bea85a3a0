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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import facexplain
from facexplain.artifacts.embedder import KIND_EMBEDDER
from facexplain.data.faceset import FaceSet, build_faceset, records_from_spec
from facexplain.faces.occlusion import FaceMesh
from facexplain.metrics.interpretability import PeakLocationReport
from facexplain.models.sadfad import ARCHITECTURE, SADFADConfig, SADFADNet
from facexplain.paths import REPO_ROOT, var_dir
from training.common import NullRun, TrackedRun, default_alias, resolve_device
from training.decoder.run import FACESET_CACHE
from training.decoder.trainer import EpochLog
from training.sadfad.config import TrainSADFADConfig
from training.sadfad.data import OcclusionSpec, SADFADSplit, split_faceset, template_mesh
from training.sadfad.trainer import evaluate, fit

EXPERIMENT = "facexplain-sadfad"
MODEL_FILE = "model.pt"
MODEL_FORMAT = 1


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
    from facexplain.pipeline import DEFAULT_FR_KEY, FacePipeline

    return build_faceset(
        root, records, FacePipeline.default(), fr_key=DEFAULT_FR_KEY, cache_dir=cache_dir, progress=progress
    )


def save_trained_model(
    path: Path,
    model: SADFADNet,
    mesh: FaceMesh,
    *,
    variant: str,
    seed: int,
    run_id: str,
    threshold: float,
    metrics: dict[str, float],
) -> None:
    """Write what a bundle needs to serve the net: config, embedder weights, template, threshold."""
    torch.save(
        {
            "format": MODEL_FORMAT,
            "architecture": ARCHITECTURE,
            "config": model.config.replace(n_classes=0).to_dict(),
            "state": model.embedder_state_dict(),
            "template": mesh.points[: len(mesh.landmark_index)].clone(),
            "verification": {
                "metric": "cosine",
                "threshold": threshold,
                "accept_below": False,
                "source": "validation identities: cosine threshold at FAR 1%",
            },
            "variant": variant,
            "seed": seed,
            "mlflow_run_id": run_id,
            "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
            "facexplain_version": facexplain.__version__,
        },
        path,
    )


def load_trained_model(path: Path, device: str | torch.device = "cpu") -> tuple[SADFADNet, dict[str, Any]]:
    """The net saved by ``save_trained_model`` (eval mode, no head) and the file's other entries."""
    data = torch.load(path, map_location=device, weights_only=False)
    if data.get("format") != MODEL_FORMAT or data.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{path}: not a SAD/FAD model file of format {MODEL_FORMAT}")
    net = SADFADNet(SADFADConfig.from_dict(data["config"]))
    net.load_state_dict(data["state"], strict=True)
    return net.to(device).eval(), data


def peak_location_figure(report: PeakLocationReport, mesh: FaceMesh, min_side: int = 384) -> np.ndarray:
    """(H, W, 3) uint8 figure: the template mesh with each filter's mean positive (left) and negative
    (right) peak location, a circle of radius std around it; one colour per filter. No face pixels."""
    from PIL import Image, ImageDraw

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
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. data: faces, identity-disjoint split, the frontal template of the training faces
    faces = faces if faces is not None else load_faces(cfg, faceset_cache, progress)
    model_cfg = cfg.model_config(n_classes=0)
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
    mesh = template_mesh(splits["train"], model_cfg)
    occlusion = OcclusionSpec(cfg.occluder_width, cfg.occluder_height, cfg.occluder_jitter)
    manifest = str(faces.meta.get("manifest_sha256", ""))

    # 2. model
    torch.manual_seed(cfg.seed)
    model = SADFADNet(cfg.model_config(n_classes=len(classes)))

    # 3. tracking (continued on resume)
    run_state: dict[str, Any] = {}
    ck = out_dir / "last.pt"
    if resume and ck.is_file():
        run_state = torch.load(ck, map_location="cpu", weights_only=False).get("run_state", {})
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
            "data_manifest_sha256": manifest,
            "data_root": str(faces.meta.get("root", "")),
            **{f"faces_{k}": v for k, v in sizes.items()},
            "classes": len(classes),
            "fad_keep_resolved": cfg.loss_weights().keep_for(cfg.n_filters),
            "lmf_keep_per_map": model_cfg.lmf_keep,
            "model_parameters": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head.")),
            "device_resolved": str(device),
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "facexplain_version": facexplain.__version__,
        }
    )
    mlrun.tag("data_manifest_sha256", manifest)
    mlrun.dict({"failed": faces.failed, "faces": sizes}, "data/faces.json")

    def on_epoch(log: EpochLog) -> None:
        values = {f"train_{k}": v for k, v in log.train.items()}
        values.update({f"val_{k}": v for k, v in log.val.items()})
        values["train_images_per_s"] = log.train_images_per_s
        values["epoch_seconds"] = log.seconds
        mlrun.metrics(values, step=log.epoch)

    # 4. train
    t0 = time.perf_counter()
    try:
        result = fit(
            model,
            splits,
            variant=cfg.variant,
            weights=cfg.loss_weights(),
            mesh=mesh,
            occlusion=occlusion,
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
    train_seconds = time.perf_counter() - t0

    # 5. evaluation of the best weights on the whole validation and test identities
    metrics: dict[str, float] = {"best_epoch": float(result.best_epoch), "train_seconds": train_seconds}
    metrics["train_images_per_s_overall"] = result.train_images_per_s
    peaks: PeakLocationReport | None = None
    diff = torch.zeros(0)
    for name in ("val", "test"):
        if not len(splits[name]):
            continue
        m, report, d = evaluate(model, splits[name], mesh, occlusion, device, with_peaks=True)
        metrics.update({f"{name}_{k}": v for k, v in m.items()})
        if report is not None and (peaks is None or name == "test"):
            peaks, diff = report, d
    mlrun.metrics(metrics, step=len(result.history))
    if peaks is not None:
        fig = peak_location_figure(peaks, mesh)
        from facexplain.viz import save_png

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

    threshold = metrics.get("val_clean_threshold_far1", metrics.get("test_clean_threshold_far1", float("nan")))
    model_file = out_dir / MODEL_FILE
    save_trained_model(
        model_file,
        model,
        mesh,
        variant=cfg.variant,
        seed=cfg.seed,
        run_id=mlrun.run_id,
        threshold=threshold,
        metrics=metrics,
    )
    summary = SADFADRunSummary(
        run_id=mlrun.run_id,
        variant=cfg.variant,
        seed=cfg.seed,
        data_manifest_sha256=manifest,
        faces=sizes,
        classes=len(classes),
        metrics=metrics,
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        steps=result.steps,
        stopped=result.stopped,
        train_images_per_s=result.train_images_per_s,
        train_seconds=train_seconds,
        device=str(device),
        model=model.config.to_dict(),
        model_file=str(model_file),
        history=[{"epoch": h.epoch, "train": h.train, "val": h.val} for h in result.history],
    )
    if tracking_uri and register:
        summary.registered = _register(cfg, model_file, out_dir / "bundle", tracking_uri, mlrun.run_id, metrics)
    (out_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=1, allow_nan=True) + "\n")
    mlrun.artifact(out_dir / "summary.json")
    mlrun.end()
    return summary


def _register(
    cfg: TrainSADFADConfig, model_file: Path, bundle: Path, uri: str, run_id: str, metrics: dict[str, float]
) -> dict[str, str]:
    """Bundle the trained net and register it from its own run (the version links back to the run)."""
    import shutil

    from registry import Registry
    from training.sadfad.export import export_bundle

    if bundle.exists():
        shutil.rmtree(bundle)
    export_bundle(model_file, bundle, name=cfg.register_as)
    registry = Registry(uri, timeout_s=30.0, max_retries=2)
    alias = default_alias(registry, cfg.register_as, cfg.alias)
    tags = {k: f"{v:.4f}" for k, v in metrics.items() if k.startswith(("val_", "test_")) and math.isfinite(v)}
    tags["variant"] = cfg.variant
    info = registry.register_bundle(bundle, cfg.register_as, alias=alias or None, extra_tags=tags, run_id=run_id)
    return {"name": info.name, "version": info.version, "alias": alias}
