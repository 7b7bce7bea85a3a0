"""Datasets of a discovery request -> templates (and aligned chips with landmarks) of the served FR model.

A ``Dataset`` is either sent inline (``LabeledImages``) or named on the server's data volume
(``ServerDataset``). Both end up as the same :class:`ResolvedDataset`, built the way
:mod:`facexplain.data.faceset` builds a face set (detect, align, embed once; chips as uint8; landmarks
moved into chip pixels with :func:`~facexplain.faces.regions.landmarks_to_chip`), but from bytes that
may arrive in a request and with the service's limits, progress and cancellation.

A server folder is listed by :func:`facexplain.data.faceset.records_from_spec` (labels CSV, the CelebA
``images/`` + ``labels.csv`` layout, or one identity per sub-folder), so the CLI, training and the
service agree on what a folder means. The data root is a security boundary: absolute paths and paths
that resolve outside it (``..``, symlinks) are PERMISSION_DENIED, and so is any ServerDataset when no
root is configured.

``data_manifest_sha256`` identifies the data without storing it: the SHA-256 over the sorted lines
``id \\t sha256(image or template bytes) \\t identity \\t labels-as-sorted-JSON``. Image bytes are the
encoded file (or, for a raw tensor, its dtype, shape and data); template bytes are the float32
little-endian values. Nothing here logs images, templates or labels.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from facexplain.data.faceset import records_from_spec
from facexplain.faces.regions import landmarks_to_chip
from facexplain.pipeline import FacePipeline
from services.api.v1 import common_pb2
from services.kit.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
)
from services.kit.images import decode_encoded, decode_image
from services.kit.models import ServedModel
from services.kit.templates import template_from_proto

# (done, total, stage, message) -> None
ProgressFn = Callable[[int, int, str, str], None]
StopFn = Callable[[], bool]


class DatasetLimits(Protocol):
    """The settings the reader needs; every service that reads datasets carries these fields already.

    A Protocol rather than a settings class so the kit names no service: the directions' and the
    attributes' settings both satisfy it as they are.
    """

    @property
    def data_root(self) -> str: ...

    @property
    def max_dataset_items(self) -> int: ...

    @property
    def max_image_pixels(self) -> int: ...


@dataclass
class DatasetItem:
    """One dataset item before embedding: where its face comes from, and its labels."""

    id: str
    identity: str
    labels: dict[str, float]
    image: common_pb2.Image | None = None  # inline image
    path: Path | None = None  # server file
    template: common_pb2.Template | None = None  # inline template


@dataclass
class ResolvedDataset:
    """The usable items of a dataset, aligned by index, in the served FR model's template space."""

    name: str
    ids: list[str]
    identities: list[str]
    labels: list[dict[str, float]]
    templates: torch.Tensor  # (n, D) float32, raw (or as the caller sent them)
    chips: torch.Tensor | None  # (n, 3, S, S) uint8 when every item is an image
    landmarks: torch.Tensor | None  # (n, 68, 2) float32 chip pixels, with chips
    manifest_sha256: str
    n_given: int  # items in the dataset (after max_items)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item id, reason): no face, unreadable
    params: dict[str, str] = field(default_factory=dict)  # how the dataset was chosen, for the set's params

    def __len__(self) -> int:
        return len(self.ids)


def _clean_labels(labels: dict[str, float], item_id: str = "") -> dict[str, float]:
    """Labels with NaN (the CSV and face-set marker for "unknown") left out, as a missing key is; an
    infinite label is no measurement at all and would turn a regression's fit into NaN, so it is refused."""
    out: dict[str, float] = {}
    for k, v in labels.items():
        x = float(v)
        if math.isinf(x):
            raise InvalidArgument(f"dataset item {item_id!r}: label {k!r} is {x}; labels are finite (NaN = unknown)")
        if not math.isnan(x):
            out[str(k)] = x
    return out


def _template_bytes(t: common_pb2.Template) -> bytes:
    return np.asarray(list(t.values), dtype="<f4").tobytes()


