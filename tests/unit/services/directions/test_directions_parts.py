"""The directions service's parts without a server: bundles, pair sampling, datasets, plans, jobs."""

from __future__ import annotations

import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from facexplain.artifacts.bundle import BundleError
from facexplain.artifacts.direction_set import (
    DirectionSetData,
    EquivarianceMapData,
    EquivarianceSetData,
    bundle_tags,
    load_direction_bundle,
    save_direction_set,
    save_equivariance_set,
)
from facexplain.faces.blend import iter_blend_batches, n_ordered_pairs, pair_at, sample_pairs
from services.api.v1 import common_pb2, directions_pb2
from services.directions import discovery
from services.directions.sets import check_transform, transform_distance
from services.directions.settings import DirectionsSettings
from services.kit.datasets import list_items, manifest_sha256, resolve_under_root
from services.kit.errors import (
    Cancelled,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from services.kit.jobs import run_job

REPO = Path(__file__).resolve().parents[4]
SAMPLE = REPO / "data" / "sample"


def _settings(**kw: Any) -> DirectionsSettings:
    return DirectionsSettings(registry_uri="", **kw)


# -- bundles --------------------------------------------------------------------------------------------


def _direction_set(rng: np.random.Generator) -> DirectionSetData:
    return DirectionSetData(
        set_id="centroid-abc",
        method="centroid",
        target="Smiling",
        fr_name="facexplain-fr-dlib128",
        fr_version="3",
        vectors=rng.normal(size=(2, 8)).astype(np.float32),
        names=["centroid/Smiling=1", "centroid/Smiling=2"],
        eigenvalues=[0.0, 0.0],
        explained_variance=[0.0, 0.0],
        stddev=[0.1, 0.2],
        data_manifest_sha256="a" * 64,
        seed=4,
        n_items=30,
        metrics={"cosine_ref_pos": 0.9},
        params={"label": "Smiling", "normalize_templates": "false"},
        centroid_names=["Smiling=0", "Smiling=1", "Smiling=2"],
        centroid_values=[0.0, 1.0, 2.0],
        centroid_counts=[10, 12, 8],
        centroids=rng.normal(size=(3, 8)).astype(np.float32),
    )


def test_direction_set_bundle_round_trip_and_tamper_check(tmp_path: Path) -> None:
    data = _direction_set(np.random.default_rng(0))
    meta = save_direction_set(tmp_path / "b", data, name="facexplain-directions")
    assert meta["kind"] == "direction_set" and meta["template_dim"] == 8
    assert meta["fr_model"] == {"name": "facexplain-fr-dlib128", "version": "3"}
    tags = bundle_tags(meta)
    assert tags["method"] == "centroid" and tags["direction_set_id"] == "centroid-abc"
    assert tags["data_manifest_sha256"] == "a" * 64 and tags["seed"] == "4"
    back = load_direction_bundle(tmp_path / "b")
    assert isinstance(back, DirectionSetData)
    np.testing.assert_array_equal(back.vectors, data.vectors)
    assert back.centroids is not None
    np.testing.assert_array_equal(back.centroids, data.centroids)  # type: ignore[arg-type]
    for field in ("names", "stddev", "metrics", "params", "centroid_names", "centroid_counts", "created_at", "seed"):
        assert getattr(back, field) == getattr(data, field), field
    # a changed vector file is caught by its checksum, by name
    arr = np.load(tmp_path / "b" / "vectors.npy")
    np.save(tmp_path / "b" / "vectors.npy", arr + 1)
    with pytest.raises(BundleError, match=r"vectors\.npy"):
        load_direction_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="not empty"):
        save_direction_set(tmp_path / "b", data, name="x")


def test_equivariance_bundle_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)

    def one(kind: str, **kw: float) -> EquivarianceMapData:
        return EquivarianceMapData(
            kind=kind,
            angle_degrees=kw.get("angle", 0.0),
            dx=kw.get("dx", 0.0),
            dy=0.0,
            scale=kw.get("scale", 0.0),
            forward=rng.normal(size=(4, 4)).astype(np.float32),
            forward_bias=rng.normal(size=4).astype(np.float32),
            inverse=rng.normal(size=(4, 4)).astype(np.float32),
            inverse_bias=rng.normal(size=4).astype(np.float32),
            forward_cosine=0.9,
            inverse_cosine=0.95,
            baseline_cosine=0.8,
        )

    data = EquivarianceSetData(
        "equivariance-1", "fr", "1", [one("rotation", angle=10), one("scale", scale=1.2)], "b" * 64
    )
    save_equivariance_set(tmp_path / "e", data, name="facexplain-equivariance")
    back = load_direction_bundle(tmp_path / "e")
    assert isinstance(back, EquivarianceSetData) and back.dim == 4
    assert [m.kind for m in back.maps] == ["rotation", "scale"] and back.maps[0].angle_degrees == 10
    for a, b in zip(back.maps, data.maps, strict=True):
        np.testing.assert_array_equal(a.inverse, b.inverse)
        np.testing.assert_array_equal(a.forward_bias, b.forward_bias)
    bad = EquivarianceSetData("x", "fr", "1", [one("shear")], "c" * 64)
    with pytest.raises(BundleError, match="shear"):
        save_equivariance_set(tmp_path / "bad", bad, name="x")


