"""The four discovery jobs on a resolved dataset: SSI, centroids, regression, equivariance maps.

Each job is split in two: ``plan_*`` checks the request against the proto's rules and the server's
limits (cheap, runs before any face is embedded, so a bad request fails in milliseconds), and
``run_*`` does the work on a :class:`~services.kit.datasets.ResolvedDataset` with the methods of
:mod:`facexplain.directions`, reporting progress and polling for cancellation through a
:class:`~services.kit.jobs.JobContext`. Results are :mod:`facexplain.artifacts.direction_set`
dataclasses carrying everything needed to cite them: FR model, data manifest, seed, parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from facexplain.artifacts.direction_set import DirectionSetData, EquivarianceMapData, EquivarianceSetData
from facexplain.directions.equivariance import apply_map, embed_transformed, fit_linear_map
from facexplain.directions.fit_checks import cross_validated_r2
from facexplain.directions.labels import alpha_to_target, centroid_directions, regression_direction
from facexplain.directions.ssi import DiscoveryCancelled, discover_ssi
from facexplain.directions.traverse import projected_std
from facexplain.faces.blend import DEFAULT_DILATE, REGIONS, MaskMode, n_ordered_pairs, region_points, sample_pairs
from facexplain.pipeline import FacePipeline
from services.api.v1 import common_pb2, directions_pb2
from services.directions.sets import CheckedTransform, check_transform
from services.directions.settings import DirectionsSettings
from services.kit.datasets import ResolvedDataset
from services.kit.errors import Cancelled, InvalidArgument, ResourceExhausted
from services.kit.jobs import JobContext
from services.kit.models import ServedModel

SetData = TypeVar("SetData", DirectionSetData, EquivarianceSetData)

DEFAULT_REGIONS = ("eyes", "nose", "lower_face")
DEFAULT_N_COMPONENTS = 5
DEFAULT_FEATHER_SIGMA = 4.0
DEFAULT_RIDGE = 1.0
DEFAULT_CV_FOLDS = 5
DEFAULT_EQ_RIDGE = 1e-3
DEFAULT_HOLDOUT = 0.2
MASK_MODE: MaskMode = "union"


def _digest(h: Any, value: Any) -> None:
    if isinstance(value, np.ndarray):
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _digest(h, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    elif isinstance(value, dict):
        for key in sorted(value):
            h.update(str(key).encode())
            _digest(h, value[key])
    elif isinstance(value, list | tuple):
        for item in value:
            _digest(h, item)
    else:
        h.update(json.dumps(value, default=str).encode())


def with_content_id(data: SetData, prefix: str) -> SetData:
    """``data`` with its id derived from what it is: method, target, FR model, data, seed, settings, numbers.

    The same request on the same data gives the same id on any server and after restarts, so an audit
    citing a set is reproducible; sets that differ in anything (region, seed, vectors, ...) get
    different ids. Only the id and the creation time are left out of the digest.
    """
    h = hashlib.sha256()
    _digest(
        h, {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.name not in ("set_id", "created_at")}
    )
    return dataclasses.replace(data, set_id=f"{prefix}-{h.hexdigest()[:16]}")


def batch_size_of(requested: int, settings: DirectionsSettings) -> int:
    if requested < 0:
        raise InvalidArgument(f"batch_size is {requested}; use 0 for the server default")
    size = requested or settings.batch_size
    if size > settings.max_batch_size:
        raise ResourceExhausted(
            f"batch_size {size} exceeds the limit of {settings.max_batch_size} (FACEXPLAIN_MAX_BATCH_SIZE)"
        )
    return size


def _fmt(v: float) -> str:
    return f"{v:g}"


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{what} must be finite, got {value}")
    return float(value)


def _templates(ds: ResolvedDataset, normalize: bool) -> torch.Tensor:
    x = ds.templates.to(torch.float64)
    return F.normalize(x, dim=1) if normalize else x


# -- SSI ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSIRegion:
    name: str
    points: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class SSIPlan:
    regions: list[SSIRegion]
    n_components: int
    feather: float
    batch_size: int
    seed: int
    max_pairs: int


def plan_ssi(req: directions_pb2.DiscoverSSIRequest, settings: DirectionsSettings, dim: int) -> SSIPlan:
    if len(req.regions) > settings.max_regions:
        raise ResourceExhausted(
            f"{len(req.regions)} regions exceed the limit of {settings.max_regions} (FACEXPLAIN_MAX_REGIONS)"
        )
    regions: list[SSIRegion] = []
    for i, r in enumerate(req.regions or [directions_pb2.Region(name=n) for n in DEFAULT_REGIONS]):
        if r.landmark_indices:
            if len(set(r.landmark_indices)) < 3:
                raise InvalidArgument(f"regions[{i}]: a custom region needs at least 3 distinct landmark indices")
            try:
                points = region_points(list(r.landmark_indices))
            except ValueError as exc:
                raise InvalidArgument(f"regions[{i}]: {exc}") from None
            name = r.name or f"custom{i}"
        else:
            if r.name not in REGIONS:
                raise InvalidArgument(
                    f"regions[{i}]: unknown region {r.name!r}; predefined: {', '.join(sorted(REGIONS))} "
                    "(or give landmark_indices for a custom region)"
                )
            name, points = r.name, region_points(r.name)
        if any(x.name == name for x in regions):
            raise InvalidArgument(f"regions[{i}]: region {name!r} is named twice")
        regions.append(SSIRegion(name, points))
    n_components = req.n_components or DEFAULT_N_COMPONENTS
    if not 1 <= n_components <= dim:
        raise InvalidArgument(
            f"n_components is {req.n_components}; it must be in 1..{dim} (0 = {DEFAULT_N_COMPONENTS})"
        )
    feather = DEFAULT_FEATHER_SIGMA
    if req.HasField("feather_sigma"):
        feather = _finite(req.feather_sigma, "feather_sigma")
        if feather < 0:
            raise InvalidArgument(f"feather_sigma must be >= 0 (0 = hard edge), got {feather}")
    if req.max_pairs < 0:
        raise InvalidArgument(f"max_pairs is {req.max_pairs}; use 0 for the server default")
    # The default never exceeds the limit: a request leaving max_pairs at 0 must not be refused for it.
    max_pairs = req.max_pairs or min(settings.default_ssi_pairs, settings.max_ssi_pairs)
    if max_pairs > settings.max_ssi_pairs:
        raise ResourceExhausted(
            f"max_pairs {max_pairs} exceeds the limit of {settings.max_ssi_pairs} pairs per region "
            "(FACEXPLAIN_MAX_SSI_PAIRS)"
        )
    return SSIPlan(regions, n_components, feather, batch_size_of(req.batch_size, settings), int(req.seed), max_pairs)


def run_ssi(
    plan: SSIPlan, ds: ResolvedDataset, fr: ServedModel[FacePipeline], job: JobContext
) -> list[DirectionSetData]:
    """One SSI direction set per region; every region sees the same sampled pairs (same seed)."""
    assert ds.chips is not None and ds.landmarks is not None
    n = len(ds)
    if n < 3:
        raise InvalidArgument(
            f"SSI needs at least 3 faces (pairs of different faces, several per face donor); {n} usable in the "
            f"dataset ({len(ds.skipped)} skipped)"
        )
    pairs = sample_pairs(n, plan.max_pairs, plan.seed)
    n_pairs = n_ordered_pairs(n) if pairs is None else int(pairs.numel())
    out = []
    for k, region in enumerate(plan.regions):
        label = f"region {region.name} ({k + 1} of {len(plan.regions)})"
        job.progress(0, n_pairs, "blending", label, force=True)

        def progress(done: int, total: int, label: str = label) -> None:
            job.progress(done, total, "blending", label)

        try:
            res = discover_ssi(
                ds.chips,
                ds.landmarks,
                fr.model.embed_chips,
                region=[list(g) for g in region.points],
                n_components=plan.n_components,
                batch_size=plan.batch_size,
                progress=progress,
                should_stop=job.stop,
                dilate=DEFAULT_DILATE,
                feather=plan.feather,
                mask_mode=MASK_MODE,
                original_templates=ds.templates,
                pairs=pairs,
            )
        except DiscoveryCancelled as exc:
            raise Cancelled(f"cancelled in {label} after {exc.done} of {exc.total} blends") from None
        except ValueError as exc:
            raise InvalidArgument(f"SSI on {region.name}: {exc}") from None
        k_dirs = res.directions.shape[0]
        out.append(
            DirectionSetData(
                set_id="",
                method="ssi",
                target=region.name,
                fr_name=fr.name,
                fr_version=fr.version,
                vectors=res.directions.numpy().astype(np.float32),
                names=[f"ssi/{region.name}/pc{i + 1}" for i in range(k_dirs)],
                eigenvalues=res.eigenvalues.tolist(),
                explained_variance=res.explained_variance.tolist(),
                stddev=res.stddev.tolist(),
                data_manifest_sha256=ds.manifest_sha256,
                seed=plan.seed,
                n_items=n,
                metrics={"n_pairs": float(res.n_blends), "total_variance": float(res.total_variance)},
                params={
                    **ds.params,
                    "n_components": str(plan.n_components),
                    "feather_sigma": _fmt(plan.feather),
                    "dilate": _fmt(DEFAULT_DILATE),
                    "mask_mode": MASK_MODE,
                    "max_pairs": str(plan.max_pairs),
                    "pairs_sampled": str(pairs is not None).lower(),
                    "batch_size": str(plan.batch_size),
                    "landmark_groups": ";".join(",".join(str(p) for p in g) for g in region.points),
                    "seed": str(plan.seed),
                },
            )
        )
    return [with_content_id(d, "ssi") for d in out]


# -- centroids -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CentroidPlan:
    label: str
    positives: list[float]
    reference: float | None
    normalize: bool


def plan_centroid(req: directions_pb2.DiscoverCentroidRequest) -> CentroidPlan:
    if not req.label:
        raise InvalidArgument("label is empty: name the label key, e.g. 'Smiling'")
    positives = [_finite(v, "positive_values") for v in req.positive_values]
    if len(set(positives)) != len(positives):
        raise InvalidArgument("positive_values lists a value twice")
    reference = _finite(req.reference_value, "reference_value") if req.HasField("reference_value") else None
    if not positives and reference is None:
        raise InvalidArgument("give positive_values, reference_value or both: which group is the reference?")
    if reference is not None and reference in positives:
        raise InvalidArgument(f"reference_value {reference:g} is also a positive value")
    return CentroidPlan(req.label, sorted(positives), reference, bool(req.normalize_templates))


def run_centroid(
    plan: CentroidPlan, ds: ResolvedDataset, fr: ServedModel[FacePipeline], min_items: int
) -> DirectionSetData:
    label = plan.label
    values = [lab.get(label) for lab in ds.labels]
    present = sorted({v for v in values if v is not None})
    if not present:
        raise InvalidArgument(f"unknown label {label!r}: no dataset item carries it")
    positives = plan.positives or [v for v in present if v != plan.reference]
    if not positives:
        raise InvalidArgument(f"label {label!r}: every item has the reference value {plan.reference:g}")
    missing = [v for v in positives if v not in present]
    if missing:
        raise InvalidArgument(f"label {label!r}: no item has the value {', '.join(_fmt(v) for v in missing)}")
    # Group codes: 0 = the reference group, k + 1 = positives[k]; items in neither group are left out.
    codes: list[float] = []
    for v in values:
        if v is None:
            codes.append(float("nan"))
        elif v in positives:
            codes.append(float(positives.index(v) + 1))
        elif plan.reference is None or v == plan.reference:
            codes.append(0.0)
        else:
            codes.append(float("nan"))
    ref_name = f"{label}={_fmt(plan.reference)}" if plan.reference is not None else f"{label}=other"
    group_names = [ref_name] + [f"{label}={_fmt(v)}" for v in positives]
    counts = {name: sum(1 for c in codes if c == k) for k, name in enumerate(group_names)}
    short = {name: c for name, c in counts.items() if c < min_items}
    if short:
        detail = ", ".join(f"{name}: {c}" for name, c in short.items())
        raise InvalidArgument(
            f"label {label!r} has too few items per value (each group needs at least {min_items}, "
            f"FACEXPLAIN_MIN_LABEL_ITEMS): {detail}"
        )
    x = _templates(ds, plan.normalize)
    keep = [i for i, c in enumerate(codes) if not math.isnan(c)]
    result = centroid_directions(x[keep], [int(codes[i]) for i in keep], reference=0, min_count=min_items)
    directions = result.directions  # (P, D) float64, positives in order
    centroids = result.centroids
    stddev = projected_std(x, directions).tolist()
    cosines = F.cosine_similarity(centroids[1:], centroids[0:1].expand_as(centroids[1:]), dim=1).tolist()
    metrics = {"cosine_ref_pos": float(cosines[0])}
    if len(positives) > 1:
        metrics.update({f"cosine_ref_pos/{group_names[k + 1]}": float(c) for k, c in enumerate(cosines)})
    ref_value = plan.reference if plan.reference is not None else float("nan")
    data = DirectionSetData(
        set_id="",
        method="centroid",
        target=label,
        fr_name=fr.name,
        fr_version=fr.version,
        vectors=directions.numpy().astype(np.float32),
        names=[f"centroid/{name}" for name in group_names[1:]],
        eigenvalues=[0.0] * len(positives),
        explained_variance=[0.0] * len(positives),
        stddev=stddev,
        data_manifest_sha256=ds.manifest_sha256,
        seed=0,
        n_items=len(keep),
        metrics=metrics,
        params={
            **ds.params,
            "label": label,
            "positive_values": ",".join(_fmt(v) for v in positives),
            "reference_value": _fmt(plan.reference) if plan.reference is not None else "",
            "normalize_templates": str(plan.normalize).lower(),
            "min_label_items": str(min_items),
        },
        centroid_names=group_names,
        centroid_values=[ref_value, *positives],
        centroid_counts=[int(c) for c in result.counts],
        centroids=centroids.numpy().astype(np.float32),
        centroids_normalized=plan.normalize,
    )
    return with_content_id(data, "centroid")


# -- regression ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegressionPlan:
    label: str
    ridge: float
    cv_folds: int
    seed: int
    normalize: bool
    target_value: float | None


def plan_regression(req: directions_pb2.DiscoverRegressionRequest) -> RegressionPlan:
    if not req.label:
        raise InvalidArgument("label is empty: name the numeric label key, e.g. 'age'")
    ridge = DEFAULT_RIDGE
    if req.HasField("ridge_alpha"):
        ridge = _finite(req.ridge_alpha, "ridge_alpha")
        if ridge < 0:
            raise InvalidArgument(f"ridge_alpha must be >= 0 (0 = ordinary least squares), got {ridge}")
    if req.cv_folds < 0:
        raise InvalidArgument(f"cv_folds is {req.cv_folds}; use 0 for {DEFAULT_CV_FOLDS}, 1 for none")
    has_probe = req.probe.WhichOneof("kind") is not None
    target = _finite(req.target_value, "target_value") if req.HasField("target_value") else None
    if has_probe and target is None:
        raise InvalidArgument("a probe needs target_value: the label value to move it to")
    return RegressionPlan(
        req.label, ridge, req.cv_folds or DEFAULT_CV_FOLDS, int(req.seed), bool(req.normalize_templates), target
    )


@dataclass
class RegressionOutcome:
    data: DirectionSetData
    probe: directions_pb2.RegressionProbe | None


def run_regression(
    plan: RegressionPlan,
    ds: ResolvedDataset,
    fr: ServedModel[FacePipeline],
    min_items: int,
    probe: torch.Tensor | None,
    probe_normalized: bool,
) -> RegressionOutcome:
    label = plan.label
    raw = [lab.get(label) for lab in ds.labels]
    keep = [i for i, v in enumerate(raw) if v is not None]
    if not keep:
        raise InvalidArgument(f"unknown label {label!r}: no dataset item carries it")
    if len(keep) < min_items:
        raise InvalidArgument(
            f"label {label!r} has too few items: {len(keep)} labelled, a regression needs at least {min_items} "
            "(FACEXPLAIN_MIN_LABEL_ITEMS)"
        )
    x = _templates(ds, plan.normalize)[keep]
    y = torch.tensor([float(raw[i]) for i in keep], dtype=torch.float64)  # type: ignore[arg-type]
    try:
        reg = regression_direction(x, y, plan.ridge)
    except ValueError as exc:
        raise InvalidArgument(f"label {label!r}: {exc}") from None
    metrics = {"r2_train": reg.r2, "intercept": reg.intercept, "coef_norm": float(reg.coef.norm())}
    if plan.cv_folds > 1:
        if plan.cv_folds > len(keep):
            raise InvalidArgument(f"cv_folds {plan.cv_folds} exceeds the {len(keep)} labelled items")
        try:
            metrics["r2_cv"] = cross_validated_r2(x, y, plan.cv_folds, plan.ridge, plan.seed)
        except ValueError as exc:
            raise InvalidArgument(f"{exc}; use fewer cv_folds") from None
    fr_ref = common_pb2.ModelRef(name=fr.name, version=fr.version)
    direction = reg.direction  # unit
    data = DirectionSetData(
        set_id="",
        method="regression",
        target=label,
        fr_name=fr.name,
        fr_version=fr.version,
        vectors=direction[None].numpy().astype(np.float32),
        names=[f"regression/{label}"],
        eigenvalues=[0.0],
        explained_variance=[0.0],
        stddev=projected_std(x, direction).tolist(),
        data_manifest_sha256=ds.manifest_sha256,
        seed=plan.seed,
        n_items=len(keep),
        metrics={k: float(v) for k, v in metrics.items()},
        params={
            **ds.params,
            "label": label,
            "ridge_alpha": _fmt(plan.ridge),
            "cv_folds": str(plan.cv_folds),
            "normalize_templates": str(plan.normalize).lower(),
            "min_label_items": str(min_items),
            "seed": str(plan.seed),
        },
    )
    data = with_content_id(data, "regression")
    out = None
    if probe is not None:
        assert plan.target_value is not None
        t = probe.to(torch.float64)
        normalized = probe_normalized
        if plan.normalize:
            t, normalized = F.normalize(t, dim=0), True
        predicted = float(reg.predict(t))
        alpha = float(alpha_to_target(t, reg, plan.target_value, along="unit"))
        moved = t + alpha * direction
        out = directions_pb2.RegressionProbe(
            probe=_tproto(t, fr_ref, normalized),
            predicted=predicted,
            target_value=plan.target_value,
            alpha=alpha,
            moved=_tproto(moved, fr_ref, False),
        )
    return RegressionOutcome(data, out)


def _tproto(vec: torch.Tensor, fr: common_pb2.ModelRef, normalized: bool) -> common_pb2.Template:
    values = vec.detach().to(torch.float32).cpu().tolist()
    return common_pb2.Template(values=values, dim=len(values), model=fr, normalized=normalized)


# -- equivariance ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EquivariancePlan:
    transforms: list[CheckedTransform]
    ridge: float
    holdout: float
    seed: int
    batch_size: int


def plan_equivariance(req: directions_pb2.FitEquivarianceRequest, settings: DirectionsSettings) -> EquivariancePlan:
    if not req.transforms:
        raise InvalidArgument("transforms is empty: give at least one rotation, translation or scaling")
    if len(req.transforms) > settings.max_transforms:
        raise ResourceExhausted(
            f"{len(req.transforms)} transforms exceed the limit of {settings.max_transforms} "
            "(FACEXPLAIN_MAX_TRANSFORMS)"
        )
    transforms = [check_transform(t, f"transforms[{i}]") for i, t in enumerate(req.transforms)]
    ridge = DEFAULT_EQ_RIDGE
    if req.HasField("ridge_alpha"):
        ridge = _finite(req.ridge_alpha, "ridge_alpha")
        if ridge < 0:
            raise InvalidArgument(f"ridge_alpha must be >= 0, got {ridge}")
    holdout = req.holdout_fraction or DEFAULT_HOLDOUT
    if not (math.isfinite(holdout) and 0 < holdout < 1):
        raise InvalidArgument(f"holdout_fraction must lie in (0, 1), got {req.holdout_fraction}")
    return EquivariancePlan(transforms, ridge, holdout, int(req.seed), batch_size_of(req.batch_size, settings))


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=1).mean())


def run_equivariance(
    plan: EquivariancePlan, ds: ResolvedDataset, fr: ServedModel[FacePipeline], job: JobContext
) -> EquivarianceSetData:
    assert ds.chips is not None
    n = len(ds)
    n_hold = max(1, round(plan.holdout * n))
    if n - n_hold < 2:
        raise InvalidArgument(
            f"{n} usable faces leave {n - n_hold} to fit on after holding out {n_hold}; need at least 2 "
            f"({len(ds.skipped)} items skipped)"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(plan.seed))
    hold, train = perm[:n_hold], perm[n_hold:]
    originals = ds.templates.to(torch.float64)
    chip_size = int(ds.chips.shape[-1])
    total = n * len(plan.transforms)
    done = 0
    job.progress(0, total, "transforming", f"{len(plan.transforms)} transforms x {n} faces", force=True)
    maps = []
    for ct in plan.transforms:
        gt = ct.geometric(chip_size)
        parts = []
        for s in range(0, n, plan.batch_size):
            if job.stop():
                raise Cancelled(f"cancelled while embedding transformed faces ({done} of {total} done)")
            chunk = ds.chips[s : s + plan.batch_size]
            parts.append(
                embed_transformed(chunk, fr.model.embed_chips, gt, batch_size=plan.batch_size, padding_mode="border")
            )
            done += chunk.shape[0]
            job.progress(done, total, "transforming", ct.label())
        moved = torch.cat(parts).to(torch.float64)
        try:
            fwd = fit_linear_map(moved[train], originals[train], ridge=plan.ridge, bias=True, transform=gt)
            inv = fit_linear_map(originals[train], moved[train], ridge=plan.ridge, bias=True, transform=gt)
        except ValueError as exc:
            raise InvalidArgument(f"{ct.label()}: {exc}") from None
        assert fwd.bias is not None and inv.bias is not None
        maps.append(
            EquivarianceMapData(
                kind=ct.kind,
                angle_degrees=ct.angle_degrees,
                dx=ct.dx,
                dy=ct.dy,
                scale=ct.scale,
                forward=fwd.matrix.numpy().astype(np.float32),
                forward_bias=fwd.bias.numpy().astype(np.float32),
                inverse=inv.matrix.numpy().astype(np.float32),
                inverse_bias=inv.bias.numpy().astype(np.float32),
                forward_cosine=_mean_cos(apply_map(originals[hold], fwd), moved[hold]),
                inverse_cosine=_mean_cos(apply_map(moved[hold], inv), originals[hold]),
                baseline_cosine=_mean_cos(originals[hold], moved[hold]),
            )
        )
    eq_set = EquivarianceSetData(
        set_id="",
        fr_name=fr.name,
        fr_version=fr.version,
        maps=maps,
        data_manifest_sha256=ds.manifest_sha256,
        seed=plan.seed,
        n_items=n,
        params={
            **ds.params,
            "ridge_alpha": _fmt(plan.ridge),
            "holdout_fraction": _fmt(plan.holdout),
            "n_train": str(int(train.numel())),
            "n_holdout": str(n_hold),
            "padding_mode": "border",
            "batch_size": str(plan.batch_size),
            "seed": str(plan.seed),
        },
    )
    return with_content_id(eq_set, "equivariance")
