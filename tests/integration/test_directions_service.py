"""The directions service over real gRPC, with the session's real MLflow registry, FR model and decoder.

The registry (conftest.py, shared with the decoding tests) holds the default FR model as
``facexplain-fr-dlib128`` v1 and the demo decoder trained for it as ``facexplain-dfd-dlib128`` v1, both
champion. One directions server follows both aliases and reads ServerDatasets under a temporary data
root holding a few faces of data/sample; a second ("bare") one has no decoder and no data root. Work
is kept tiny (6 faces, a dozen blend pairs per region) so the module runs in seconds of compute.

Rejections go over a plain channel (no retries, no wait-for-ready) so the status a test sees is the
server's own answer, and each is followed by a good request: a bad input never takes a server down.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from cli.launcher import REPO, RunningMlflow, RunningService, start_service
from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
from facexplain.artifacts.direction_set import DirectionSetData, bundle_tags, save_direction_set
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL
from registry import CHAMPION, Registry, RegistryNotFound, VersionInfo
from sdk.client import (
    DirectionsClient,
    image_from_path,
    inline_dataset,
    labeled_image,
    server_dataset,
    wait_ready,
)
from services.api.v1 import common_pb2, directions_pb2, directions_pb2_grpc
from tests.service_env import registry_service_env

pytestmark = pytest.mark.integration

SAMPLE = REPO / "data" / "sample" / "celeba"
FACE_A = SAMPLE / "id7201" / "001085.jpg"
IDENTITIES = ("id7201", "id7202", "id7205", "id7206", "id7207", "id7209")
DIM = 128
OUT_SIZE = 64  # the demo decoder's rendering size
MAX_ALPHAS = 9
MAX_ITEMS = 40
MAX_PAIRS = 60
MIN_LABEL_ITEMS = 3
DIRECTIONS = "facexplain-directions"
FR_V1 = common_pb2.ModelRef(name=DEFAULT_FR_MODEL, version="1")


# -- helpers --------------------------------------------------------------------------------------------


def _env(uri: str, cache: Path, **extra: str) -> dict[str, str]:
    return registry_service_env(
        uri,
        cache,
        FACEXPLAIN_MAX_ALPHAS=str(MAX_ALPHAS),
        FACEXPLAIN_MAX_DATASET_ITEMS=str(MAX_ITEMS),
        FACEXPLAIN_MAX_SSI_PAIRS=str(MAX_PAIRS),
        FACEXPLAIN_MIN_LABEL_ITEMS=str(MIN_LABEL_ITEMS),
        FACEXPLAIN_BATCH_SIZE="6",
        FACEXPLAIN_MAX_BATCH_SIZE="16",
        **extra,
    )


def _rejected(svc: RunningService, method: str, request: Any) -> grpc.RpcError:
    """Call ``method`` once without retries (draining a stream); it must fail. Returns the error."""
    ch = grpc.insecure_channel(svc.address)
    stub = directions_pb2_grpc.DirectionsServiceStub(ch)
    with ch, pytest.raises(grpc.RpcError) as info:
        result = getattr(stub, method)(request, timeout=120)
        if hasattr(result, "__next__"):  # a streaming call fails while it is read
            for _ in result:
                pass
    err = info.value
    assert isinstance(err, grpc.RpcError)
    return err


def _png(image: common_pb2.Image) -> np.ndarray:
    with Image.open(io.BytesIO(image.encoded)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _template(values: Any, model: common_pb2.ModelRef = FR_V1) -> common_pb2.Template:
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    return common_pb2.Template(values=v.tolist(), dim=int(v.size), model=model)


def _vectors(s: directions_pb2.DirectionSet) -> np.ndarray:
    return np.array([list(d.vector) for d in s.directions], dtype=np.float32)


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def _versions(registry: Registry, name: str) -> list[VersionInfo]:
    try:
        return registry.versions(name)
    except RegistryNotFound:
        return []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _synthetic(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` template-like vectors and two known orthonormal directions u, w.

    The vectors vary mostly within a 4-D subspace holding u and w (spread 0.05) plus a little isotropic
    noise (0.002), as real templates vary along few axes: enough for a fit from a dozen items to find
    u and w in 128 dimensions.
    """
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=DIM)
    centre *= 1.5 / np.linalg.norm(centre)  # raw templates of the default model have norm ~1.5
    basis, _ = np.linalg.qr(rng.normal(size=(DIM, 4)))
    u, w = basis[:, 0], basis[:, 1]
    x = centre + 0.05 * rng.normal(size=(n, 4)) @ basis.T + 0.002 * rng.normal(size=(n, DIM))
    return x, u, w


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """faces/<identity>/<one image> for 6 people, labelled/ with a labels.csv, and a folder outside the root."""
    base = tmp_path_factory.mktemp("directions-data")
    root = base / "root"
    for ident in IDENTITIES:
        (root / "faces" / ident).mkdir(parents=True)
        first = sorted((SAMPLE / ident).iterdir())[0]
        shutil.copy(first, root / "faces" / ident / first.name)
    labelled = root / "labelled"
    labelled.mkdir()
    rows = ["file,identity,Smiling"]
    for k, ident in enumerate(IDENTITIES):
        first = sorted((SAMPLE / ident).iterdir())[0]
        shutil.copy(first, labelled / f"{ident}.jpg")
        rows.append(f"{ident}.jpg,{ident},{k % 2}")
    (labelled / "labels.csv").write_text("\n".join(rows) + "\n")
    (base / "outside").mkdir()
    shutil.copy(FACE_A, base / "outside" / "a.jpg")
    return root