# -- pair sampling --------------------------------------------------------------------------------------


def test_sample_pairs_is_seeded_sorted_and_bounded() -> None:
    assert sample_pairs(6, 30, seed=1) is None  # all 30 pairs fit
    a = sample_pairs(6, 12, seed=1)
    b = sample_pairs(6, 12, seed=1)
    assert a is not None and b is not None and torch.equal(a, b)
    assert not torch.equal(a, sample_pairs(6, 12, seed=2))  # type: ignore[arg-type]
    assert a.numel() == 12 and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 12
    assert int(a.min()) >= 0 and int(a.max()) < n_ordered_pairs(6)
    walked = torch.cat([torch.stack(p, dim=1) for p in iter_blend_batches(6, 5, pairs=a)])
    face, region = pair_at(a, 6)
    assert torch.equal(walked, torch.stack([face, region], dim=1)) and bool((face != region).all())
    with pytest.raises(ValueError, match="pair numbers"):
        list(iter_blend_batches(3, 2, pairs=torch.tensor([6])))


# -- datasets -------------------------------------------------------------------------------------------


def test_server_paths_stay_under_the_data_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "faces").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    assert resolve_under_root(str(root), "faces", "p") == (root / "faces").resolve()
    for bad in ("../outside", "faces/../../outside", "escape", "/etc"):
        with pytest.raises(PermissionDenied):
            resolve_under_root(str(root), bad, "p")
    with pytest.raises(PermissionDenied, match="FACEXPLAIN_DATA_ROOT"):
        resolve_under_root("", "faces", "p")
    with pytest.raises(NotFound):
        resolve_under_root(str(root), "missing", "p")


