"""One decoder training run end to end: FR model from the registry -> face set -> split -> train ->
evaluate on unseen identities -> MLflow run (params, curves, images) -> bundle -> registered version.

Everything the run did is in MLflow: every setting, the data manifest hash, per-epoch losses and
validation PSNR / SSIM / identity cosine, reconstruction grids, the test-split quality figures with
the mean-face baseline and the quality gates, and the registered version (whose metadata names the
FR model name+version it inverts). ``summary.json`` in the output folder repeats the figures.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

import facexplain
from facexplain.artifacts.bundle import GOLDEN_IMAGE, bundle_digest, load_golden_image, read_metadata
from facexplain.artifacts.decoder import KIND_DECODER, save_decoder_bundle
from facexplain.artifacts.embedder import KIND_EMBEDDER, load_bundle
from facexplain.data.faceset import (
    FaceSet,
    blend_faceset,
    build_faceset,
    cache_key,
    mirror_faceset,
    records_from_spec,
)
from facexplain.losses.dfd import PerceptualFeatures
from facexplain.metrics.image import psnr, ssim
from facexplain.metrics.reconstruction import embed_images, reconstruction_report
from facexplain.models.decoder import DeepFaceDecoder
from facexplain.models.recognition import FaceRecognitionNet
from facexplain.paths import var_dir
from facexplain.viz import pairs_grid, save_png
from registry import CHAMPION, Registry, VersionInfo
from training.common import TrackedRun, barrier, default_alias, init_distributed, resolve_device
from training.decoder.config import TrainDecoderConfig
from training.decoder.data import DecoderSplit, face_sides, split_faceset
from training.decoder.trainer import EpochLog, fit

EXPERIMENT = "facexplain-decoders"
FACESET_CACHE = var_dir() / "cache" / "facesets"
VAL_IDENTITY_FACES = 256  # per-epoch identity check on this many validation faces (full check at the end)

# The quality gates on unseen identities (64 px or more, against the aligned chip): minimums.
QUALITY_GATES: dict[str, float] = {
    "test_psnr": 14.0,
    "test_psnr_over_mean_face": 0.5,
    "test_ssim": 0.42,
    "test_identity_cosine": 0.93,
    "test_accepted": 0.85,
    "test_rank1": 0.60,
}


@dataclass
class RunSummary:
    run_id: str
    fr_model: dict[str, str]
    data_manifest_sha256: str
    faces: dict[str, int]
    metrics: dict[str, float]
    gates: dict[str, bool]
    gates_passed: bool
    best_epoch: int
    epochs_run: int
    stopped: str
    train_images_per_s: float
    train_seconds: float
    device: str
    registered: dict[str, str] = field(default_factory=dict)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``NAME@ALIAS`` or ``NAME@VERSION`` (digits) -> (name, alias-or-version); bare NAME = champion."""
    name, _, ref = spec.partition("@")
    if not name:
        raise ValueError(f"FR model spec {spec!r}: expected NAME@ALIAS or NAME@VERSION")
    return name, ref or CHAMPION


def resolve_fr_model(registry: Registry, spec: str, cache_dir: Path) -> tuple[VersionInfo, Path]:
    name, ref = parse_model_spec(spec)
    info = registry.get_version(name, ref) if ref.isdigit() else registry.resolve(name, ref)
    return info, registry.download(info, cache_dir)


def check_gates(metrics: dict[str, float]) -> dict[str, bool]:
    out = {}
    for key, bound in QUALITY_GATES.items():
        value = metrics.get(key, float("nan"))
        out[key] = bool(value >= bound)  # a missing (NaN) figure fails
    return out


def _mean_face_baseline(
    train: DecoderSplit, test: DecoderSplit, embed: Any, chip_size: int, rule: Any
) -> dict[str, float]:
    """The training set's mean chip as every reconstruction: what a decoder must beat."""
    mean = train.targets.mean(0, keepdim=True)
    if len(test) == 0:
        return {}
    rep = mean.expand_as(test.targets)
    tmpl = embed_images(embed, mean, chip_size)
    cos = torch.nn.functional.cosine_similarity(tmpl.expand_as(test.templates), test.templates.float(), dim=1)
    acc = rule.accepts(tmpl.expand_as(test.templates), test.templates.float()).float()
    return {
        "baseline_mean_face_psnr": float(psnr(rep, test.targets).mean()),
        "baseline_mean_face_ssim": float(ssim(rep, test.targets).mean()),
        "baseline_mean_face_identity_cosine": float(cos.mean()),
        "baseline_mean_face_accepted": float(acc.mean()),
    }


