"""One decoder training run end to end: FR model from the registry -> face set -> split -> train ->
evaluate on unseen identities -> MLflow run (params, curves, images) -> bundle -> registered version.

Everything the run did is in MLflow: every setting, the data manifest hash, per-epoch losses and
validation PSNR / SSIM / identity cosine, reconstruction grids, the test-split quality figures with
the mean-face baseline and the quality gates, and the registered version (whose metadata names the
FR model name+version it inverts). ``summary.json`` in the output folder repeats the figures.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from facexplain.artifacts.bundle import GOLDEN_IMAGE, bundle_digest, load_golden_image, read_metadata
from facexplain.artifacts.decoder import KIND_DECODER, save_decoder_bundle
from facexplain.artifacts.embedder import KIND_EMBEDDER, SECOND_FR_MODEL, load_bundle, second_fr_pipeline
from facexplain.data.faces import FaceRecord, load_image
from facexplain.data.faceset import (
    FaceSet,
    blend_faceset,
    build_faceset,
    cache_key,
    drop_sealed,
    mirror_faceset,
    records_from_spec,
)
from facexplain.data.splits import without_sealed
from facexplain.losses.dfd import DEFAULT_WHITE_BOX_LAYER, PerceptualFeatures
from facexplain.metrics.image import psnr, ssim
from facexplain.metrics.judge import ChipGeometry, judge_decoded
from facexplain.metrics.reconstruction import embed_images, reconstruction_report
from facexplain.models.decoder import DeepFaceDecoder
from facexplain.models.hse_faceres import CHIP_SIZE as HSE_CHIP_SIZE
from facexplain.models.hse_faceres import PERCEPTUAL_NODE as HSE_PERCEPTUAL_NODE
from facexplain.models.hse_faceres import HseFaceRes, HseFaceResFeatures
from facexplain.models.program import require_gradients
from facexplain.models.recognition import FaceRecognitionNet
from facexplain.paths import var_dir
from facexplain.pipeline import FacePipeline
from facexplain.viz import pairs_grid, save_png
from registry import CHAMPION, Registry, VersionInfo
from training.common import (
    FACESET_CACHE,
    EpochLog,
    TrackedRun,
    epoch_metrics,
    finite_rounded,
    open_registry,
    register_from_run,
    replace_dir,
    runtime_params,
    saved_run_state,
    setup_run,
    write_summary,
)
from training.decoder.config import PERCEPTUAL_NETWORKS, TrainDecoderConfig
from training.decoder.data import DecoderSplit, face_sides, split_faceset
from training.decoder.trainer import FitResult, fit
from training.distributed import Dist, distributed_params, init_distributed, node_first, rank_seed, shutdown

EXPERIMENT = "facexplain-decoders"
VAL_IDENTITY_FACES = 256  # per-epoch identity check on this many validation faces (full check at the end)
# The independent second FR model judges this many test faces (evenly spaced over the split): reported, not
# a gate. Its reference is its template of each original photo (its detector runs), hence a cap.
SECOND_JUDGE = f"{SECOND_FR_MODEL}@{CHAMPION}"
SECOND_JUDGE_FACES = 256

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
        # a black box has no layers to read nor gradients to pass: say so rather than "not the dlib ResNet"
        require_gradients(recognition_net, "perceptual white_box (--perceptual dlib_resnet or none do not)", fr_label)
        if not isinstance(recognition_net, FaceRecognitionNet):
            raise ValueError(
                f"perceptual white_box needs the FR model's own {cfg.perceptual_layer} layer, and {fr_label} "
                "is not the dlib ResNet: use --perceptual dlib_resnet or none"
            )
        return PerceptualFeatures.white_box(recognition_net, cfg.perceptual_layer)
    if cfg.perceptual == "dlib_resnet":  # the npm package's weights, installed by make setup
        return PerceptualFeatures.white_box(FaceRecognitionNet.from_faceapi(), cfg.perceptual_layer)
    if cfg.perceptual == "hse_faceres":  # DFD's black-box setting: a network the FR model shares nothing with
        if isinstance(recognition_net, HseFaceRes):
            raise ValueError(
                f"perceptual hse_faceres is a black box only for another FR model, and {fr_label} is HSE FaceRes: "
                "use --perceptual dlib_resnet (or none)"
            )
        if cfg.perceptual_layer != DEFAULT_WHITE_BOX_LAYER:
            raise ValueError(
                f"perceptual_layer {cfg.perceptual_layer!r} names a dlib ResNet layer; hse_faceres reads its own "
                f"{HSE_PERCEPTUAL_NODE}"
            )
        return PerceptualFeatures.black_box(
            HseFaceResFeatures.from_human_models(), input_size=HSE_CHIP_SIZE, input_range=255.0
        )
    if cfg.perceptual == "faceplugin":  # the same setting with the third model, faceplugin's MobileFaceNet
        from facexplain.models import faceplugin

        if faceplugin.is_this_model(recognition_net):
            raise ValueError(
                f"perceptual faceplugin is a black box only for another FR model, and {fr_label} runs "
                f"{faceplugin.MODEL_FILE} itself: use --perceptual dlib_resnet, hse_faceres (or none)"
            )
        if cfg.perceptual_layer != DEFAULT_WHITE_BOX_LAYER:
            raise ValueError(
                f"perceptual_layer {cfg.perceptual_layer!r} names a dlib ResNet layer; faceplugin reads its own "
                f"node {faceplugin.PERCEPTUAL_NODE}"
            )
        return PerceptualFeatures.black_box(
            faceplugin.FacepluginFeatures.from_package(), input_size=faceplugin.CHIP_SIZE, input_range=255.0
        )
    raise ValueError(f"unknown perceptual network {cfg.perceptual!r}: one of {', '.join(PERCEPTUAL_NETWORKS)}")


@dataclass
class _FRModel:
    """The FR model the decoder inverts, loaded exactly as the services load it."""

    info: VersionInfo
    pipeline: FacePipeline
    digest: str  # the bundle's sha256: face sets are cached per FR model

    @property
    def ref(self) -> dict[str, str]:
        """What the decoder bundle and the run summary record of the FR model."""
        return {"name": self.info.name, "version": self.info.version, "bundle_sha256": self.digest}

    @property
    def label(self) -> str:
        return f"{self.info.name} v{self.info.version}"


@dataclass
class _Data:
    root: Path
    records: list[FaceRecord]
    faces: FaceSet
    splits: dict[str, DecoderSplit]
    sizes: dict[str, int]

    @property
    def manifest(self) -> str:
        return str(self.faces.meta["manifest_sha256"])


@dataclass
class _Fitted:
    result: FitResult
    train_seconds: float


@dataclass
class _Evaluation:
    metrics: dict[str, float]
    gates: dict[str, bool]
    passed: bool
    second_judge: str = ""  # "name:version" of the independent FR model that judged the test faces


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
    """Run the whole pipeline (see module docstring); returns what it measured and registered.

    Under ``torchrun`` every rank runs this: all train their shards (``training.distributed``), rank 0
    alone tracks, evaluates, writes the bundle and registers; the others return a summary without
    a run, figures or registration.
    """
    if cfg.region_pairs < 0 or (cfg.region_pairs > 0 and not cfg.region_blends):
        raise ValueError(f"region_pairs {cfg.region_pairs} needs region_blends and a weight >= 0")
    if cfg.perceptual not in PERCEPTUAL_NETWORKS:  # before any data is read
        raise ValueError(f"unknown perceptual network {cfg.perceptual!r}: one of {', '.join(PERCEPTUAL_NETWORKS)}")
    device = setup_run(cfg.device, cfg.threads, out_dir)
    dist = init_distributed(device)
    finished = False
    try:
        result = _train_decoder(cfg, dist, device, registry_uri, out_dir, resume, register, progress, faceset_cache)
        finished = True
        return result
    finally:
        shutdown(dist, wait_for_peers=finished)


def _train_decoder(
    cfg: TrainDecoderConfig,
    dist: Dist,
    device: torch.device,
    registry_uri: str,
    out_dir: Path,
    resume: bool,
    register: bool,
    progress: bool,
    faceset_cache: Path,
) -> RunSummary:
    registry = open_registry(registry_uri)
    with node_first(dist):  # one download per node into the model cache
        fr = _load_fr_model(cfg, registry, device)
    data = _prepare_data(cfg, fr, dist, faceset_cache, progress)
    torch.manual_seed(cfg.seed)  # the decoder's initialisation, after the (separately seeded) data steps
    decoder = DeepFaceDecoder(cfg.decoder_config(fr.pipeline.info.dim))
    if dist.world > 1:  # the same initialisation on every rank, then each rank's own dropout draws
        torch.manual_seed(rank_seed(cfg.seed, dist))
    perceptual = perceptual_network(cfg, fr.pipeline.recognition_net, fr.label)
    perceptual = perceptual.to(device) if perceptual is not None else None
    train = _trainer(cfg, decoder, data, perceptual, device, out_dir, resume)
    if not dist.main:  # other ranks train their shards; rank 0 alone tracks, evaluates and registers
        result = train(progress=False)
        return RunSummary("", fr.ref, "", data.sizes, {}, {}, False, result.best_epoch, result.epochs_done,
                          result.stopped, result.train_images_per_s, 0.0, str(device))  # fmt: skip
    run_state = saved_run_state(out_dir, resume)
    mlrun = _start_tracking(cfg, fr, data, decoder, device, dist, registry_uri, run_state)
    fitted = _fit(train, fr, data, mlrun, run_state, progress)
    ev = _evaluate(decoder, fr, data, fitted, device, out_dir, mlrun, registry)
    result = fitted.result
    summary = RunSummary(
        run_id=mlrun.run_id,
        fr_model=fr.ref,
        data_manifest_sha256=data.manifest,
        faces=data.sizes,
        metrics=ev.metrics,
        gates=ev.gates,
        gates_passed=ev.passed,
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        stopped=result.stopped,
        train_images_per_s=result.train_images_per_s,
        train_seconds=fitted.train_seconds,
        device=str(device),
    )
    # the bundle always: it is what --no-register runs hand to tests and to `facexplain registry`
    bundle = _write_bundle(cfg, decoder, fr, data, ev, mlrun.run_id, out_dir)
    if register:
        tags = {k: f"{v:.4f}" for k, v in ev.metrics.items() if k.startswith("test_") and math.isfinite(v)}
        tags["gates_passed"] = str(ev.passed).lower()
        if not ev.passed:  # what `facexplain registry promote` names when it refuses the version
            tags["gates_failed"] = ",".join(k for k, ok in ev.gates.items() if not ok) or "no test faces"
        tags["data_manifest_sha256"] = summary.data_manifest_sha256
        if ev.second_judge:
            tags["second_judge"] = ev.second_judge
        summary.registered = register_from_run(registry, bundle, cfg.register_as, cfg.alias, tags, mlrun.run_id)
    write_summary(mlrun, out_dir, summary)
    return summary


def _load_fr_model(cfg: TrainDecoderConfig, registry: Registry, device: torch.device) -> _FRModel:
    """The registered FR model to invert, refused unless it is an embedder (a decoder of a decoder is noise)."""
    fr_info, fr_path = resolve_fr_model(registry, cfg.fr_model, var_dir() / "models")
    fr_meta = read_metadata(fr_path)
    if fr_meta["kind"] != KIND_EMBEDDER:
        raise ValueError(f"{fr_info.name} v{fr_info.version} is a {fr_meta['kind']!r}, not an FR model (embedder)")
    fr_digest = fr_info.tags.get("bundle_sha256") or bundle_digest(fr_meta)
    pipeline = load_bundle(fr_path, device, name=fr_info.name, version=fr_info.version)
    return _FRModel(fr_info, pipeline, fr_digest)


def _prepare_data(cfg: TrainDecoderConfig, fr: _FRModel, dist: Dist, faceset_cache: Path, progress: bool) -> _Data:
    """The cached face set, its optional mirrored and region-blended extras, and the identity-disjoint split.

    Under torchrun each node's first process builds every cache file; the node's other ranks wait at
    the barrier and then read them, so the (slow) alignment and embedding run once per node.
    """
    root, records, label_names = records_from_spec(cfg.data)
    with node_first(dist):
        faces, extras, sealed_dropped = _cached_facesets(
            cfg, fr, dist, root, records, label_names, faceset_cache, progress
        )
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
    if cfg.exclude_sealed:
        sizes["sealed_identities_dropped"] = sealed_dropped
    return _Data(root, records, faces, splits, sizes)


def _cached_facesets(
    cfg: TrainDecoderConfig,
    fr: _FRModel,
    dist: Dist,
    root: Path,
    records: list[FaceRecord],
    label_names: list[str],
    faceset_cache: Path,
    progress: bool,
) -> tuple[FaceSet, list[FaceSet], int]:
    """The face set (sealed identities dropped if asked), its augmentation extras and how many sealed
    identities went: built and cached by the first caller, read from the cache by the next."""
    pipeline = fr.pipeline
    front_end: Path | Literal["auto"] | None = None
    if cfg.chips_from and dist.node_main:
        front_end = "auto" if cfg.chips_from == "auto" else Path(cfg.chips_from)
    faces: FaceSet = build_faceset(
        root,
        records,
        pipeline,
        fr_key=fr.digest,
        label_names=label_names,
        cache_dir=faceset_cache,
        progress=progress and dist.main,
        front_end=front_end,
    )
    key = cache_key(faces.meta["manifest_sha256"], fr.digest, pipeline.info.chip_size, pipeline.info.chip_padding)
    # The shipped models' sealed identities go before anything is split or blended (the split of the
    # others is unchanged: an identity's side depends on its name alone).
    all_faces, sealed_dropped = faces, 0
    if cfg.exclude_sealed:
        faces, sealed_dropped = drop_sealed(all_faces)
    extras = []
    if cfg.hflip:
        mirrored = mirror_faceset(
            all_faces,  # a face's mirror depends on that face alone: the full set's cache serves both
            pipeline.embed_chips,
            cache_path=faceset_cache / f"{key}.hflip.npz",  # the node's first rank writes it before the barrier
            progress=progress and dist.main,
        )
        extras.append(mirrored.subset(without_sealed(all_faces.identities)) if cfg.exclude_sealed else mirrored)
    if cfg.region_blends:
        unsealed = "-nosealed" if cfg.exclude_sealed else ""  # region donors differ: a cache of its own
        extras.append(
            blend_faceset(
                faces,
                pipeline.embed_chips,
                groups=face_sides(faces, test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction, seed=cfg.seed),
                seed=cfg.seed,
                cache_path=faceset_cache
                / f"{key}.blend{cfg.seed}-{cfg.test_fraction}-{cfg.val_fraction}{unsealed}.npz",
                progress=progress and dist.main,
            )
        )
    return faces, extras, sealed_dropped


def _trainer(
    cfg: TrainDecoderConfig,
    decoder: DeepFaceDecoder,
    data: _Data,
    perceptual: PerceptualFeatures | None,
    device: torch.device,
    out_dir: Path,
    resume: bool,
) -> Callable[..., FitResult]:
    """``fit`` with the run's settings bound; every rank calls it, rank 0 adds tracking and progress."""
    return functools.partial(
        fit,
        decoder,
        data.splits,
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


def _start_tracking(
    cfg: TrainDecoderConfig,
    fr: _FRModel,
    data: _Data,
    decoder: DeepFaceDecoder,
    device: torch.device,
    dist: Dist,
    registry_uri: str,
    run_state: dict[str, Any],
) -> TrackedRun:
    """The MLflow run (continued on resume) with every setting, the FR model and the data's hash, so a
    registered decoder can be traced to exactly what it was trained on and what it inverts."""
    mlrun = TrackedRun(
        registry_uri,
        EXPERIMENT,
        run_state.get("mlflow_run_id"),
        run_name=f"dfd-{fr.info.name}-v{fr.info.version}",
        tags={"facexplain.kind": KIND_DECODER, "facexplain.fr_model": f"{fr.info.name}:{fr.info.version}"},
    )
    run_state["mlflow_run_id"] = mlrun.run_id
    mlrun.params(
        {
            **cfg.to_params(),
            "fr_model_name": fr.info.name,
            "fr_model_version": fr.info.version,
            "fr_model_bundle_sha256": fr.digest,
            "data_root": str(data.root),
            "data_manifest_sha256": data.faces.meta["manifest_sha256"],
            "data_images": len(data.records),
            **{f"faces_{k}": v for k, v in data.sizes.items()},
            "decoder_parameters": sum(p.numel() for p in decoder.parameters()),
            **runtime_params(device),
            **distributed_params(cfg.seed, cfg.batch_size, dist),
        }
    )
    mlrun.tag("data_manifest_sha256", data.manifest)
    mlrun.dict({"failed": data.faces.failed, "faces": data.sizes}, "data/faces.json")
    return mlrun


def _fit(
    train: Callable[..., FitResult],
    fr: _FRModel,
    data: _Data,
    mlrun: TrackedRun,
    run_state: dict[str, Any],
    progress: bool,
) -> _Fitted:
    """Rank 0's training: per-epoch curves, the identity cosine of a validation sample (the loss alone
    does not say whether the faces stay recognisable) and grids; an interrupted run is marked KILLED."""
    val = data.splits["val"]
    val_show = min(8, len(val))
    chip_size = fr.pipeline.info.chip_size

    def on_epoch(log: EpochLog, recons: torch.Tensor) -> None:
        values = epoch_metrics(log)
        if len(val) and recons.numel():
            n = min(VAL_IDENTITY_FACES, len(val))
            rt = embed_images(fr.pipeline.embed_chips, recons[:n], chip_size)
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
    return _Fitted(result, time.perf_counter() - t0)


def _evaluate(
    decoder: DeepFaceDecoder,
    fr: _FRModel,
    data: _Data,
    fitted: _Fitted,
    device: torch.device,
    out_dir: Path,
    mlrun: TrackedRun,
    registry: Registry | None = None,
) -> _Evaluation:
    """The best weights on unseen identities against the mean-face baseline, the quality gates, and the
    independent second FR model's identity figures (reported beside the gates, not one of them)."""
    decoder.eval()
    test = data.splits["test"]
    result = fitted.result
    metrics: dict[str, float] = {"best_epoch": float(result.best_epoch), "train_seconds": fitted.train_seconds}
    metrics["train_images_per_s_overall"] = result.train_images_per_s
    judge = ""
    if len(test):
        metrics.update(_test_figures(decoder, fr, data, device, out_dir, mlrun))
        second, judge = _second_judge_figures(decoder, fr, data, device, registry)
        metrics.update(second)
    gates = check_gates(metrics)
    passed = bool(gates) and all(gates.values()) and len(test) > 0
    metrics["gates_passed"] = float(passed)
    mlrun.metrics(metrics, step=len(result.history))
    mlrun.tag("gates_passed", str(passed).lower())
    if judge:
        mlrun.tag("facexplain.second_judge", judge)
        mlrun.params({"second_judge_model": judge, "second_judge_faces_max": SECOND_JUDGE_FACES})
    return _Evaluation(metrics, gates, passed, judge)


def _load_second_judge(fr: _FRModel, registry: Registry | None, device: torch.device) -> tuple[Any, str] | None:
    """The independent FR model: its registered champion, else the installed weights; None (and a message)
    where neither is there or it is the very model the decoder inverts."""
    name, ref = parse_model_spec(SECOND_JUDGE)
    if fr.info.name == name:
        print(f"second judge skipped: {name} is the FR model this decoder inverts, not an independent one")
        return None
    reason = "no registry"
    if registry is not None:
        try:
            info = registry.resolve(name, ref)
            path = registry.download(info, var_dir() / "models")
            return load_bundle(path, device, name=info.name, version=info.version), f"{info.name}:{info.version}"
        except Exception as exc:  # not registered there (or unreachable): the installed weights below
            reason = f"{type(exc).__name__}: {exc}"
    try:
        return second_fr_pipeline(str(device)), f"{name}:local"
    except (FileNotFoundError, OSError) as exc:
        print(f"second judge skipped: {name} not in the registry ({reason}) and not installed ({exc})")
        return None


def _second_judge_figures(
    decoder: DeepFaceDecoder, fr: _FRModel, data: _Data, device: torch.device, registry: Registry | None
) -> tuple[dict[str, float], str]:
    """HSE FaceRes's identity cosine and acceptance of the decoded test faces against its templates of the
    original photos (:mod:`facexplain.metrics.judge`), on up to ``SECOND_JUDGE_FACES`` evenly spaced faces."""
    loaded = _load_second_judge(fr, registry, device)
    if loaded is None:
        return {}, ""
    judge, label = loaded
    test = data.splits["test"]
    n = min(SECOND_JUDGE_FACES, len(test))
    index = torch.linspace(0, len(test) - 1, n).round().long().unique()
    photos = [load_image(data.root / test.paths[i]) for i in index.tolist()]
    with torch.no_grad():
        decoded = decoder(test.templates[index].to(device)).float().cpu()
    scores = judge_decoded(judge, photos, decoded, ChipGeometry.of(fr.pipeline.info))
    summary = scores.summary()
    out = {
        "test_second_judge_faces": float(summary["faces"] or 0),
        "test_second_judge_found": float(summary["found"] or 0),
    }
    if summary["mean_cosine"] is not None:
        out["test_identity_cosine_second"] = float(summary["mean_cosine"])
    out["test_accepted_second"] = float(summary["accepted"] or 0.0)
    cosine, accepted = out.get("test_identity_cosine_second", float("nan")), out["test_accepted_second"]
    print(f"second judge {label} on {n} test faces: identity cosine {cosine:.3f}, accepted {accepted:.1%}")
    return out, label


def _test_figures(
    decoder: DeepFaceDecoder, fr: _FRModel, data: _Data, device: torch.device, out_dir: Path, mlrun: TrackedRun
) -> dict[str, float]:
    """Reconstruction quality of the test faces (the summary and a per-face CSV) and a grid to look at."""
    test = data.splits["test"]
    pipeline, chip_size = fr.pipeline, fr.pipeline.info.chip_size
    with torch.no_grad():
        recons = torch.cat([decoder(test.templates[i : i + 256].to(device)).cpu() for i in range(0, len(test), 256)])
    rtemplates = embed_images(pipeline.embed_chips, recons, chip_size)
    report, per_face = reconstruction_report(
        recons, test.targets, test.templates, rtemplates, test.identities, pipeline.info.rule
    )
    metrics = report.as_dict("test_")
    metrics.update(_mean_face_baseline(data.splits["train"], test, pipeline.embed_chips, chip_size, pipeline.info.rule))
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
    return metrics


def _write_bundle(
    cfg: TrainDecoderConfig,
    decoder: DeepFaceDecoder,
    fr: _FRModel,
    data: _Data,
    ev: _Evaluation,
    run_id: str,
    out_dir: Path,
) -> Path:
    """The decoder bundle, with the golden template of its FR model so a loader can check the pairing."""
    golden = fr.pipeline.analyze([load_golden_image(GOLDEN_IMAGE)])[0]
    if golden is None:
        raise RuntimeError("no face found in the golden image")
    bundle = replace_dir(out_dir / "bundle")
    save_decoder_bundle(
        bundle,
        decoder.cpu(),
        name=cfg.register_as,
        fr_model=fr.ref,
        golden_template=golden.template,
        chip_padding=fr.pipeline.info.chip_padding,
        fr_chip_size=fr.pipeline.info.chip_size,
        training={
            "mlflow_run_id": run_id,
            "data_manifest_sha256": data.manifest,
            "seed": cfg.seed,
            "faces": data.sizes,
            "metrics": finite_rounded(ev.metrics),
            "gates_passed": ev.passed,
        },
    )
    return bundle
