"""A face set: every face of a folder run once through an FR pipeline, cached on disk.

Decoder training, direction discovery and attribute recovery all need the same three things per
face: the FR model's raw template, the aligned chip the model saw, and the landmarks in chip
coordinates (for face-region masks). Detection, landmarks and alignment cost far more than a
training step (about 6 faces/s on a 2-core CPU), so they run once per (data, FR model) and the
result is cached under a key made of

* the **data manifest hash**: sha256 over every image's relative path and content hash, so a changed,
  added or removed image gives a new key (it is logged with every training run);
* the **FR model key**: what identifies the FR weights (the registry's bundle sha256 for registered
  versions), so templates of different models never mix;
* the chip geometry (size, padding).

Two FR models that share the front end (detector, landmark net, chip geometry; the SAD/FAD models
ship face-api's) see identical chips, so a second model's set can be made from the first's by
re-embedding its chips (:func:`build_faceset` with ``front_end``): seconds instead of the whole
detection pass. The shared front end is checked, not assumed: a sample of the images is run through
the new pipeline and its chips must match the stored ones.

Images with no detectable face are kept in ``failed`` with the reason, never silently dropped.
Biometric data stays on the local disk of whoever built the set; nothing here logs it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from facexplain.data.faces import FaceRecord, list_images, load_image
from facexplain.data.splits import without_sealed
from facexplain.faces.blend import blend_region, region_points
from facexplain.faces.regions import landmarks_to_chip

FACESET_FORMAT = 1


def read_labels(path: Path) -> tuple[dict[str, str], dict[str, dict[str, float]], list[str]]:
    """A labels CSV (``file, identity, <attributes>``) -> identity per file, attributes per file, names."""
    identities: dict[str, str] = {}
    attrs: dict[str, dict[str, float]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        if "file" not in fields:
            raise ValueError(f"{path}: a labels CSV needs a 'file' column (and usually 'identity'), got {fields}")
        names = [f for f in fields if f not in ("file", "identity")]
        for row in reader:
            key = row["file"]
            identities[key] = row.get("identity") or key
            try:  # an empty cell is an unknown value (NaN): the sample's ORL faces have no CelebA labels
                attrs[key] = {n: float(row[n]) if (row[n] or "").strip() else float("nan") for n in names}
            except ValueError as exc:
                raise ValueError(f"{path}: row {key!r} has a non-numeric attribute ({exc})") from None
    return identities, attrs, names


def records_from_spec(spec: str) -> tuple[Path, list[FaceRecord], list[str]]:
    """``DIR`` or ``DIR,LABELS.csv`` -> (image root, records, attribute names).

    Without a labels file, ``DIR/labels.csv`` is used if present: its ``file`` column is relative to
    ``DIR/images/`` when that folder exists (the CelebA layout), else to DIR (the bundled sample's
    ``celeba/id7201/001085.jpg``). Otherwise every image under DIR is a record whose identity is its
    folder relative to DIR (ORL's ``s1/``, ``celeba/id7399/``), or its file name when it sits in DIR itself.
    """
    parts = spec.split(",")
    if len(parts) > 2:
        raise ValueError(f"data spec {spec!r}: expected DIR or DIR,LABELS.csv")
    root = Path(parts[0]).expanduser()
    labels = Path(parts[1]).expanduser() if len(parts) == 2 else None
    if labels is None and (root / "labels.csv").is_file():
        labels = root / "labels.csv"
        if (root / "images").is_dir():
            root = root / "images"
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if labels is not None:
        if not labels.is_file():
            raise FileNotFoundError(f"labels file {labels} does not exist")
        idents, attrs, names = read_labels(labels)
        records = [FaceRecord(root / f, idents[f], attrs[f]) for f in sorted(idents) if (root / f).is_file()]
        if not records:
            raise ValueError(f"none of the {len(idents)} files named in {labels} exist under {root}")
        return root, records, names
    records = []
    for p in list_images(root):
        rel = p.relative_to(root)
        ident = rel.parent.as_posix() if rel.parent != Path(".") else rel.stem
        records.append(FaceRecord(p, ident))
    if not records:
        raise ValueError(f"no images under {root}")
    return root, records, []


def manifest_hash(root: Path, records: Sequence[FaceRecord]) -> str:
    """sha256 over (relative path, sha256 of content, identity) of every record, in sorted order."""
    h = hashlib.sha256()
    for rec in sorted(records, key=lambda r: r.path.as_posix()):
        rel = rec.path.relative_to(root).as_posix()
        content = hashlib.sha256(rec.path.read_bytes()).hexdigest()
        h.update(f"{rel}\t{content}\t{rec.identity}\n".encode())
    return h.hexdigest()


@dataclass
class FaceSet:
    """Faces found in a data set, as arrays aligned by index."""

    paths: list[str]  # relative to the data root
    identities: list[str]
    templates: torch.Tensor  # (N, d) float32, raw
    chips: torch.Tensor  # (N, 3, S, S) uint8, the aligned chips the FR model saw
    landmarks: torch.Tensor  # (N, 68, 2) float32, in chip pixel coordinates
    label_names: list[str] = field(default_factory=list)
    labels: torch.Tensor | None = None  # (N, L) float32
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: Sequence[int]) -> FaceSet:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return FaceSet(
            paths=[self.paths[i] for i in idx.tolist()],
            identities=[self.identities[i] for i in idx.tolist()],
            templates=self.templates[idx],
            chips=self.chips[idx],
            landmarks=self.landmarks[idx],
            label_names=list(self.label_names),
            labels=None if self.labels is None else self.labels[idx],
            failed=[],
            meta=dict(self.meta),
        )

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write atomically (temporary file, then rename): a crash never leaves a truncated cache."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".faceset-", suffix=".npz", dir=path.parent)
        os.close(fd)
        try:
            np.savez(
                tmp,
                paths=np.array(self.paths, dtype=str),
                identities=np.array(self.identities, dtype=str),
                templates=self.templates.numpy().astype(np.float32),
                chips=self.chips.numpy().astype(np.uint8),
                landmarks=self.landmarks.numpy().astype(np.float32),
                label_names=np.array(self.label_names, dtype=str),
                labels=(self.labels if self.labels is not None else torch.zeros(len(self), 0)).numpy(),
                failed=np.array([f"{p}\t{r}" for p, r in self.failed], dtype=str),
                meta=np.array(json.dumps(self.meta)),
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path) -> FaceSet:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FACESET_FORMAT:
                raise ValueError(f"{path}: face set format {meta.get('format')!r}, this code reads {FACESET_FORMAT}")
            labels = torch.from_numpy(z["labels"].astype(np.float32))
            return cls(
                paths=[str(p) for p in z["paths"]],
                identities=[str(i) for i in z["identities"]],
                templates=torch.from_numpy(z["templates"].copy()),
                chips=torch.from_numpy(z["chips"].copy()),
                landmarks=torch.from_numpy(z["landmarks"].copy()),
                label_names=[str(n) for n in z["label_names"]],
                labels=labels if labels.shape[1] else None,
                failed=[tuple(s.split("\t", 1)) for s in (str(f) for f in z["failed"])],  # type: ignore[misc]
                meta=meta,
            )


def relabel_faceset(fs: FaceSet, root: Path, records: Sequence[FaceRecord], label_names: Sequence[str]) -> FaceSet:
    """``fs`` with its labels taken from ``records`` (matched by path under ``root``); NaN where one is missing."""
    by_path = {rec.path.relative_to(root).as_posix(): rec for rec in records}
    missing = [p for p in fs.paths if p not in by_path]
    if missing:
        raise ValueError(f"{len(missing)} faces of the set are not in the data, e.g. {missing[0]}")
    rows = [_label_row(by_path[p], label_names) for p in fs.paths]
    return replace(fs, label_names=list(label_names), labels=_labels_tensor(rows, label_names))


def _label_row(rec: FaceRecord, label_names: Sequence[str]) -> list[float]:
    return [rec.labels.get(n, float("nan")) for n in label_names]


def _labels_tensor(rows: list[list[float]], label_names: Sequence[str]) -> torch.Tensor | None:
    return torch.tensor(rows, dtype=torch.float32) if label_names else None


def cache_key(manifest: str, fr_key: str, chip_size: int, padding: float) -> str:
    raw = json.dumps([FACESET_FORMAT, manifest, fr_key, chip_size, padding])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def build_faceset(
    root: Path,
    records: Sequence[FaceRecord],
    pipeline: Any,
    *,
    fr_key: str,
    label_names: Sequence[str] = (),
    cache_dir: Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
    on_cached: Callable[[Path], None] | None = None,
    front_end: FaceSet | Path | Literal["auto"] | None = None,
) -> FaceSet:
    """Run ``pipeline`` (a :class:`~facexplain.pipeline.FacePipeline`) over ``records`` once; reuse the cache.

    ``fr_key`` must change whenever the FR weights change (see module docstring). With ``cache_dir``
    the set is read from / written to ``cache_dir/<key>.npz``. ``front_end``, a set of the same
    images made by another FR model with the same front end (or its .npz, or ``"auto"``: the newest
    such set in ``cache_dir``, see :func:`find_front_end`), is re-embedded instead of detecting again
    (see :func:`reembed_faceset`); it is only read when the cache misses.
    """
    info = pipeline.info
    manifest = manifest_hash(root, records)
    key = cache_key(manifest, fr_key, info.chip_size, info.chip_padding)
    cached = cache_dir / f"{key}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        if on_cached is not None:
            on_cached(cached)
        return FaceSet.load(cached)
    if front_end == "auto":
        found = find_front_end(cache_dir, manifest, info.chip_size, info.chip_padding) if cache_dir else None
        if found is None and progress:
            print("no cached face set of these images to re-embed: detecting every face", flush=True)
        front_end = found
    if isinstance(front_end, Path):
        front_end = FaceSet.load(front_end)
    if isinstance(front_end, FaceSet):
        fs = reembed_faceset(front_end, pipeline, root=root, manifest=manifest, fr_key=fr_key, progress=progress)
        # the front end gives chips; labels belong to the data (a set built without its labels.csv, e.g. by
        # SAD/FAD training, is as good a front end as one built with it)
        fs = relabel_faceset(fs, root, records, label_names)
        if cached is not None:
            fs.save(cached)
        return fs

    fs = _detect_faces(root, records, pipeline, manifest, fr_key, label_names, batch_size, progress)
    if cached is not None:
        fs.save(cached)
    return fs


def _detect_faces(
    root: Path,
    records: Sequence[FaceRecord],
    pipeline: Any,
    manifest: str,
    fr_key: str,
    label_names: Sequence[str],
    batch_size: int,
    progress: bool,
) -> FaceSet:
    """The face set of ``records`` from scratch: detect, align and embed every image in batches (the
    slow path :func:`build_faceset` takes when neither the cache nor a front end has the set)."""
    info = pipeline.info
    t0 = time.perf_counter()
    paths: list[str] = []
    identities: list[str] = []
    templates: list[torch.Tensor] = []
    chips: list[torch.Tensor] = []
    landmarks: list[torch.Tensor] = []
    labels: list[list[float]] = []
    failed: list[tuple[str, str]] = []
    bar = tqdm(total=len(records), desc="embedding faces", unit="img", disable=not progress)
    for start in range(0, len(records), batch_size):
        batch = list(records[start : start + batch_size])
        images: list[torch.Tensor] = []
        ok: list[FaceRecord] = []
        for rec in batch:
            rel = rec.path.relative_to(root).as_posix()
            try:
                images.append(load_image(rec.path))
                ok.append(rec)
            except (OSError, ValueError) as exc:
                failed.append((rel, f"unreadable image: {type(exc).__name__}"))
        for rec, res in zip(ok, pipeline.analyze(images) if images else [], strict=True):
            rel = rec.path.relative_to(root).as_posix()
            if res is None:
                failed.append((rel, "no face found"))
                continue
            paths.append(rel)
            identities.append(rec.identity)
            templates.append(res.template.float())
            chips.append(res.chip.round().clamp(0, 255).to(torch.uint8))
            lm = landmarks_to_chip(res.face.landmarks[None].float(), info.chip_size, info.chip_padding)[0]
            landmarks.append(lm)
            labels.append(_label_row(rec, label_names))
        bar.update(len(batch))
    bar.close()
    if not paths:
        raise ValueError(f"no face found in any of the {len(records)} images under {root}")
    meta = {
        "format": FACESET_FORMAT,
        "root": str(root),
        "manifest_sha256": manifest,
        "fr_key": fr_key,
        "fr_model": {"name": info.name, "version": info.version},
        "chip_size": info.chip_size,
        "chip_padding": info.chip_padding,
        "images": len(records),
        "faces": len(paths),
        "failed": len(failed),
        "seconds": round(time.perf_counter() - t0, 1),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fs = FaceSet(
        paths=paths,
        identities=identities,
        templates=torch.stack(templates),
        chips=torch.stack(chips),
        landmarks=torch.stack(landmarks),
        label_names=list(label_names),
        labels=_labels_tensor(labels, label_names),
        failed=failed,
        meta=meta,
    )
    return fs


def find_front_end(cache_dir: Path, manifest: str, chip_size: int, chip_padding: float) -> Path | None:
    """A cached set of the same images at this chip geometry (any FR model), newest first; None if none.

    Only the sets' metadata is read (an .npz member is loaded on access). Augmented sets (mirrored,
    region blends) do not count: their chips are not the images' faces.
    """
    found: list[tuple[float, Path]] = []
    for path in cache_dir.glob("*.npz") if cache_dir.is_dir() else []:
        if path.name.endswith(".hflip.npz"):
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
        except (OSError, ValueError, KeyError):
            continue
        augmented = meta.get("mirrored") or meta.get("blend_regions")
        same = meta.get("manifest_sha256") == manifest and not augmented
        if same and (meta.get("chip_size"), meta.get("chip_padding")) == (chip_size, chip_padding):
            found.append((path.stat().st_mtime, path))
    return max(found)[1] if found else None


def _embed_chips_batched(
    chips_u8: torch.Tensor,
    embed_chips: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    desc: str,
    progress: bool,
) -> torch.Tensor:
    """(N, 3, S, S) uint8 chips -> (N, d) float32 templates, in batches, without gradients."""
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, chips_u8.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
            out.append(embed_chips(chips_u8[start : start + batch_size].float()).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


# A re-made chip may differ from the stored one by the uint8 rounding of the stored copy and by
# kernel-level float differences: both well under one grey level on average. A different detector or
# landmark net moves the chip by pixels, tens of grey levels on edges.
FRONT_END_CHIP_TOLERANCE = 1.0


def reembed_faceset(
    base: FaceSet,
    pipeline: Any,
    *,
    root: Path,
    manifest: str,
    fr_key: str,
    verify: int = 6,
    batch_size: int = 64,
    progress: bool = True,
) -> FaceSet:
    """``base``'s faces (chips, landmarks, labels, failures) with templates of ``pipeline``'s FR model.

    Refused with ``ValueError`` unless ``base`` was built from the same images (``manifest``) at the
    pipeline's chip geometry, and unless the pipeline re-makes ``base``'s chips: the first ``verify``
    faces are detected, landmarked and aligned again and must agree with the stored chips to within
    :data:`FRONT_END_CHIP_TOLERANCE` grey levels (mean absolute difference).
    """
    info = pipeline.info
    meta = base.meta
    if meta.get("manifest_sha256") != manifest:
        raise ValueError("the front-end face set was built from other images than the data given (manifest differs)")
    geometry = (int(meta.get("chip_size", -1)), float(meta.get("chip_padding", -1.0)))
    if geometry != (info.chip_size, float(info.chip_padding)):
        raise ValueError(
            f"the front-end face set has chips of size/padding {geometry}, "
            f"the FR model expects ({info.chip_size}, {info.chip_padding})"
        )
    sample = list(range(min(verify, len(base))))
    results = pipeline.analyze([load_image(root / base.paths[i]) for i in sample]) if sample else []
    for i, res in zip(sample, results, strict=True):
        diff = float("inf") if res is None else float((res.chip.cpu() - base.chips[i].float()).abs().mean())
        if diff > FRONT_END_CHIP_TOLERANCE:
            raise ValueError(
                f"the FR model's front end does not re-make the face set's chips (face {i}: mean difference "
                f"{diff:.2f} grey levels > {FRONT_END_CHIP_TOLERANCE}); build the face set from the images instead"
            )
    t0 = time.perf_counter()
    templates = _embed_chips_batched(
        base.chips, pipeline.embed_chips, batch_size=batch_size, desc="re-embedding chips", progress=progress
    )
    new_meta = {
        **meta,
        "fr_key": fr_key,
        "fr_model": {"name": info.name, "version": info.version},
        "front_end_from": {
            "fr_key": meta.get("fr_key"),
            "fr_model": meta.get("fr_model"),
            "verified_faces": len(sample),
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return FaceSet(
        paths=list(base.paths),
        identities=list(base.identities),
        templates=templates,
        chips=base.chips.clone(),
        landmarks=base.landmarks.clone(),
        label_names=list(base.label_names),
        labels=None if base.labels is None else base.labels.clone(),
        failed=list(base.failed),
        meta=new_meta,
    )


def mirror_faceset(
    faces: FaceSet,
    embed_chips: Callable[[torch.Tensor], torch.Tensor],
    *,
    cache_path: Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> FaceSet:
    """The same faces mirrored left-right: flipped chips, mirrored landmarks, and the FR model's template
    *of the flipped chip* (re-embedded, not copied: a mirrored face is a new image to the FR model).

    Why: a decoder trained on a few thousand faces overfits its training identities; every mirrored
    chip with its own template is a new, self-consistent (template, image) pair of the same identity,
    doubling the training data at the cost of one embedding pass (cached at ``cache_path``). Landmark
    indices are not permuted (point 36 stays at index 36, now on the other side): the face-region mask
    only uses the set of points 17..67, which mirroring maps onto itself. Labels are copied as they
    are: side-dependent labels (yaw, "left eye closed") need flipping by the caller.
    """
    if cache_path is not None and cache_path.is_file():
        cached = FaceSet.load(cache_path)
        if cached.paths == [f"{p}#hflip" for p in faces.paths]:
            return cached
    chips = torch.flip(faces.chips, dims=[-1])
    size = chips.shape[-1]
    landmarks = faces.landmarks.clone()
    landmarks[..., 0] = (size - 1) - landmarks[..., 0]
    templates = _embed_chips_batched(
        chips, embed_chips, batch_size=batch_size, desc="embedding mirrored chips", progress=progress
    )
    mirrored = FaceSet(
        paths=[f"{p}#hflip" for p in faces.paths],
        identities=list(faces.identities),
        templates=templates if len(faces) else torch.zeros(0, faces.templates.shape[1]),
        chips=chips,
        landmarks=landmarks,
        label_names=list(faces.label_names),
        labels=None if faces.labels is None else faces.labels.clone(),
        failed=[],
        meta={**faces.meta, "mirrored": True},
    )
    if cache_path is not None:
        mirrored.save(cache_path)
    return mirrored


def drop_sealed(faces: FaceSet) -> tuple[FaceSet, int]:
    """The face set without the faces of sealed identities (:func:`facexplain.data.splits.sealed_identities`),
    order kept, failures kept; and how many sealed identities it dropped. For the training of shipped
    models (``exclude_sealed``), before their identity split."""
    keep = without_sealed(faces.identities)
    dropped = len(set(faces.identities)) - len({faces.identities[k] for k in keep})
    return replace(faces.subset(keep), failed=list(faces.failed)), dropped


def concat_facesets(first: FaceSet, second: FaceSet) -> FaceSet:
    """Both sets' faces, ``first``'s then ``second``'s (same FR model and chip geometry required)."""
    if first.templates.shape[1:] != second.templates.shape[1:] or first.chips.shape[1:] != second.chips.shape[1:]:
        raise ValueError("face sets of different template dimension or chip size cannot be joined")
    if first.label_names != second.label_names:
        raise ValueError(f"face sets with different labels: {first.label_names} vs {second.label_names}")
    labels = None
    if first.labels is not None and second.labels is not None:
        labels = torch.cat([first.labels, second.labels])
    return FaceSet(
        paths=first.paths + second.paths,
        identities=first.identities + second.identities,
        templates=torch.cat([first.templates, second.templates]),
        chips=torch.cat([first.chips, second.chips]),
        landmarks=torch.cat([first.landmarks, second.landmarks]),
        label_names=list(first.label_names),
        labels=labels,
        failed=first.failed + second.failed,
        meta=dict(first.meta),
    )