def perceptual_network(cfg: TrainDecoderConfig, recognition_net: Any, fr_label: str) -> PerceptualFeatures | None:
    """The frozen network of the perceptual terms that ``cfg.perceptual`` names (None: no perceptual terms)."""
    if cfg.perceptual == "none":
        return None
    if cfg.perceptual == "white_box":
        if not isinstance(recognition_net, FaceRecognitionNet):
            raise ValueError(
                f"perceptual white_box needs the FR model's own {cfg.perceptual_layer} layer, and {fr_label} "
                "is not the dlib ResNet: use --perceptual dlib_resnet or none"
            )
        return PerceptualFeatures.white_box(recognition_net, cfg.perceptual_layer)
    if cfg.perceptual == "dlib_resnet":  # the npm package's weights, installed by make setup
        return PerceptualFeatures.white_box(FaceRecognitionNet.from_faceapi(), cfg.perceptual_layer)
    raise ValueError(f"unknown perceptual network {cfg.perceptual!r}: white_box, dlib_resnet or none")


def train_decoder(
    cfg: TrainDecoderConfig,
    *,
    registry_uri: str,
    out_dir: Path,
    resume: bool = False,
    register: bool = True,
    progress: bool = True,
    faceset_cache: Path = FACESET_CACHE,
) -> RunSummary:
    """Run the whole pipeline (see module docstring); returns what it measured and registered."""
    if cfg.region_pairs < 0 or (cfg.region_pairs > 0 and not cfg.region_blends):
        raise ValueError(f"region_pairs {cfg.region_pairs} needs region_blends and a weight >= 0")
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry(registry_uri, timeout_s=30.0, max_retries=2)

    # 1. the FR model to invert, exactly as services load it
    fr_info, fr_path = resolve_fr_model(registry, cfg.fr_model, var_dir() / "models")
    fr_meta = read_metadata(fr_path)
    if fr_meta["kind"] != KIND_EMBEDDER:
        raise ValueError(f"{fr_info.name} v{fr_info.version} is a {fr_meta['kind']!r}, not an FR model (embedder)")
    fr_digest = fr_info.tags.get("bundle_sha256") or bundle_digest(fr_meta)
    pipeline = load_bundle(fr_path, device, name=fr_info.name, version=fr_info.version)
    fr_ref = {"name": fr_info.name, "version": fr_info.version, "bundle_sha256": fr_digest}
    chip_size = pipeline.info.chip_size

    # 2. data: cached face set (rank 0 builds it, the other ranks then read the cache), identity-disjoint split
    dist = init_distributed(device)
    root, records, label_names = records_from_spec(cfg.data)
    if not dist.main:
        barrier(dist)
    front_end: Path | Literal["auto"] | None = None
    if cfg.chips_from and dist.main:
        front_end = "auto" if cfg.chips_from == "auto" else Path(cfg.chips_from)
    faces: FaceSet = build_faceset(
        root,
        records,
        pipeline,
        fr_key=fr_digest,
        label_names=label_names,
        cache_dir=faceset_cache,
        progress=progress and dist.main,
        front_end=front_end,
    )
    key = cache_key(faces.meta["manifest_sha256"], fr_digest, chip_size, pipeline.info.chip_padding)
    mirrored = None
    if cfg.hflip:
        mirrored = mirror_faceset(
            faces,
            pipeline.embed_chips,
            cache_path=faceset_cache / f"{key}.hflip.npz",  # rank 0 writes it before the barrier
            progress=progress and dist.main,
        )
    extras = [mirrored] if mirrored is not None else []
    if cfg.region_blends:
        extras.append(
            blend_faceset(
                faces,
                pipeline.embed_chips,
                groups=face_sides(faces, test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction, seed=cfg.seed),
                seed=cfg.seed,
                cache_path=faceset_cache / f"{key}.blend{cfg.seed}-{cfg.test_fraction}-{cfg.val_fraction}.npz",
                progress=progress and dist.main,
            )
        )
    if dist.main:
        barrier(dist)
    splits = split_faceset(
        faces,
        cfg.out_size,
        test_fraction=cfg.test_fraction,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        train_extra=extras,
        pair_with=[len(extras) - 1] if cfg.region_pairs > 0 else [],  # the blends are the last extra
    )
    sizes = {k: len(v) for k, v in splits.items()}
    sizes["identities_train"] = len(set(splits["train"].identities))
    sizes["identities_test"] = len(set(splits["test"].identities))
    sizes["failed"] = len(faces.failed)

    # 3. model and losses
    torch.manual_seed(cfg.seed)
    decoder = DeepFaceDecoder(cfg.decoder_config(pipeline.info.dim))
    perceptual = perceptual_network(cfg, pipeline.recognition_net, f"{fr_info.name} v{fr_info.version}")
    perceptual = perceptual.to(device) if perceptual is not None else None

    train = functools.partial(
        fit,
        decoder,
        splits,
        perceptual=perceptual,
        weights=cfg.loss_weights(),
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        patience=cfg.patience,
        seed=cfg.seed,
        device=device,
        checkpoint_dir=out_dir,  # rank 0 writes it; every rank reads it on resume
        resume=resume,
        max_minutes=cfg.max_minutes,
        lr_decay=cfg.lr_decay,
        ema=cfg.ema,
        pair_weight=cfg.region_pairs,
    )
    if not dist.main:  # other ranks train their shards; rank 0 alone tracks, evaluates and registers
        result = train(progress=False)
        return RunSummary("", fr_ref, "", sizes, {}, {}, False, result.best_epoch, result.epochs_done,
                          result.stopped, result.train_images_per_s, 0.0, str(device))  # fmt: skip

    # 4. MLflow run (continued on resume)
    run_state: dict[str, Any] = {}
    ck = out_dir / "last.pt"
    if resume and ck.is_file():
        run_state = torch.load(ck, map_location="cpu", weights_only=False).get("run_state", {})
    mlrun = TrackedRun(
        registry_uri,
        EXPERIMENT,
        run_state.get("mlflow_run_id"),
        run_name=f"dfd-{fr_info.name}-v{fr_info.version}",
        tags={"facexplain.kind": KIND_DECODER, "facexplain.fr_model": f"{fr_info.name}:{fr_info.version}"},
    )
    run_state["mlflow_run_id"] = mlrun.run_id
    mlrun.params(
        {
            **cfg.to_params(),
            "fr_model_name": fr_info.name,
            "fr_model_version": fr_info.version,
            "fr_model_bundle_sha256": fr_digest,
            "data_root": str(root),
            "data_manifest_sha256": faces.meta["manifest_sha256"],
            "data_images": len(records),
            **{f"faces_{k}": v for k, v in sizes.items()},
            "decoder_parameters": sum(p.numel() for p in decoder.parameters()),
            "device_resolved": str(device),
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "facexplain_version": facexplain.__version__,
        }
    )
    mlrun.tag("data_manifest_sha256", str(faces.meta["manifest_sha256"]))
    mlrun.dict({"failed": faces.failed, "faces": sizes}, "data/faces.json")

    val = splits["val"]
    val_show = min(8, len(val))

    def on_epoch(log: EpochLog, recons: torch.Tensor) -> None:
        values = {f"train_{k}": v for k, v in log.train.items()}
        values.update({f"val_{k}": v for k, v in log.val.items()})
        values["train_images_per_s"] = log.train_images_per_s
        values["epoch_seconds"] = log.seconds
        if len(val) and recons.numel():
            n = min(VAL_IDENTITY_FACES, len(val))
            rt = embed_images(pipeline.embed_chips, recons[:n], chip_size)
            values["val_identity_cosine"] = float(
                torch.nn.functional.cosine_similarity(rt, val.templates[:n], dim=1).mean()
            )
            log.val["identity_cosine"] = values["val_identity_cosine"]
            if log.best or log.epoch == 1:
                mlrun.image(
                    pairs_grid(val.targets[:val_show], recons[:val_show]), f"grids/val_epoch_{log.epoch:03d}.png"
                )
        mlrun.metrics(values, step=log.epoch)

    t0 = time.perf_counter()
    try:
        result = train(on_epoch=on_epoch, run_state=run_state, progress=progress)
    except BaseException:
        mlrun.end("KILLED")  # resumable: the checkpoint of the last finished epoch is kept
        raise
    train_seconds = time.perf_counter() - t0

    # 5. evaluation on unseen identities
    decoder.eval()
    test = splits["test"]
    metrics: dict[str, float] = {"best_epoch": float(result.best_epoch), "train_seconds": train_seconds}
    metrics["train_images_per_s_overall"] = result.train_images_per_s
    if len(test):
        with torch.no_grad():
            recons = torch.cat(
                [decoder(test.templates[i : i + 256].to(device)).cpu() for i in range(0, len(test), 256)]
            )
        rtemplates = embed_images(pipeline.embed_chips, recons, chip_size)
        report, per_face = reconstruction_report(
            recons, test.targets, test.templates, rtemplates, test.identities, pipeline.info.rule
        )
        metrics.update(report.as_dict("test_"))
        metrics.update(_mean_face_baseline(splits["train"], test, pipeline.embed_chips, chip_size, pipeline.info.rule))
        metrics["test_psnr_over_mean_face"] = metrics["test_psnr"] - metrics["baseline_mean_face_psnr"]
        grid = pairs_grid(test.targets[:16], recons[:16])
        mlrun.image(grid, "grids/test_reconstructions.png")
        save_png(grid, out_dir / "test_reconstructions.png")
        rows = ["path,identity,psnr,ssim,identity_cosine,accepted"] + [
            f"{p},{i},{a:.4f},{b:.4f},{c:.4f},{int(d)}"
            for p, i, a, b, c, d in zip(
                test.paths,
                test.identities,
                per_face["psnr"].tolist(),
                per_face["ssim"].tolist(),
                per_face["identity_cosine"].tolist(),
                per_face["accepted"].tolist(),
                strict=True,
            )
        ]
        (out_dir / "test_metrics.csv").write_text("\n".join(rows) + "\n")
        mlrun.artifact(out_dir / "test_metrics.csv", "evaluation")
    gates = check_gates(metrics)
    passed = bool(gates) and all(gates.values()) and len(test) > 0
    metrics["gates_passed"] = float(passed)
    mlrun.metrics(metrics, step=len(result.history))
    mlrun.tag("gates_passed", str(passed).lower())

    summary = RunSummary(
        run_id=mlrun.run_id,
        fr_model=fr_ref,
        data_manifest_sha256=str(faces.meta["manifest_sha256"]),
        faces=sizes,
        metrics=metrics,
        gates=gates,
        gates_passed=passed,
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        stopped=result.stopped,
        train_images_per_s=result.train_images_per_s,
        train_seconds=train_seconds,
        device=str(device),
    )

    # 6. bundle (always: it is what --no-register runs hand to tests and to `facexplain registry`) and registration
    golden = pipeline.analyze([load_golden_image(GOLDEN_IMAGE)])[0]
    if golden is None:
        raise RuntimeError("no face found in the golden image")
    bundle = out_dir / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    save_decoder_bundle(
        bundle,
        decoder.cpu(),
        name=cfg.register_as,
        fr_model=fr_ref,
        golden_template=golden.template,
        chip_padding=pipeline.info.chip_padding,
        fr_chip_size=chip_size,
        training={
            "mlflow_run_id": mlrun.run_id,
            "data_manifest_sha256": summary.data_manifest_sha256,
            "seed": cfg.seed,
            "faces": sizes,
            "metrics": {k: round(v, 5) for k, v in metrics.items() if math.isfinite(v)},
            "gates_passed": passed,
        },
    )
    if register:
        alias = default_alias(registry, cfg.register_as, cfg.alias)
        tags = {k: f"{v:.4f}" for k, v in metrics.items() if k.startswith("test_") and math.isfinite(v)}
        tags["gates_passed"] = str(passed).lower()
        tags["data_manifest_sha256"] = summary.data_manifest_sha256
        info = registry.register_bundle(
            bundle, cfg.register_as, alias=alias or None, extra_tags=tags, run_id=mlrun.run_id
        )
        summary.registered = {"name": info.name, "version": info.version, "alias": alias}
    (out_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=1) + "\n")
    mlrun.artifact(out_dir / "summary.json")
    mlrun.end()
    return summary