@pytest.fixture(scope="module")
def svc(
    mlflow: RunningMlflow, decoder_v1: VersionInfo, data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    logs = tmp_path_factory.mktemp("directions-svc")
    env = _env(mlflow.uri, logs / "cache", FACEXPLAIN_DATA_ROOT=str(data_root))
    service = start_service("directions", logs, env=env, timeout=300)
    yield service
    code = service.stop()
    assert code == 0, f"directions service exit {code}; log tail:\n{service.log_text()[-2000:]}"
    # biometric data never reaches the log: no run of numbers that could be a template
    assert not re.search(r"(-?\d+\.\d+,\s*){8,}", service.log_text())


@pytest.fixture(scope="module")
def bare(
    mlflow: RunningMlflow, fr_v1: VersionInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    """Same registry, but no decoder configured and no data root."""
    logs = tmp_path_factory.mktemp("directions-bare")
    env = _env(mlflow.uri, logs / "cache", FACEXPLAIN_DECODER_MODEL_NAME="", FACEXPLAIN_DATA_ROOT="")
    service = start_service("directions", logs, env=env, timeout=300)
    yield service
    assert service.stop() == 0


@pytest.fixture(scope="module")
def client(svc: RunningService) -> Iterator[DirectionsClient]:
    c = DirectionsClient(svc.address, timeout=300)
    wait_ready(c.channel, 30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ssi_events(client: DirectionsClient) -> list[directions_pb2.DiscoveryEvent]:
    """SSI on the 6 faces of the data root: nose and a custom triangle region, 12 sampled pairs each."""
    req = directions_pb2.DiscoverSSIRequest(
        dataset=server_dataset("faces", name="six-faces"),
        regions=[directions_pb2.Region(name="nose"), directions_pb2.Region(name="tri", landmark_indices=[36, 45, 57])],
        n_components=3,
        max_pairs=12,
        batch_size=6,
        seed=7,
    )
    return list(client.discover_ssi(req))


@pytest.fixture(scope="module")
def ssi_sets(ssi_events: list[directions_pb2.DiscoveryEvent]) -> list[directions_pb2.DirectionSet]:
    return [e.result for e in ssi_events if e.WhichOneof("event") == "result"]


@pytest.fixture(scope="module")
def probe(client: DirectionsClient) -> common_pb2.Template:
    """FACE_A's real template under the served FR model (an inline step of 0 returns the probe)."""
    inline = directions_pb2.Direction(name="e1", vector=[1.0] + [0.0] * (DIM - 1))
    resp = client.traverse(common_pb2.Probe(image=image_from_path(FACE_A)), inline=inline, alphas=[0.0])
    assert (resp.probe.model.name, resp.probe.model.version) == (DEFAULT_FR_MODEL, "1")
    return resp.probe


@pytest.fixture(scope="module")
def centroid_set(client: DirectionsClient) -> tuple[directions_pb2.DirectionSet, np.ndarray]:
    """A registered centroid set on 12 synthetic templates: Smiling=1 sits 0.3 further along u."""
    x, u, _w = _synthetic(1, 12)
    smiling = np.arange(12) % 2
    x = x + 0.3 * smiling[:, None] * u
    items = [
        labeled_image(f"t{i}", template=_template(x[i]), identity=f"p{i}", labels={"Smiling": float(smiling[i])})
        for i in range(12)
    ]
    req = directions_pb2.DiscoverCentroidRequest(
        dataset=inline_dataset(items, "synthetic"), label="Smiling", positive_values=[1.0], reference_value=0.0
    )
    req.register = True
    result = client.run(client.discover_centroid(req))
    assert len(result.sets) == 1
    return result.sets[0], u


def _good_call(client: DirectionsClient, probe: common_pb2.Template) -> None:
    """A cheap request that must succeed: the server is still up and serving."""
    inline = directions_pb2.Direction(name="e2", vector=[0.0, 1.0] + [0.0] * (DIM - 2))
    resp = client.traverse(common_pb2.Probe(template=probe), inline=inline, alphas=[0.0, 0.5], timeout=60)
    assert len(resp.templates) == 2


# -- status ---------------------------------------------------------------------------------------------


def test_model_status_lists_fr_model_and_decoder(client: DirectionsClient, mlflow: RunningMlflow) -> None:
    status = client.model_status()
    kinds = {m.kind: m for m in status.models}
    fr, decoder = kinds["embedder"], kinds["decoder"]
    assert (fr.model.name, fr.model.version, fr.model.alias, fr.serving) == (DEFAULT_FR_MODEL, "1", CHAMPION, True)
    assert (decoder.model.name, decoder.model.version) == (DEFAULT_DECODER_MODEL, "1")
    assert decoder.metadata["fr_model_name"] == DEFAULT_FR_MODEL and decoder.metadata["fr_model_version"] == "1"
    assert status.registry_reachable and status.registry_uri == mlflow.uri and status.last_reload_error == ""
    reload = client.reload()
    assert reload.error == "" and not reload.changed


# -- discovery ------------------------------------------------------------------------------------------


def test_ssi_streams_progress_and_returns_unit_directions(
    ssi_events: list[directions_pb2.DiscoveryEvent], ssi_sets: list[directions_pb2.DirectionSet]
) -> None:
    kinds = [e.WhichOneof("event") for e in ssi_events]
    assert kinds[-2:] == ["result", "result"] and set(kinds[:-2]) == {"progress"}  # progress first, then results
    progress = [e.progress for e in ssi_events if e.WhichOneof("event") == "progress"]
    embedding = [p for p in progress if p.stage == "embedding"]
    assert embedding and embedding[-1].done == embedding[-1].total == 6
    for region in ("nose", "tri"):
        steps = [p for p in progress if p.stage == "blending" and region in p.message]
        assert steps[0].done == 0 and steps[-1].done == steps[-1].total == 12, region
        assert [p.done for p in steps] == sorted(p.done for p in steps)
    assert [s.target for s in ssi_sets] == ["nose", "tri"]
    assert ssi_sets[0].id != ssi_sets[1].id
    for s in ssi_sets:
        assert s.method == "ssi" and s.n_items == 6 and s.seed == 7
        assert (s.fr_model.name, s.fr_model.version) == (DEFAULT_FR_MODEL, "1")
        assert re.fullmatch(r"[0-9a-f]{64}", s.data_manifest_sha256)
        assert s.metrics["n_pairs"] == 12 and s.params["seed"] == "7" and s.params["feather_sigma"] == "4"
        assert s.params["dataset_path"] == "faces" and s.params["dataset_name"] == "six-faces"
        assert not s.registered.name
        v = _vectors(s)
        assert v.shape == (3, DIM)
        np.testing.assert_allclose(v @ v.T, np.eye(3), atol=1e-5)  # unit length, orthogonal
        eig = [d.eigenvalue for d in s.directions]
        assert eig == sorted(eig, reverse=True) and eig[-1] > 0
        explained = [d.explained_variance for d in s.directions]
        assert all(0 < e <= 1 for e in explained) and sum(explained) <= 1 + 1e-6
        assert all(d.stddev > 0 for d in s.directions)
        assert [d.name for d in s.directions] == [f"ssi/{s.target}/pc{k}" for k in (1, 2, 3)]
    assert ssi_sets[1].params["landmark_groups"] == "36,45,57"
    # the same data gives the same manifest, whatever the region
    assert ssi_sets[0].data_manifest_sha256 == ssi_sets[1].data_manifest_sha256


def test_cancelling_ssi_registers_nothing_and_the_server_keeps_serving(
    client: DirectionsClient, svc: RunningService, registry: Registry, probe: common_pb2.Template
) -> None:
    before_versions = len(_versions(registry, DIRECTIONS))
    before_sets = {s.id for s in client.list_direction_sets().direction_sets}
    req = directions_pb2.DiscoverSSIRequest(
        dataset=server_dataset("faces"), max_pairs=MAX_PAIRS, batch_size=2, seed=1, register=True
    )
    call = client.discover_ssi(req)
    for event in call:
        if event.WhichOneof("event") == "progress" and event.progress.stage == "blending":
            break
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    # the job stops at its next batch (the server says so in its log) ...
    _wait(lambda: "job ssi cancelled" in svc.log_text(), 30, "the SSI job to stop")
    line = next(ln for ln in svc.log_text().splitlines() if "job ssi cancelled" in ln)
    done, total = (int(x) for x in re.search(r"after (\d+) of (\d+) blends", line).groups())  # type: ignore[union-attr]
    assert done < total == 6 * 5  # all N(N-1) pairs: fewer than max_pairs
    _wait(lambda: "rpc DiscoverSSI CANCELLED" in svc.log_text(), 10, "the cancelled call in the log")
    # ... and leaves nothing behind: no new set in memory, no new registry version
    time.sleep(1.0)
    assert {s.id for s in client.list_direction_sets().direction_sets} == before_sets
    assert len(_versions(registry, DIRECTIONS)) == before_versions
    assert svc.alive()
    _good_call(client, probe)


def test_centroid_directions_on_inline_templates(
    centroid_set: tuple[directions_pb2.DirectionSet, np.ndarray],
) -> None:
    s, u = centroid_set
    assert (s.method, s.target, s.n_items) == ("centroid", "Smiling", 12)
    (d,) = s.directions
    v = np.asarray(d.vector)
    assert d.name == "centroid/Smiling=1" and d.stddev > 0 and d.eigenvalue == 0
    assert 0.25 < np.linalg.norm(v) < 0.35  # the raw centroid difference, not unit length
    assert v @ u / np.linalg.norm(v) > 0.95
    assert [(c.name, c.value, c.count) for c in s.centroids] == [("Smiling=0", 0.0, 6), ("Smiling=1", 1.0, 6)]
    ref, pos = (np.asarray(c.template.values) for c in s.centroids)
    np.testing.assert_allclose(pos - ref, v, atol=1e-5)
    assert s.centroids[0].template.model.version == "1"
    assert 0.9 < s.metrics["cosine_ref_pos"] < 1.0
    assert s.params["positive_values"] == "1" and s.params["reference_value"] == "0"


def test_regression_direction_and_probe_alpha(client: DirectionsClient) -> None:
    x, _u, w = _synthetic(2, 20)
    age = 40 + 200 * ((x - x.mean(0)) @ w) + np.random.default_rng(3).normal(scale=0.1, size=20)
    items = [labeled_image(f"r{i}", template=_template(x[i]), labels={"age": float(age[i])}) for i in range(20)]
    probe = x[0]
    req = directions_pb2.DiscoverRegressionRequest(
        dataset=inline_dataset(items), label="age", ridge_alpha=1e-4, cv_folds=4, seed=5, target_value=60.0
    )
    req.probe.template.CopyFrom(_template(probe))
    result = client.run(client.discover_regression(req))
    (s,) = result.sets
    v = _vectors(s)[0]
    assert s.method == "regression" and s.target == "age" and s.seed == 5 and s.n_items == 20
    assert abs(np.linalg.norm(v) - 1) < 1e-5 and v @ w > 0.9
    assert s.metrics["r2_train"] > 0.9 and "r2_cv" in s.metrics and s.metrics["coef_norm"] > 0
    assert {"intercept", "coef_norm"} <= set(s.metrics) and s.params["cv_folds"] == "4"
    p = result.probe
    assert p is not None and p.target_value == 60.0
    # eq. 12-13 along the unit direction: alpha = (target - predicted) / |w|
    assert p.alpha == pytest.approx((60.0 - p.predicted) / s.metrics["coef_norm"], rel=1e-4)
    np.testing.assert_allclose(np.asarray(p.moved.values), probe + p.alpha * v, atol=1e-4)
    assert p.probe.model.version == "1"


def test_registration_round_trip(
    client: DirectionsClient,
    registry: Registry,
    centroid_set: tuple[directions_pb2.DirectionSet, np.ndarray],
    bare: RunningService,
) -> None:
    s, _u = centroid_set
    assert s.registered.name == DIRECTIONS and s.registered.version
    info = registry.get_version(DIRECTIONS, s.registered.version)
    tags = info.tags
    assert tags["kind"] == "direction_set" and tags["method"] == "centroid" and tags["target"] == "Smiling"
    assert (tags["fr_model_name"], tags["fr_model_version"]) == (DEFAULT_FR_MODEL, "1")
    assert tags["data_manifest_sha256"] == s.data_manifest_sha256 and tags["direction_set_id"] == s.id
    ref = common_pb2.DirectionSetRef(registered=common_pb2.ModelRef(name=DIRECTIONS, version=s.registered.version))
    back = client.get_direction_set(ref).direction_set
    assert back.id == s.id and back.registered.version == s.registered.version
    np.testing.assert_array_equal(_vectors(back), _vectors(s))
    assert [c.template.values for c in back.centroids] == [c.template.values for c in s.centroids]
    assert back.data_manifest_sha256 == s.data_manifest_sha256 and back.fr_model.version == "1"
    assert dict(back.params) == dict(s.params) and dict(back.metrics) == pytest.approx(dict(s.metrics))
    # by alias too, and listed with the registered sets; loaded registered sets show in ModelStatus
    registry.set_alias(DIRECTIONS, CHAMPION, s.registered.version)
    by_alias = client.get_direction_set(f"{DIRECTIONS}@{CHAMPION}").direction_set
    assert by_alias.id == s.id and by_alias.registered.alias == CHAMPION
    listed = client.list_direction_sets("centroid", include_registered=True)
    assert [x.id for x in listed.direction_sets].count(s.id) == 1
    assert all(not d.vector for x in listed.direction_sets for d in x.directions)  # metadata only by default
    assert any(m.kind == "direction_set" and m.model.name == DIRECTIONS for m in client.model_status().models)
    # the id outlives the server that made it: another server finds it in the registry by its id tag
    with DirectionsClient(bare.address, timeout=120) as other:
        found = other.get_direction_set(s.id).direction_set
    assert found.id == s.id and found.registered.version == s.registered.version
    np.testing.assert_array_equal(_vectors(found), _vectors(s))


# -- applying -------------------------------------------------------------------------------------------


def test_traverse_decodes_frames_and_strip(
    client: DirectionsClient, ssi_sets: list[directions_pb2.DirectionSet], probe: common_pb2.Template
) -> None:
    s = ssi_sets[0]
    resp = client.traverse(
        common_pb2.Probe(image=image_from_path(FACE_A)),
        set=s.id,
        index=0,
        alphas=[-2.0, 0.0, 2.0],
        scale=directions_pb2.ALPHA_SCALE_STDDEV,
        decode=True,
    )
    sd = s.directions[0].stddev
    assert list(resp.alphas) == [-2.0, 0.0, 2.0]
    np.testing.assert_allclose(resp.multipliers, [-2 * sd, 0.0, 2 * sd], rtol=1e-5)
    v = np.asarray(s.directions[0].vector)
    t0 = np.asarray(resp.probe.values)
    np.testing.assert_allclose(np.asarray(resp.probe.values), np.asarray(probe.values), atol=1e-5)
    for m, t in zip(resp.multipliers, resp.templates, strict=True):
        np.testing.assert_allclose(np.asarray(t.values), t0 + m * v, atol=1e-5)
    assert resp.cosine_to_probe[1] == pytest.approx(1.0) and resp.cosine_to_probe[0] < 1.0
    assert resp.direction.name == "ssi/nose/pc1" and not resp.direction.vector
    frames = [_png(f) for f in resp.frames]
    assert [f.shape for f in frames] == [(OUT_SIZE, OUT_SIZE, 3)] * 3
    assert not np.array_equal(frames[0], frames[2])  # moving along the direction changes the face
    strip = _png(resp.strip)
    assert strip.shape[0] < strip.shape[1] and strip.shape[1] >= 3 * OUT_SIZE
    assert (resp.decoder.name, resp.decoder.version) == (DEFAULT_DECODER_MODEL, "1")
    assert (resp.fr_model.name, resp.fr_model.version) == (DEFAULT_FR_MODEL, "1")
    # default alphas, absolute scale, no decode
    plain = client.traverse(common_pb2.Probe(template=probe), set=s.id, index=2)
    assert list(plain.alphas) == [-3, -2, -1, 0, 1, 2, 3] and list(plain.multipliers) == list(plain.alphas)
    assert not plain.frames and not plain.decoder.name


def test_equivariance_maps_fit_and_apply(client: DirectionsClient, probe: common_pb2.Template) -> None:
    rot = directions_pb2.Transform(kind=directions_pb2.TRANSFORM_KIND_ROTATION, angle_degrees=15)
    shift = directions_pb2.Transform(kind=directions_pb2.TRANSFORM_KIND_TRANSLATION, dx=0.05)
    req = directions_pb2.FitEquivarianceRequest(
        dataset=server_dataset("faces"), transforms=[rot, shift], holdout_fraction=0.34, seed=3, register=True
    )
    events = list(client.fit_equivariance(req))
    stages = {e.progress.stage for e in events if e.WhichOneof("event") == "progress"}
    assert {"embedding", "transforming"} <= stages
    (maps,) = [e.maps for e in events if e.WhichOneof("event") == "maps"]
    assert maps.n_items == 6 and maps.seed == 3 and maps.fr_model.version == "1"
    assert [m.transform.kind for m in maps.maps] == [rot.kind, shift.kind]
    for m in maps.maps:
        assert list(m.forward.shape) == [DIM, DIM] and list(m.inverse.shape) == [DIM, DIM]
        assert len(m.forward_bias) == len(m.inverse_bias) == DIM
        assert all(-1 <= c <= 1 for c in (m.forward_cosine, m.inverse_cosine, m.baseline_cosine))
        assert m.baseline_cosine < 0.9999  # the transform changes the template
    assert maps.registered.name == "facexplain-equivariance" and maps.registered.version
    by_id = client.get_direction_set(maps.id).equivariance_maps
    by_version = client.get_direction_set(f"facexplain-equivariance@{maps.registered.version}").equivariance_maps
    for got in (by_id, by_version):
        assert got.id == maps.id and got.data_manifest_sha256 == maps.data_manifest_sha256
        for a, b in zip(got.maps, maps.maps, strict=True):
            assert (a.forward.data, a.inverse.data) == (b.forward.data, b.inverse.data)
            assert list(a.forward_bias) == list(b.forward_bias) and a.transform == b.transform
            assert a.inverse_cosine == pytest.approx(b.inverse_cosine)
    listed = client.list_direction_sets("equivariance", include_vectors=True)
    assert listed.equivariance_maps[0].id == maps.id and listed.equivariance_maps[0].maps[0].forward.data
    # a rotation of 12 degrees uses the nearest fitted map (15), inverse by default
    asked = directions_pb2.Transform(kind=directions_pb2.TRANSFORM_KIND_ROTATION, angle_degrees=12)
    resp = client.apply_equivariance(common_pb2.Probe(template=probe), maps.id, asked, decode=True)
    assert resp.applied.angle_degrees == 15
    m0 = maps.maps[0]
    inv = np.frombuffer(m0.inverse.data, dtype="<f4").reshape(DIM, DIM)
    t = np.asarray(probe.values, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(resp.template.values), inv @ t + np.asarray(m0.inverse_bias), atol=1e-4)
    assert _png(resp.decoded).shape == (OUT_SIZE, OUT_SIZE, 3) and resp.decoder.version == "1"
    fwd = client.apply_equivariance(common_pb2.Probe(template=probe), maps.id, asked, forward=True)
    f = np.frombuffer(m0.forward.data, dtype="<f4").reshape(DIM, DIM)
    np.testing.assert_allclose(np.asarray(fwd.template.values), f @ t + np.asarray(m0.forward_bias), atol=1e-4)
    assert not fwd.decoded.encoded
    scale = directions_pb2.Transform(kind=directions_pb2.TRANSFORM_KIND_SCALE, scale=1.1)
    err = _rejected_client(client, "ApplyEquivariance", directions_pb2.ApplyEquivarianceRequest(
        probe=common_pb2.Probe(template=probe), maps=common_pb2.DirectionSetRef(id=maps.id), transform=scale
    ))  # fmt: skip
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no scale map" in (err.details() or "")
    _good_call(client, probe)


def _rejected_client(client: DirectionsClient, method: str, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        getattr(client.stub, method)(request, timeout=60)
    return info.value


def test_aggregate_mean_and_clusters(client: DirectionsClient, probe: common_pb2.Template) -> None:
    others = [common_pb2.Probe(image=image_from_path(p)) for p in sorted((SAMPLE / "id7201").iterdir())[1:]]
    faces = [common_pb2.Probe(template=probe), *others]
    singletons = client.aggregate(faces, n_clusters=3)
    members = [list(c.members) for c in singletons.clusters]
    assert sorted(members) == [[0], [1], [2]]
    templates = {c.members[0]: np.asarray(c.centroid.values) for c in singletons.clusters}
    np.testing.assert_allclose(templates[0], np.asarray(probe.values), atol=1e-6)
    mean = np.mean([templates[i] for i in range(3)], axis=0)
    np.testing.assert_allclose(np.asarray(singletons.mean.values), mean, atol=1e-5)
    resp = client.aggregate(faces, n_clusters=2, linkage="ward", decode=True)
    sizes = [len(c.members) for c in resp.clusters]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == 3
    assert sorted(i for c in resp.clusters for i in c.members) == [0, 1, 2]
    assert _png(resp.decoded_mean).shape == (OUT_SIZE, OUT_SIZE, 3)
    assert all(_png(c.decoded).shape == (OUT_SIZE, OUT_SIZE, 3) for c in resp.clusters)
    assert resp.decoder.version == "1" and resp.fr_model.version == "1"
    mean_only = client.aggregate(faces, normalize=True)
    assert not mean_only.clusters and len(mean_only.mean.values) == DIM


def test_centroid_mds(client: DirectionsClient, centroid_set: tuple[directions_pb2.DirectionSet, np.ndarray]) -> None:
    s, _u = centroid_set
    two = client.centroid_mds(s.id)
    assert [p.label for p in two.points] == ["Smiling=0", "Smiling=1"] and two.stress < 1e-4
    # centroids on a plane: the l2 layout keeps their distances (stress ~0)
    rng = np.random.default_rng(4)
    base, e1, e2 = rng.normal(size=(3, DIM))
    coords = np.array([[0, 0], [1, 0], [0, 2], [1, 1]], dtype=np.float64)
    cents = [
        directions_pb2.Centroid(name=f"c{i}", template=_template(base + 0.1 * (a * e1 + b * e2)))
        for i, (a, b) in enumerate(coords)
    ]
    resp = client.centroid_mds(cents, metric="l2")
    xy = np.array([[p.x, p.y] for p in resp.points])
    given = np.array([np.asarray(c.template.values, dtype=np.float64) for c in cents])
    dist = np.linalg.norm(given[:, None] - given[None], axis=-1)
    np.testing.assert_allclose(np.linalg.norm(xy[:, None] - xy[None], axis=-1), dist, atol=1e-3)
    assert resp.stress < 1e-3 and [p.label for p in resp.points] == ["c0", "c1", "c2", "c3"]
    cosine = client.centroid_mds(cents)
    assert 0 <= cosine.stress <= 1 and cosine.fr_model.version == "1"


# -- rejections -----------------------------------------------------------------------------------------


def test_rejections_have_precise_codes_and_the_server_keeps_serving(
    svc: RunningService,
    client: DirectionsClient,
    registry: Registry,
    probe: common_pb2.Template,
    ssi_sets: list[directions_pb2.DirectionSet],
    tmp_path: Path,
) -> None:
    code = grpc.StatusCode
    good = _template(probe.values)
    t_probe = common_pb2.Probe(template=good)
    x, _u, _w = _synthetic(5, 8)

    def items(n: int = 8, labels: Callable[[int], dict[str, float]] = lambda i: {"Smiling": float(i % 2)}) -> Any:
        return [labeled_image(f"i{i}", template=_template(x[i % 8]), labels=labels(i)) for i in range(n)]

    def centroid(dataset_items: list[Any], **kw: Any) -> directions_pb2.DiscoverCentroidRequest:
        return directions_pb2.DiscoverCentroidRequest(
            dataset=inline_dataset(dataset_items), label=kw.pop("label", "Smiling"), positive_values=[1.0], **kw
        )

    bad_dim = items()
    bad_dim[3].template.CopyFrom(_template(x[3][:127]))
    nan = items()
    nan_values = list(nan[2].template.values)
    nan_values[5] = float("nan")
    nan[2].template.CopyFrom(_template(nan_values))
    other_model = items()
    other_model[1].template.model.CopyFrom(common_pb2.ModelRef(name="facexplain-fr-other", version="1"))
    other_version = items()
    other_version[1].template.model.CopyFrom(common_pb2.ModelRef(name=DEFAULT_FR_MODEL, version="7"))

    # a set for another FR version, registered by hand: using it is FAILED_PRECONDITION
    foreign = DirectionSetData(
        set_id="centroid-foreign",
        method="centroid",
        target="Smiling",
        fr_name=DEFAULT_FR_MODEL,
        fr_version="999",
        vectors=np.eye(1, DIM, dtype=np.float32),
        names=["centroid/Smiling=1"],
        eigenvalues=[0.0],
        explained_variance=[0.0],
        stddev=[0.1],
        data_manifest_sha256="0" * 64,
    )
    meta = save_direction_set(tmp_path / "foreign", foreign, name="facexplain-directions-foreign")
    foreign_v = registry.register_bundle(
        tmp_path / "foreign", "facexplain-directions-foreign", extra_tags=bundle_tags(meta)
    )
    foreign_ref = common_pb2.DirectionSetRef(
        registered=common_pb2.ModelRef(name="facexplain-directions-foreign", version=foreign_v.version)
    )
    ssi_id = ssi_sets[0].id
    inline_e1 = directions_pb2.Direction(vector=[1.0] + [0.0] * (DIM - 1))
    blank = io.BytesIO()
    Image.new("RGB", (96, 96), (128, 128, 128)).save(blank, format="PNG")
    rot = directions_pb2.Transform(kind=directions_pb2.TRANSFORM_KIND_ROTATION, angle_degrees=10)
    faces = server_dataset("faces")
    other_fr = common_pb2.ModelRef(name="facexplain-fr-x")

    def ssi(dataset: common_pb2.Dataset, **kw: Any) -> directions_pb2.DiscoverSSIRequest:
        return directions_pb2.DiscoverSSIRequest(dataset=dataset, **kw)

    def traverse(**kw: Any) -> directions_pb2.TraverseRequest:
        kw.setdefault("probe", t_probe)
        if "set_direction" not in kw and "inline" not in kw:
            kw["inline"] = inline_e1
        return directions_pb2.TraverseRequest(**kw)

    def set_dir(ref: common_pb2.DirectionSetRef, index: int = 0) -> directions_pb2.SetDirection:
        return directions_pb2.SetDirection(set=ref, index=index)

    cases: list[tuple[str, str, Any, grpc.StatusCode, str]] = [
        ("unknown region", "DiscoverSSI", ssi(server_dataset("faces"), regions=[directions_pb2.Region(name="ears")]),
         code.INVALID_ARGUMENT, "unknown region 'ears'"),
        ("custom region of 2 points", "DiscoverSSI",
         ssi(server_dataset("faces"), regions=[directions_pb2.Region(name="x", landmark_indices=[1, 2])]),
         code.INVALID_ARGUMENT, "at least 3"),
        ("landmark index out of range", "DiscoverSSI",
         ssi(server_dataset("faces"), regions=[directions_pb2.Region(name="x", landmark_indices=[1, 2, 68])]),
         code.INVALID_ARGUMENT, "0..67"),
        ("template where SSI needs images", "DiscoverSSI", ssi(inline_dataset(items())),
         code.INVALID_ARGUMENT, "needs images"),
        ("n_components over the dimension", "DiscoverSSI", ssi(server_dataset("faces"), n_components=DIM + 1),
         code.INVALID_ARGUMENT, "n_components"),
        ("too many pairs", "DiscoverSSI", ssi(server_dataset("faces"), max_pairs=MAX_PAIRS + 1),
         code.RESOURCE_EXHAUSTED, "FACEXPLAIN_MAX_SSI_PAIRS"),
        ("label missing", "DiscoverCentroid", centroid(items(), label="Eyeglasses"),
         code.INVALID_ARGUMENT, "unknown label 'Eyeglasses'"),
        ("too few items per value", "DiscoverCentroid", centroid(items(5, lambda i: {"Smiling": float(i == 0)})),
         code.INVALID_ARGUMENT, "too few items per value"),
        ("no reference and no positives", "DiscoverCentroid",
         directions_pb2.DiscoverCentroidRequest(dataset=inline_dataset(items()), label="Smiling"),
         code.INVALID_ARGUMENT, "reference"),
        ("bad template dimension", "DiscoverCentroid", centroid(bad_dim), code.INVALID_ARGUMENT, "dimension 127"),
        ("NaN in a template", "DiscoverCentroid", centroid(nan), code.INVALID_ARGUMENT, "NaN"),
        ("template of another model", "DiscoverCentroid", centroid(other_model),
         code.FAILED_PRECONDITION, "facexplain-fr-other"),
        ("template of another FR version", "DiscoverCentroid", centroid(other_version),
         code.FAILED_PRECONDITION, "version 7"),
        ("dataset over the item limit", "DiscoverCentroid", centroid(items(MAX_ITEMS + 1)),
         code.RESOURCE_EXHAUSTED, "FACEXPLAIN_MAX_DATASET_ITEMS"),
        ("empty dataset", "DiscoverCentroid", centroid([]), code.INVALID_ARGUMENT, "no items"),
        ("regression label with too few items", "DiscoverRegression",
         directions_pb2.DiscoverRegressionRequest(dataset=inline_dataset(items(2)), label="Smiling"),
         code.INVALID_ARGUMENT, "too few items"),
        ("probe without target value", "DiscoverRegression",
         directions_pb2.DiscoverRegressionRequest(dataset=inline_dataset(items()), label="Smiling", probe=t_probe),
         code.INVALID_ARGUMENT, "target_value"),
        ("bad registered name", "DiscoverCentroid", centroid(items(), register=True, registered_name="Bad Name"),
         code.INVALID_ARGUMENT, "registered_name"),
        ("ServerDataset escaping the root", "DiscoverCentroid",
         directions_pb2.DiscoverCentroidRequest(dataset=server_dataset("../outside"), label="x", positive_values=[1]),
         code.PERMISSION_DENIED, "leaves the server's data root"),
        ("absolute ServerDataset path", "DiscoverCentroid",
         directions_pb2.DiscoverCentroidRequest(dataset=server_dataset(str(svc.log_path.parent)), label="x",
                                                positive_values=[1]),
         code.PERMISSION_DENIED, "absolute"),
        ("missing ServerDataset folder", "DiscoverCentroid",
         directions_pb2.DiscoverCentroidRequest(dataset=server_dataset("nope"), label="x", positive_values=[1]),
         code.NOT_FOUND, "does not exist"),
        ("equivariance without transforms", "FitEquivariance",
         directions_pb2.FitEquivarianceRequest(dataset=server_dataset("faces")), code.INVALID_ARGUMENT, "transforms"),
        ("unspecified transform kind", "FitEquivariance",
         directions_pb2.FitEquivarianceRequest(dataset=faces, transforms=[directions_pb2.Transform()]),
         code.INVALID_ARGUMENT, "kind"),
        ("unknown set id", "GetDirectionSet",
         directions_pb2.GetDirectionSetRequest(ref=common_pb2.DirectionSetRef(id="ssi-0000")),
         code.NOT_FOUND, "ssi-0000"),
        ("unknown registered set", "GetDirectionSet",
         directions_pb2.GetDirectionSetRequest(ref=common_pb2.DirectionSetRef(
             registered=common_pb2.ModelRef(name="facexplain-directions-none", version="1"))),
         code.NOT_FOUND, "facexplain-directions-none"),
        ("unknown list method", "ListDirectionSets", directions_pb2.ListDirectionSetsRequest(method="pca"),
         code.INVALID_ARGUMENT, "pca"),
        ("too many alphas", "Traverse", traverse(alphas=[0.1 * k for k in range(MAX_ALPHAS + 1)]),
         code.RESOURCE_EXHAUSTED, "FACEXPLAIN_MAX_ALPHAS"),
        ("NaN alpha", "Traverse", traverse(alphas=[float("nan")]), code.INVALID_ARGUMENT, "finite"),
        ("no direction", "Traverse", directions_pb2.TraverseRequest(probe=t_probe),
         code.INVALID_ARGUMENT, "no direction"),
        ("direction index out of range", "Traverse",
         traverse(set_direction=set_dir(common_pb2.DirectionSetRef(id=ssi_id), 3)), code.INVALID_ARGUMENT, "index"),
        ("unknown set id in Traverse", "Traverse",
         traverse(set_direction=set_dir(common_pb2.DirectionSetRef(id="nope-1"))), code.NOT_FOUND, "nope-1"),
        ("direction set of another FR version", "Traverse", traverse(set_direction=set_dir(foreign_ref)),
         code.FAILED_PRECONDITION, "v999"),
        ("inline direction of the wrong dimension", "Traverse",
         traverse(inline=directions_pb2.Direction(vector=[1.0] * 10)), code.INVALID_ARGUMENT, "dimension 10"),
        ("stddev scale without a stddev", "Traverse", traverse(scale=directions_pb2.ALPHA_SCALE_STDDEV),
         code.INVALID_ARGUMENT, "stddev"),
        ("probe template of another model", "Traverse",
         traverse(probe=common_pb2.Probe(template=_template(probe.values, other_fr))),
         code.FAILED_PRECONDITION, "facexplain-fr-x"),
        ("no face in the probe image", "Traverse",
         traverse(probe=common_pb2.Probe(image=common_pb2.Image(encoded=blank.getvalue()))),
         code.FAILED_PRECONDITION, "no face"),
        ("a direction set given as maps", "ApplyEquivariance",
         directions_pb2.ApplyEquivarianceRequest(probe=t_probe, maps=common_pb2.DirectionSetRef(id=ssi_id),
                                                 transform=rot),
         code.INVALID_ARGUMENT, "not an equivariance map set"),
        ("more clusters than faces", "Aggregate", directions_pb2.AggregateRequest(faces=[t_probe], n_clusters=2),
         code.INVALID_ARGUMENT, "n_clusters"),
        ("unknown linkage", "Aggregate", directions_pb2.AggregateRequest(faces=[t_probe], linkage="median"),
         code.INVALID_ARGUMENT, "linkage"),
        ("no faces to aggregate", "Aggregate", directions_pb2.AggregateRequest(), code.INVALID_ARGUMENT, "empty"),
        ("too few inline centroids", "CentroidMDS",
         directions_pb2.CentroidMDSRequest(centroids=directions_pb2.CentroidList(
             centroids=[directions_pb2.Centroid(template=good)] * 2)),
         code.INVALID_ARGUMENT, "at least 3"),
        ("MDS of a set without centroids", "CentroidMDS",
         directions_pb2.CentroidMDSRequest(set=common_pb2.DirectionSetRef(id=ssi_id)),
         code.INVALID_ARGUMENT, "no centroids"),
        ("unknown model to reload", "Reload", common_pb2.ReloadRequest(model_name="facexplain-fr-unknown"),
         code.NOT_FOUND, "facexplain-fr-unknown"),
    ]  # fmt: skip
    for what, method, request, expected, fragment in cases:
        err = _rejected(svc, method, request)
        assert err.code() == expected, (what, err.code(), err.details())
        assert fragment in (err.details() or ""), (what, err.details())
        assert svc.alive(), what
        _good_call(client, probe)


def test_bare_server_refuses_decoding_and_server_datasets(
    bare: RunningService, probe: common_pb2.Template, centroid_set: tuple[directions_pb2.DirectionSet, np.ndarray]
) -> None:
    code = grpc.StatusCode
    t_probe = common_pb2.Probe(template=_template(probe.values))
    inline = directions_pb2.Direction(vector=[1.0] + [0.0] * (DIM - 1))
    cases = [
        ("Traverse", directions_pb2.TraverseRequest(probe=t_probe, inline=inline, decode=True),
         code.FAILED_PRECONDITION, "no decoder"),
        ("Aggregate", directions_pb2.AggregateRequest(faces=[t_probe], decode=True), code.FAILED_PRECONDITION,
         "no decoder"),
        ("DiscoverSSI", directions_pb2.DiscoverSSIRequest(dataset=server_dataset("faces")),
         code.PERMISSION_DENIED, "FACEXPLAIN_DATA_ROOT"),
    ]  # fmt: skip
    with DirectionsClient(bare.address, timeout=120) as c:
        for method, request, expected, fragment in cases:
            err = _rejected(bare, method, request)
            assert err.code() == expected and fragment in (err.details() or ""), (method, err.details())
            assert bare.alive()
            resp = c.traverse(t_probe, inline=inline, alphas=[1.0])
            assert len(resp.templates) == 1 and not resp.frames
        # the same set applies on any server serving its FR version
        s, _u = centroid_set
        moved = c.traverse(t_probe, set=f"{DIRECTIONS}@{s.registered.version}", alphas=[1.0])
        np.testing.assert_allclose(
            np.asarray(moved.templates[0].values), np.asarray(probe.values) + _vectors(s)[0], atol=1e-5
        )
        kinds = [m.kind for m in c.model_status().models]
        assert kinds[0] == "embedder" and "decoder" not in kinds


# -- the command line -----------------------------------------------------------------------------------


def test_directions_and_traverse_cli(svc: RunningService, data_root: Path, tmp_path: Path) -> None:
    faces = tmp_path / "faces"
    for ident in IDENTITIES[:4]:
        shutil.copytree(data_root / "faces" / ident, faces / ident)
    out = tmp_path / "ssi.json"
    proc = _cli(
        "directions", "ssi", str(faces), "--target", svc.address, "--region", "nose", "--max-pairs", "6",
        "--n-components", "2", "--seed", "3", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    (s,) = result["sets"]
    assert s["method"] == "ssi" and s["target"] == "nose" and int(s["n_items"]) == 4 and len(s["directions"]) == 2
    assert s["fr_model"]["version"] == "1" and s["params"]["dataset_source"] == "inline"
    assert f"ssi set {s['id']} for nose" in proc.stdout
    # a labelled folder on the server's data volume (nothing uploaded)
    cout = tmp_path / "smiling.json"
    proc = _cli(
        "directions", "centroid", "labelled", "--server", "--target", svc.address, "--label", "Smiling",
        "--positive", "1", "--reference", "0", "--out", str(cout), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (c,) = json.loads(cout.read_text())["sets"]
    assert c["method"] == "centroid" and [g["count"] for g in c["centroids"]] == ["3", "3"]
    # traverse: the decoded strip as a PNG
    strip = tmp_path / "strip.png"
    proc = _cli(
        "traverse", str(FACE_A), "--target", svc.address, "--set", s["id"], "--index", "1",
        "--alphas", "-1", "0,1", "--scale", "stddev", "--out", str(strip), "--frames", str(tmp_path / "frames"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with Image.open(strip) as im:
        assert im.format == "PNG" and im.width > 3 * OUT_SIZE and im.height < 2 * OUT_SIZE
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["alpha_+0.png", "alpha_+1.png", "alpha_-1.png"]
    # refusals: exit 4 with the status; unreachable service: exit 3
    proc = _cli("traverse", str(FACE_A), "--target", svc.address, "--set", "nope-1", "--out", str(strip))
    assert proc.returncode == 4 and "NOT_FOUND" in proc.stderr
    proc = _cli(
        "directions", "centroid", str(faces), "--target", "127.0.0.1:1", "--label", "x", "--out", str(cout),
        "--connect-timeout", "1",
    )  # fmt: skip
    assert proc.returncode == 3 and "not reachable" in proc.stderr