def _image_digest(image: common_pb2.Image) -> str:
    kind = image.WhichOneof("data")
    if kind == "tensor":
        t = image.tensor
        h = hashlib.sha256(f"tensor:{t.dtype}:{list(t.shape)}:".encode())
        h.update(t.data)
        return h.hexdigest()
    return hashlib.sha256(image.encoded).hexdigest()


def manifest_sha256(entries: list[tuple[str, str, str, dict[str, float]]]) -> str:
    """SHA-256 over sorted ``(item id, content sha256, identity, labels)`` lines (see the module docstring)."""
    h = hashlib.sha256()
    for item_id, digest, identity, labels in sorted(entries, key=lambda e: e[0]):
        h.update(f"{item_id}\t{digest}\t{identity}\t{json.dumps(labels, sort_keys=True)}\n".encode())
    return h.hexdigest()


# -- listing ----------------------------------------------------------------------------------------------


def _inline_items(items: list[common_pb2.LabeledImage]) -> list[DatasetItem]:
    out: list[DatasetItem] = []
    seen: set[str] = set()
    for i, it in enumerate(items):
        item_id = it.id or f"#{i}"
        if item_id in seen:
            raise InvalidArgument(f"dataset item id {item_id!r} occurs twice: ids must be unique within a dataset")
        seen.add(item_id)
        kind = it.WhichOneof("face")
        if kind is None:
            raise InvalidArgument(f"dataset item {item_id!r} has neither an image nor a template")
        out.append(
            DatasetItem(
                id=item_id,
                identity=it.identity,
                labels=_clean_labels(dict(it.labels), item_id),
                image=it.image if kind == "image" else None,
                template=it.template if kind == "template" else None,
            )
        )
    return out


def resolve_under_root(root_setting: str, relative: str, what: str) -> Path:
    """``relative`` inside the data root, or PERMISSION_DENIED / NOT_FOUND saying why not."""
    if not root_setting:
        raise PermissionDenied(
            "this server reads no datasets from its own disk (no data root configured: FACEXPLAIN_DATA_ROOT); "
            "send the dataset inline"
        )
    if relative.startswith(("/", "\\")) or Path(relative).is_absolute():
        raise PermissionDenied(f"{what} must be relative to the server's data root, got an absolute path")
    root = Path(root_setting).resolve()
    try:  # a name the OS refuses (too long, a component over NAME_MAX) is the caller's error, not ours
        target = (root / relative).resolve()
        if target != root and root not in target.parents:
            raise PermissionDenied(f"{what} {relative!r} leaves the server's data root")
        if not target.exists():
            raise NotFound(f"{what} {relative!r} does not exist under the server's data root")
    except OSError as exc:
        raise InvalidArgument(f"{what} is not a usable path ({exc.strerror or exc})") from None
    return target