def blend_faceset(
    faces: FaceSet,
    embed_chips: Callable[[torch.Tensor], torch.Tensor],
    *,
    groups: Sequence[str],
    seed: int,
    regions: Sequence[str] = ("eyes", "nose", "lower_face"),
    cache_path: Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> FaceSet:
    """Each face with one facial region pasted in from another face of its group, re-embedded.

    Why: a decoder trained on natural faces only learns how features co-vary across people (a nose
    comes with a face shape, a skin tone, a gender), so a template change caused by one region is
    rendered all over the face. The region blends of direction discovery
    (:mod:`facexplain.faces.blend`) are (template, image) pairs in which exactly one region differs
    from a real face; training on them shows the decoder that such a template change is a local image
    change. Index-aligned with ``faces`` (face ``i`` is the face donor of blend ``i``) so it can be
    added to the training split like the mirrored faces; the region donor and the region are drawn
    with a generator seeded by ``seed``, the donor from faces of the same ``groups`` label (pass the
    split side, so no blend of a training face carries a test identity's region). A group of one face
    keeps that face unblended. Landmarks and labels stay the face donor's (the landmarks serve the
    loss's face-region mask; a pasted region's own labels, e.g. Smiling with a lower face, do not follow).
    """
    if len(groups) != len(faces):
        raise ValueError(f"{len(faces)} faces but {len(groups)} group labels")
    if not regions:
        raise ValueError("need at least one region to blend")
    for region in regions:
        region_points(region)  # unknown names fail here, before any work
    names = [f"{p}#blend{seed}" for p in faces.paths]
    if cache_path is not None and cache_path.is_file():
        cached = FaceSet.load(cache_path)
        if cached.paths == names and cached.meta.get("blend_regions") == list(regions):
            return cached
    gen = torch.Generator().manual_seed(int(seed))
    donor = torch.arange(len(faces))
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for idx in members.values():
        if len(idx) < 2:
            continue
        pool = torch.tensor(idx)
        pick = torch.randint(0, len(idx) - 1, (len(idx),), generator=gen)
        own = torch.arange(len(idx))
        donor[pool] = pool[pick + (pick >= own).long()]  # any other face of the group
    which = torch.randint(0, len(regions), (len(faces),), generator=gen)
    chips = faces.chips.clone()
    for r, region in enumerate(regions):
        sel = torch.nonzero((which == r) & (donor != torch.arange(len(faces)))).flatten()
        for s in range(0, len(sel), batch_size):
            fi = sel[s : s + batch_size]
            ri = donor[fi]
            made = blend_region(faces.chips[fi], faces.landmarks[fi], faces.chips[ri], faces.landmarks[ri], region)
            chips[fi] = made.round().clamp(0, 255).to(torch.uint8)
    templates = _embed_chips_batched(
        chips, embed_chips, batch_size=batch_size, desc="embedding region blends", progress=progress
    )
    blended = FaceSet(
        paths=names,
        identities=list(faces.identities),
        templates=templates if len(faces) else torch.zeros(0, faces.templates.shape[1]),
        chips=chips,
        landmarks=faces.landmarks.clone(),
        label_names=list(faces.label_names),
        labels=None if faces.labels is None else faces.labels.clone(),
        failed=[],
        meta={
            **faces.meta,
            "blend_regions": list(regions),
            "blend_seed": int(seed),
            "blend_donor": donor.tolist(),  # region donor of each face (itself: unblended)
            "blend_region": which.tolist(),  # index into blend_regions
        },
    )
    if cache_path is not None:
        blended.save(cache_path)
    return blended