def test_server_dataset_listing_sampling_and_limits(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(SAMPLE / "celeba", root / "celeba")
    settings = _settings(data_root=str(root), max_dataset_items=10)
    ds = common_pb2.Dataset(name="c", server=common_pb2.ServerDataset(path="celeba", max_items=5))
    items, params = list_items(ds, settings)
    assert [it.id for it in items] == sorted(it.id for it in items)[:5]  # the first 5, in path order
    assert items[0].identity == "id7201" and params["dataset_source"] == "server"
    ds.server.sample_seed = 9
    a, _ = list_items(ds, settings)
    b, _ = list_items(ds, settings)
    assert [x.id for x in a] == [x.id for x in b] and len(a) == 5
    ds.server.max_items = 0
    with pytest.raises(ResourceExhausted, match="FACEXPLAIN_MAX_DATASET_ITEMS"):
        list_items(ds, settings)  # 24 images > 10
    # a labels CSV naming a file outside the root is refused
    (root / "celeba" / "labels.csv").write_text("file,identity,Smiling\n../../x.jpg,a,1\n")
    (tmp_path / "x.jpg").write_bytes((SAMPLE / "celeba" / "id7201" / "001085.jpg").read_bytes())
    ds.server.labels_file = "labels.csv"
    with pytest.raises(PermissionDenied, match="outside"):
        list_items(ds, settings)


def test_inline_dataset_checks_and_manifest() -> None:
    settings = _settings()
    t = common_pb2.Template(values=[0.1] * 4)
    item = common_pb2.LabeledImage(id="a", template=t)
    dup = common_pb2.Dataset(inline=common_pb2.LabeledImages(items=[item, item]))
    with pytest.raises(InvalidArgument, match="twice"):
        list_items(dup, settings)
    with pytest.raises(InvalidArgument, match="neither"):
        list_items(
            common_pb2.Dataset(inline=common_pb2.LabeledImages(items=[common_pb2.LabeledImage(id="x")])), settings
        )
    with pytest.raises(InvalidArgument, match="dataset is empty"):
        list_items(common_pb2.Dataset(name="n"), settings)
    entries = [("b", "2", "p", {"y": 1.0, "x": 0.0}), ("a", "1", "q", {})]
    assert manifest_sha256(entries) == manifest_sha256(list(reversed(entries)))
    assert manifest_sha256(entries) != manifest_sha256([entries[0], ("a", "1", "q", {"x": 1.0})])


# -- plans ----------------------------------------------------------------------------------------------


def test_ssi_plan_defaults_and_limits() -> None:
    settings = _settings(default_ssi_pairs=100, max_ssi_pairs=50, max_regions=3)
    plan = discovery.plan_ssi(directions_pb2.DiscoverSSIRequest(), settings, 128)
    assert [r.name for r in plan.regions] == ["eyes", "nose", "lower_face"]
    assert (plan.n_components, plan.feather, plan.max_pairs, plan.batch_size) == (5, 4.0, 50, settings.batch_size)
    req = directions_pb2.DiscoverSSIRequest(
        feather_sigma=0.0, regions=[directions_pb2.Region(landmark_indices=[1, 2, 3])]
    )
    plan = discovery.plan_ssi(req, settings, 128)
    assert plan.feather == 0.0 and plan.regions[0].name == "custom0" and plan.regions[0].points == ((1, 2, 3),)
    for bad, error in (
        (directions_pb2.DiscoverSSIRequest(max_pairs=51), ResourceExhausted),
        (directions_pb2.DiscoverSSIRequest(regions=[directions_pb2.Region(name="nose")] * 4), ResourceExhausted),
        (directions_pb2.DiscoverSSIRequest(regions=[directions_pb2.Region(name="nose")] * 2), InvalidArgument),
        (directions_pb2.DiscoverSSIRequest(feather_sigma=-1), InvalidArgument),
        (directions_pb2.DiscoverSSIRequest(n_components=129), InvalidArgument),
        (directions_pb2.DiscoverSSIRequest(batch_size=settings.max_batch_size + 1), ResourceExhausted),
    ):
        with pytest.raises(error):
            discovery.plan_ssi(bad, settings, 128)


def test_transforms_are_checked_and_matched_by_kind() -> None:
    t = directions_pb2.Transform
    rot = check_transform(t(kind=directions_pb2.TRANSFORM_KIND_ROTATION, angle_degrees=10, dx=0.5), "t")
    assert (rot.kind, rot.angle_degrees, rot.dx) == ("rotation", 10.0, 0.0)  # only its kind's fields count
    assert rot.geometric(150).angle == 10.0
    shift = check_transform(t(kind=directions_pb2.TRANSFORM_KIND_TRANSLATION, dx=0.1, dy=-0.2), "t").geometric(150)
    assert (shift.tx, shift.ty) == pytest.approx((15.0, -30.0))
    for bad in (
        t(),
        t(kind=directions_pb2.TRANSFORM_KIND_SCALE, scale=0),
        t(kind=directions_pb2.TRANSFORM_KIND_ROTATION, angle_degrees=float("nan")),
    ):
        with pytest.raises(InvalidArgument):
            check_transform(bad, "t")
    fitted = EquivarianceMapData("rotation", 15.0, 0, 0, 0, *(np.zeros(1),) * 4, 0, 0, 0)  # type: ignore[arg-type]
    assert transform_distance(rot, fitted) == 5.0
    scale = check_transform(t(kind=directions_pb2.TRANSFORM_KIND_SCALE, scale=1.1), "t")
    assert transform_distance(scale, fitted) == float("inf")


# -- jobs -----------------------------------------------------------------------------------------------


class _Context:
    """The two things a job asks of a gRPC context."""

    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active

    def time_remaining(self) -> float | None:
        return None


def test_job_streams_progress_then_results() -> None:
    def work(job: Any) -> list[directions_pb2.DiscoveryEvent]:
        for k in range(3):
            job.progress(k + 1, 3, "stage", force=True)
        return [directions_pb2.DiscoveryEvent(result=directions_pb2.DirectionSet(id="x"))]

    events = list(run_job(_Context(), work, "t"))  # type: ignore[arg-type]
    assert [e.WhichOneof("event") for e in events] == ["progress"] * 3 + ["result"]
    assert [e.progress.done for e in events[:3]] == [1, 2, 3]


def test_job_stops_when_the_client_cancels() -> None:
    ctx = _Context()
    seen: queue.Queue[int] = queue.Queue()

    def work(job: Any) -> list[directions_pb2.DiscoveryEvent]:
        for k in range(1000):
            if job.stop():
                seen.put(k)
                raise Cancelled(f"stopped at batch {k}")
            job.progress(k, 1000, "stage", force=True)
            time.sleep(0.01)
        return []

    stream = run_job(ctx, work, "t")  # type: ignore[arg-type]
    next(stream)
    threading.Timer(0.05, lambda: setattr(ctx, "active", False)).start()
    with pytest.raises(Cancelled, match="stopped at batch"):
        for _ in stream:
            pass
    assert seen.get(timeout=5) < 1000