def _server_items(ds: common_pb2.ServerDataset, settings: DatasetLimits) -> tuple[list[DatasetItem], dict[str, str]]:
    folder = resolve_under_root(settings.data_root, ds.path or ".", "dataset path")
    if not folder.is_dir():
        raise InvalidArgument(f"dataset path {ds.path!r} is not a folder")
    root = Path(settings.data_root).resolve()
    if ds.labels_file:
        labels = resolve_under_root(settings.data_root, str(Path(ds.path or ".") / ds.labels_file), "labels_file")
        spec = f"{folder},{labels}"
    elif (folder / "labels.csv").is_file() and not (folder / "images").is_dir():
        spec = f"{folder},{folder / 'labels.csv'}"
    else:
        spec = str(folder)  # identity sub-folders, or the CelebA layout (images/ + labels.csv)
    try:
        base, records, _names = records_from_spec(spec)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"dataset {ds.path!r}: {exc}") from None
    if ds.max_items < 0:
        raise InvalidArgument(f"max_items is {ds.max_items}; use 0 for all items")
    n_all = len(records)
    if ds.max_items and ds.max_items < n_all:
        if ds.sample_seed:
            gen = torch.Generator().manual_seed(int(ds.sample_seed))
            keep = sorted(torch.randperm(n_all, generator=gen)[: ds.max_items].tolist())
            records = [records[i] for i in keep]
        else:
            records = records[: ds.max_items]
    items = []
    for rec in records:
        path = rec.path.resolve()
        if root not in path.parents:  # a labels CSV naming ../ files, or a symlink out of the volume
            raise PermissionDenied(f"dataset {ds.path!r} names a file outside the server's data root")
        item_id = rec.path.relative_to(base).as_posix()
        items.append(
            DatasetItem(
                id=item_id,
                identity=rec.identity,
                labels=_clean_labels(rec.labels, item_id),
                path=path,
            )
        )
    params = {
        "dataset_source": "server",
        "dataset_path": ds.path,
        "dataset_labels_file": ds.labels_file,
        "dataset_max_items": str(ds.max_items),
        "dataset_sample_seed": str(ds.sample_seed),
        "dataset_items_in_folder": str(n_all),
    }
    return items, params


def list_items(dataset: common_pb2.Dataset, settings: DatasetLimits) -> tuple[list[DatasetItem], dict[str, str]]:
    """The dataset's items (not yet read or embedded), with the limits checked; cheap, so it runs first."""
    source = dataset.WhichOneof("source")
    if source == "inline":
        items = _inline_items(list(dataset.inline.items))
        params = {"dataset_source": "inline"}
    elif source == "server":
        items, params = _server_items(dataset.server, settings)
    else:
        raise InvalidArgument("dataset is empty: set dataset.inline or dataset.server")
    if not items:
        raise InvalidArgument("dataset holds no items")
    if len(items) > settings.max_dataset_items:
        raise ResourceExhausted(
            f"dataset of {len(items)} items exceeds the limit of {settings.max_dataset_items} "
            "(FACEXPLAIN_MAX_DATASET_ITEMS; a ServerDataset can sample fewer with max_items)"
        )
    params["dataset_name"] = dataset.name
    return items, params


# -- embedding --------------------------------------------------------------------------------------------


def check_items(items: list[DatasetItem], *, need_images: bool, method: str) -> None:
    """Reject what no amount of work can fix before any work starts."""
    if need_images:
        bad = [it.id for it in items if it.template is not None]
        if bad:
            raise InvalidArgument(
                f"{method} works on pixels and needs images, but item {bad[0]!r}"
                f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} is a template"
            )


ManifestRows = list[tuple[str, str, str, dict[str, float]]]


def _checked_template(it: DatasetItem, fr: ServedModel[FacePipeline], allow_normalized: bool) -> torch.Tensor:
    """A template item's vector, checked against the served FR model (a wrong one fails the request)."""
    assert it.template is not None
    if it.template.normalized and not allow_normalized:
        raise InvalidArgument(
            f"dataset item {it.id!r}: template is L2-normalised; send raw templates, or set normalize_templates "
            "so that every template is normalised alike"
        )
    try:
        return template_from_proto(it.template, fr.model.info.dim, fr.name, model_version=fr.version)
    except ServiceError as exc:
        raise type(exc)(f"dataset item {it.id!r}: {exc.message}") from None


def _read_image(
    it: DatasetItem, max_pixels: int, manifest: ManifestRows, skipped: list[tuple[str, str]]
) -> torch.Tensor | None:
    """An image item decoded, its digest recorded; None (and the reason in ``skipped``) for an unusable file.

    A bad *inline* image raises: it is the caller's mistake, named by its item.
    """
    if it.image is not None:
        manifest.append((it.id, _image_digest(it.image), it.identity, it.labels))
        try:
            return decode_image(it.image, max_pixels, charge=False)  # decoded and dropped in chunks
        except ServiceError as exc:
            raise type(exc)(f"dataset item {it.id!r}: {exc.message}") from None
    assert it.path is not None
    try:
        data = it.path.read_bytes()
    except OSError as exc:
        manifest.append((it.id, "unreadable", it.identity, it.labels))
        skipped.append((it.id, f"unreadable file ({exc.strerror or type(exc).__name__})"))
        return None
    manifest.append((it.id, hashlib.sha256(data).hexdigest(), it.identity, it.labels))
    try:
        return decode_encoded(data, max_pixels, charge=False)  # server-side files, decoded and dropped in chunks
    except ServiceError as exc:
        skipped.append((it.id, exc.message))
        return None


def embed_dataset(
    name: str,
    items: list[DatasetItem],
    params: dict[str, str],
    fr: ServedModel[FacePipeline],
    settings: DatasetLimits,
    *,
    need_images: bool,
    allow_normalized: bool = False,
    batch_size: int,
    progress: ProgressFn,
    stop: StopFn,
) -> ResolvedDataset:
    """Read, detect, align and embed every item (templates are checked, not embedded).

    Images without a face are skipped (``skipped``, reason recorded); so are unreadable files of a
    ServerDataset. An unreadable *inline* image is the caller's mistake and fails the request naming
    the item. ``progress(done, total, "embedding", ...)`` follows every batch; ``stop()`` is polled
    before each and ends the job with CANCELLED.
    """
    pipeline = fr.model
    info = pipeline.info
    manifest: ManifestRows = []
    rows: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
    skipped: list[tuple[str, str]] = []
    for i, it in enumerate(items):
        if it.template is None:
            continue
        rows[i] = (_checked_template(it, fr, allow_normalized), None, None)
        manifest.append((it.id, hashlib.sha256(_template_bytes(it.template)).hexdigest(), it.identity, it.labels))

    images = [i for i, it in enumerate(items) if it.template is None]
    total = len(images)
    done = 0
    if total:
        progress(0, total, "embedding", f"detecting, aligning and embedding {total} faces")
    for start in range(0, total, batch_size):
        if stop():
            raise Cancelled(f"cancelled while embedding the dataset ({done} of {total} faces done)")
        batch: list[tuple[int, torch.Tensor]] = []
        for i in images[start : start + batch_size]:
            image = _read_image(items[i], settings.max_image_pixels, manifest, skipped)
            if image is not None:
                batch.append((i, image))
        if batch:
            results = pipeline.analyze([img for _i, img in batch])
            for (i, _img), res in zip(batch, results, strict=True):
                if res is None:
                    skipped.append((items[i].id, "no face found"))
                    continue
                chip = res.chip.round().clamp(0, 255).to(torch.uint8)
                lm = landmarks_to_chip(res.face.landmarks[None].float(), info.chip_size, info.chip_padding)[0]
                rows[i] = (res.template.float().cpu(), chip, lm)
        done = min(total, start + batch_size)
        progress(done, total, "embedding", f"{done} of {total} faces embedded, {len(skipped)} skipped")
    if not rows:
        reasons = sorted({r for _id, r in skipped})
        raise FailedPrecondition(
            f"no usable face in the {len(items)} dataset items ({'; '.join(reasons)[:300] or 'none readable'})"
        )
    order = sorted(rows)
    templates = torch.stack([rows[i][0] for i in order]).float()
    chips = landmarks = None
    if need_images:
        chips = torch.stack([rows[i][1] for i in order])  # type: ignore[misc]
        landmarks = torch.stack([rows[i][2] for i in order])  # type: ignore[misc]
    params = {**params, "dataset_items": str(len(items)), "dataset_skipped": str(len(skipped))}
    return ResolvedDataset(
        name=name,
        ids=[items[i].id for i in order],
        identities=[items[i].identity for i in order],
        labels=[items[i].labels for i in order],
        templates=templates,
        chips=chips,
        landmarks=landmarks,
        manifest_sha256=manifest_sha256(manifest),
        n_given=len(items),
        skipped=skipped,
        params=params,
    )
