"""The decoding service over real gRPC, with a real MLflow registry holding the FR model and decoders.

One MLflow server (sqlite + local artifacts in a temporary folder) serves the session (fixtures in
conftest.py, shared with the directions tests). It holds the default FR model as
``facexplain-fr-dlib128`` v1 (champion) and a decoder for that version as ``facexplain-dfd-dlib128``
v1 (champion). One decoding server follows both aliases (poll 1 s); a
second one starts without any registered decoder. The tests run in file order; every test that moves
an alias moves it back before it ends.

Rejections are sent over a plain channel (no retries, no wait-for-ready) so that the status a test
sees is the server's answer, and each is followed by a good request: a bad input never takes the
server down.
"""

from __future__ import annotations

import csv
import io
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from cli.launcher import REPO, RunningMlflow, RunningService, start_service
from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL, SECOND_FR_MODEL
from registry import CHAMPION, Registry, VersionInfo
from sdk.client import DecodingClient, image_from_path, wait_ready
from services.api.v1 import common_pb2, decoding_pb2, decoding_pb2_grpc
from tests.servers import retarget_decoder_bundle, train_decoder_cli
from tests.service_env import registry_service_env

pytestmark = pytest.mark.integration

POLL_S = 1.0
MAX_BATCH = 8
MAX_STEPS = 16
OUT_SIZE = 64
SAMPLE = REPO / "data" / "sample"
FACE_A = SAMPLE / "celeba" / "id7201" / "001085.jpg"
FACE_B = SAMPLE / "celeba" / "id7205" / "020711.jpg"
LATE_DECODER = "facexplain-dfd-late"


# -- helpers --------------------------------------------------------------------------------------------


def _server_env(uri: str, cache: Path, **extra: str) -> dict[str, str]:
    return registry_service_env(
        uri,
        cache,
        poll_s=POLL_S,
        FACEXPLAIN_MAX_BATCH_SIZE=str(MAX_BATCH),
        FACEXPLAIN_MAX_INTERPOLATION_STEPS=str(MAX_STEPS),
        **extra,
    )


def _stub(svc: RunningService) -> tuple[grpc.Channel, decoding_pb2_grpc.DecodingServiceStub]:
    ch = grpc.insecure_channel(svc.address)
    return ch, decoding_pb2_grpc.DecodingServiceStub(ch)


def _rejected(svc: RunningService, method: str, request: Any) -> grpc.RpcError:
    """Call ``method`` once without retries; it must fail. Returns the error."""
    ch, stub = _stub(svc)
    with ch, pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, timeout=60)
    err = info.value
    assert isinstance(err, grpc.RpcError)
    return err


def _png(image: common_pb2.Image) -> np.ndarray:
    with Image.open(io.BytesIO(image.encoded)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _template(values: Any, **kwargs: Any) -> common_pb2.Template:
    return DecodingClient.template(values, **kwargs)


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def _decoder_version(client: DecodingClient, template: common_pb2.Template) -> str:
    try:
        return client.decode(template, timeout=30).decoder.version
    except grpc.RpcError:
        return ""


def _metrics_text(svc: RunningService) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10).read().decode()


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def svc(
    mlflow: RunningMlflow, decoder_v1: VersionInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    logs = tmp_path_factory.mktemp("decoding-svc")
    service = start_service("decoding", logs, env=_server_env(mlflow.uri, logs / "cache"), timeout=300)
    yield service
    code = service.stop()
    assert code == 0, f"decoding service exit {code}; log tail:\n{service.log_text()[-2000:]}"
    # biometric data never reaches the log: no run of numbers that could be a template
    assert not re.search(r"(-?\d+\.\d+,\s*){8,}", service.log_text())


@pytest.fixture(scope="module")
def client(svc: RunningService) -> Iterator[DecodingClient]:
    c = DecodingClient(svc.address, timeout=120)
    wait_ready(c.channel, 30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def recon_a(client: DecodingClient) -> decoding_pb2.ReconstructResponse:
    return client.reconstruct(image_from_path(FACE_A))


@pytest.fixture(scope="module")
def recon_b(client: DecodingClient) -> decoding_pb2.ReconstructResponse:
    return client.reconstruct(image_from_path(FACE_B))


@pytest.fixture(scope="module")
def good(recon_a: decoding_pb2.ReconstructResponse) -> common_pb2.Template:
    """A real FR template, labelled with the FR model and version that produced it."""
    return recon_a.template


def _assert_serving(client: DecodingClient, svc: RunningService, good: common_pb2.Template) -> None:
    assert svc.alive(), "server process died"
    resp = client.decode(good)
    assert _png(resp.image).shape == (OUT_SIZE, OUT_SIZE, 3)


# -- the training run behind the served decoder -----------------------------------------------------------


def test_training_run_is_tracked_and_registered(
    training: dict[str, Any], decoder_v1: VersionInfo, registry: Registry, fr_v1: VersionInfo
) -> None:
    summary = training["summary"]
    client = registry.client
    run = client.get_run(summary["run_id"])
    params = run.data.params
    # every setting, the FR model inverted and the data manifest are on the run
    assert params["fr_model_name"] == DEFAULT_FR_MODEL and params["fr_model_version"] == "1"
    assert params["fr_model_bundle_sha256"] == fr_v1.tags["bundle_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", params["data_manifest_sha256"])
    assert params["lr"] == "0.001" and params["perceptual"] == "white_box" and params["seed"] == "0"
    # per-epoch curves, and the decoder learned something
    history = client.get_metric_history(summary["run_id"], "train_total")
    assert len(history) == summary["epochs_run"] >= 5
    assert history[-1].value < 0.8 * history[0].value, [h.value for h in history]
    for key in ("train_pixel_global", "train_perceptual_local", "test_psnr", "test_ssim", "test_identity_cosine"):
        assert key in run.data.metrics, key
    # the independent second FR model judged the test faces too (reported beside the gates, not one of them)
    assert params["second_judge_model"].startswith(f"{SECOND_FR_MODEL}:"), params.get("second_judge_model")
    m = run.data.metrics
    assert -1 <= m["test_identity_cosine_second"] <= 1 and 0 <= m["test_accepted_second"] <= 1
    assert m["test_second_judge_faces"] == summary["faces"]["test"]
    assert decoder_v1.tags["second_judge"] == params["second_judge_model"]
    assert "test_identity_cosine_second" in decoder_v1.tags
    # reconstruction grids as images, the bundle inside the same run, the version pointing at it
    arts = {a.path for a in client.list_artifacts(summary["run_id"], "grids")}
    assert "grids/test_reconstructions.png" in arts
    assert decoder_v1.run_id == summary["run_id"] and decoder_v1.source.endswith("/bundle")
    assert decoder_v1.tags["data_manifest_sha256"] == params["data_manifest_sha256"]
    # identity-disjoint split of the sample's 10 people
    assert summary["faces"]["train"] > 0 and summary["faces"]["test"] > 0


def test_training_adds_mirrored_and_blended_faces_to_the_training_side_only(
    training: dict[str, Any], mlflow: RunningMlflow, fr_v1: VersionInfo, registry: Registry, tmp_path: Path
) -> None:
    plain = training["summary"]["faces"]
    summary = train_decoder_cli(
        mlflow.uri, DEFAULT_FR_MODEL, fr_v1.version, tmp_path, "--no-register", "--epochs", "1",
        "--hflip", "true", "--region-blends", "true",
    )  # fmt: skip
    assert summary["faces"]["train"] == 3 * plain["train"]  # each training face, its mirror image, its blend
    assert summary["faces"]["test"] == plain["test"] and summary["faces"]["val"] == plain["val"]
    params = registry.client.get_run(summary["run_id"]).data.params
    assert params["hflip"] == "True" and params["region_blends"] == "True"


# -- the happy paths ------------------------------------------------------------------------------------


def test_model_status_lists_decoder_and_fr_model(client: DecodingClient, mlflow: RunningMlflow) -> None:
    status = client.model_status()
    decoder, fr = status.models
    assert (decoder.kind, decoder.model.name, decoder.model.version, decoder.model.alias) == (
        "decoder",
        DEFAULT_DECODER_MODEL,
        "1",
        CHAMPION,
    )
    assert decoder.serving and decoder.metadata["fr_model_name"] == DEFAULT_FR_MODEL
    assert decoder.metadata["fr_model_version"] == "1" and decoder.metadata["out_size"] == str(OUT_SIZE)
    assert float(decoder.metadata["golden_max_abs_diff"]) <= 4 / 255
    assert (fr.kind, fr.model.name, fr.model.version, fr.serving) == ("embedder", DEFAULT_FR_MODEL, "1", True)
    assert status.registry_reachable and status.registry_uri == mlflow.uri and status.last_reload_error == ""


def test_health_and_served_metrics(svc: RunningService) -> None:
    ch = grpc.insecure_channel(svc.address)
    with ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = health.Check(health_pb2.HealthCheckRequest(service="facexplain.v1.DecodingService"), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    text = _metrics_text(svc)
    assert f'facexplain_model_served{{model="{DEFAULT_DECODER_MODEL}",service="decoding",version="1"}} 1.0' in text
    assert f'facexplain_model_served{{model="{DEFAULT_FR_MODEL}",service="decoding",version="1"}} 1.0' in text


def test_reconstruct_returns_chip_reconstruction_and_metrics(recon_a: decoding_pb2.ReconstructResponse) -> None:
    r = recon_a
    assert _png(r.aligned).shape == (OUT_SIZE, OUT_SIZE, 3)
    assert _png(r.reconstruction).shape == (OUT_SIZE, OUT_SIZE, 3)
    assert r.template.dim == 128 and len(r.template.values) == 128 and not r.template.normalized
    assert 0.8 < float(np.linalg.norm(r.template.values)) < 2.5  # raw, not unit length
    assert (r.template.model.name, r.template.model.version) == (DEFAULT_FR_MODEL, "1")
    assert (r.decoder.name, r.decoder.version, r.decoder.alias) == (DEFAULT_DECODER_MODEL, "1", CHAMPION)
    assert (r.fr_model.name, r.fr_model.version) == (DEFAULT_FR_MODEL, "1")
    m = r.metrics
    assert math.isfinite(m.psnr) and m.psnr > 0
    assert -1.0 <= m.ssim <= 1.0 and -1.0 <= m.identity_cosine <= 1.0
    assert m.rule.metric == "l2" and m.rule.accept_below and m.rule.threshold == pytest.approx(0.6)
    assert r.face.x2 > r.face.x1 and r.face.y2 > r.face.y1 and 0 < r.face.score <= 1


def test_decode_and_decode_batch(client: DecodingClient, good: common_pb2.Template) -> None:
    one = client.decode(good)
    img = _png(one.image)
    assert img.shape == (OUT_SIZE, OUT_SIZE, 3)
    assert (one.decoder.name, one.decoder.version) == (DEFAULT_DECODER_MODEL, "1")
    assert (one.fr_model.name, one.fr_model.version) == (DEFAULT_FR_MODEL, "1")
    assert client.decode(good).image.encoded == one.image.encoded  # deterministic (eval mode)
    # the decoder normalises internally: a unit template and an unlabelled one decode to the same face
    unit = np.asarray(good.values) / np.linalg.norm(good.values)
    same = _png(client.decode(_template(unit, normalized=True)).image)
    assert np.abs(same.astype(int) - img.astype(int)).max() <= 1

    nan = list(good.values)
    nan[3] = float("nan")
    other_version = _template(good.values, model=common_pb2.ModelRef(name=DEFAULT_FR_MODEL, version="7"))
    batch = client.decode_batch([good, _template(nan), _template(unit), other_version])
    assert [r.index for r in batch.results] == [0, 1, 2, 3]
    assert [r.WhichOneof("outcome") for r in batch.results] == ["ok", "error", "ok", "error"]
    assert batch.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "NaN" in batch.results[1].error.message
    assert batch.results[3].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert (batch.decoder.version, batch.fr_model.version) == ("1", "1")
    first = _png(batch.results[0].ok.image)
    assert np.abs(first.astype(int) - img.astype(int)).max() <= 1  # batched == single, up to rounding


@pytest.mark.parametrize("mode", [decoding_pb2.INTERPOLATION_MODE_LINEAR, decoding_pb2.INTERPOLATION_MODE_SLERP])
def test_interpolate_frames_templates_and_strip(
    client: DecodingClient,
    recon_a: decoding_pb2.ReconstructResponse,
    recon_b: decoding_pb2.ReconstructResponse,
    mode: decoding_pb2.InterpolationMode.ValueType,
) -> None:
    a, b = recon_a.template, recon_b.template
    resp = client.interpolate(a, b, mode=mode, strip=True)
    steps = 8  # the default
    assert len(resp.frames) == len(resp.templates) == len(resp.positions) == steps
    assert list(resp.positions) == pytest.approx([k / (steps - 1) for k in range(steps)])
    assert all(_png(f).shape == (OUT_SIZE, OUT_SIZE, 3) for f in resp.frames)
    assert _png(resp.strip).shape == (OUT_SIZE, OUT_SIZE * steps, 3)
    vals = np.asarray([t.values for t in resp.templates])
    np.testing.assert_allclose(vals[0], a.values, atol=1e-6)
    np.testing.assert_allclose(vals[-1], b.values, atol=1e-6)
    assert all((t.model.name, t.model.version, t.dim) == (DEFAULT_FR_MODEL, "1", 128) for t in resp.templates)
    norms = np.linalg.norm(vals, axis=1)
    na, nb = np.linalg.norm(a.values), np.linalg.norm(b.values)
    linear_norm = na + (nb - na) * np.asarray(resp.positions)
    if mode == decoding_pb2.INTERPOLATION_MODE_SLERP:  # the norm moves linearly, no dip mid-way
        np.testing.assert_allclose(norms, linear_norm, rtol=1e-5)
    else:  # the chord between two directions dips inside
        assert (norms[1:-1] < linear_norm[1:-1] - 1e-4).all()
    # frame 0 is the decoded start template
    start = _png(client.decode(a).image)
    assert np.abs(_png(resp.frames[0]).astype(int) - start.astype(int)).max() <= 1
    assert (resp.decoder.version, resp.fr_model.version) == ("1", "1")
    plain = client.interpolate(a, b, steps=3, mode=mode)
    assert len(plain.frames) == 3 and not plain.HasField("strip")


# -- every bad input, each followed by a good request --------------------------------------------------


def _bad_cases(good: common_pb2.Template) -> list[tuple[str, str, Any, grpc.StatusCode, str]]:
    vals = list(good.values)
    nan, inf = list(vals), list(vals)
    nan[0], inf[5] = float("nan"), float("inf")
    other_name = common_pb2.ModelRef(name="facexplain-fr-other", version="1")
    other_version = common_pb2.ModelRef(name=DEFAULT_FR_MODEL, version="2")
    grey = io.BytesIO()
    Image.new("RGB", (160, 120), (128, 128, 128)).save(grey, format="PNG")
    d = decoding_pb2
    inv, fp, res = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    return [
        ("no template", "Decode", d.DecodeRequest(), inv, "no values"),
        ("wrong dim", "Decode", d.DecodeRequest(template=_template(vals[:100])), inv, "dimension 100"),
        ("NaN", "Decode", d.DecodeRequest(template=_template(nan)), inv, "NaN"),
        ("inf", "Decode", d.DecodeRequest(template=_template(inf)), inv, "infinite"),
        ("zero", "Decode", d.DecodeRequest(template=_template([0.0] * 128)), inv, "zero vector"),
        ("dim field", "Decode", d.DecodeRequest(template=common_pb2.Template(values=vals, dim=64)), inv, "dim is 64"),
        (
            "other FR model",
            "Decode",
            d.DecodeRequest(template=_template(vals, model=other_name)),
            fp,
            "facexplain-fr-other",
        ),
        ("other FR version", "Decode", d.DecodeRequest(template=_template(vals, model=other_version)), fp, "version 2"),
        ("empty batch", "DecodeBatch", d.DecodeBatchRequest(), inv, "empty"),
        (
            "batch over limit",
            "DecodeBatch",
            d.DecodeBatchRequest(templates=[good] * (MAX_BATCH + 1)),
            res,
            "FACEXPLAIN_MAX_BATCH_SIZE",
        ),
        ("steps 1", "Interpolate", d.InterpolateRequest(a=good, b=good, steps=1), inv, "steps is 1"),
        ("steps negative", "Interpolate", d.InterpolateRequest(a=good, b=good, steps=-4), inv, "steps is -4"),
        (
            "too many steps",
            "Interpolate",
            d.InterpolateRequest(a=good, b=good, steps=MAX_STEPS + 1),
            res,
            "FACEXPLAIN_MAX_INTERPOLATION_STEPS",
        ),
        (
            "a and b of different models",
            "Interpolate",
            d.InterpolateRequest(a=good, b=_template(vals, model=other_name)),
            inv,
            "different FR models",
        ),
        ("bad b", "Interpolate", d.InterpolateRequest(a=good, b=_template(nan)), inv, "b: template contains NaN"),
        ("unknown mode", "Interpolate", d.InterpolateRequest(a=good, b=good, mode=7), inv, "mode 7"),  # type: ignore[arg-type]
        (
            "not an image",
            "Reconstruct",
            d.ReconstructRequest(image=common_pb2.Image(encoded=b"definitely not a png")),
            inv,
            "not a decodable image",
        ),
        ("no image", "Reconstruct", d.ReconstructRequest(), inv, "image is empty"),
        (
            "no face",
            "Reconstruct",
            d.ReconstructRequest(image=common_pb2.Image(encoded=grey.getvalue())),
            fp,
            "no face found",
        ),
    ]


def test_bad_requests_are_rejected_and_the_server_keeps_serving(
    svc: RunningService, client: DecodingClient, good: common_pb2.Template
) -> None:
    seen = []
    for what, method, request, code, fragment in _bad_cases(good):
        err = _rejected(svc, method, request)
        assert err.code() == code, f"{what}: {err.code().name}: {err.details()}"
        assert fragment in (err.details() or ""), f"{what}: {err.details()!r}"
        _assert_serving(client, svc, good)
        seen.append(what)
    assert len(seen) == 19


# -- the registry: hot swap, decoder/FR mismatch, no decoder ------------------------------------------


def test_hot_swap_when_the_alias_moves(
    registry: Registry, client: DecodingClient, good: common_pb2.Template, decoder_dir: Path
) -> None:
    v2 = registry.register_bundle(decoder_dir, DEFAULT_DECODER_MODEL, description="v1's bundle again")
    registry.set_alias(DEFAULT_DECODER_MODEL, CHAMPION, v2.version)
    _wait(lambda: _decoder_version(client, good) == v2.version, 60, "the watcher to serve the new decoder version")
    status = client.model_status()
    assert (status.models[0].model.version, status.models[0].serving) == (v2.version, True)
    registry.set_alias(DEFAULT_DECODER_MODEL, CHAMPION, "1")
    _wait(lambda: _decoder_version(client, good) == "1", 60, "the watcher to serve decoder v1 again")


def test_decoder_for_another_fr_version_is_refused_per_request(
    svc: RunningService,
    registry: Registry,
    client: DecodingClient,
    good: common_pb2.Template,
    decoder_dir: Path,
    tmp_path: Path,
) -> None:
    other = retarget_decoder_bundle(decoder_dir, tmp_path / "for-fr-999", "999")
    v3 = registry.register_bundle(other, DEFAULT_DECODER_MODEL, description="decoder for FR v999")
    assert v3.tags["fr_model_version"] == "999"
    registry.set_alias(DEFAULT_DECODER_MODEL, CHAMPION, v3.version)
    reload = client.reload()
    assert reload.error == ""
    served = [(m.kind, m.model.version) for m in reload.models if m.serving]
    assert served == [("decoder", v3.version), ("embedder", "1")]
    for method, request in (
        ("Decode", decoding_pb2.DecodeRequest(template=good)),
        ("DecodeBatch", decoding_pb2.DecodeBatchRequest(templates=[good])),
        ("Interpolate", decoding_pb2.InterpolateRequest(a=good, b=good)),
        ("Reconstruct", decoding_pb2.ReconstructRequest(image=image_from_path(FACE_A))),
    ):
        err = _rejected(svc, method, request)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (method, err.details())
        details = err.details() or ""
        assert f"{DEFAULT_DECODER_MODEL} v{v3.version}" in details and f"{DEFAULT_FR_MODEL} v999" in details, details
        assert f"FR model {DEFAULT_FR_MODEL} v1" in details, details
    registry.set_alias(DEFAULT_DECODER_MODEL, CHAMPION, "1")
    assert client.reload(DEFAULT_DECODER_MODEL).error == ""
    resp = client.decode(good)
    assert (resp.decoder.version, resp.fr_model.version) == ("1", "1")


def test_reload_by_name(client: DecodingClient) -> None:
    resp = client.reload(DEFAULT_FR_MODEL)
    assert resp.error == "" and not resp.changed and len(resp.models) == 2
    with pytest.raises(grpc.RpcError) as info:
        client.reload("facexplain-fr-unknown")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert DEFAULT_DECODER_MODEL in (info.value.details() or "")


def test_without_a_decoder_the_server_answers_unavailable_until_one_is_registered(
    mlflow: RunningMlflow,
    registry: Registry,
    decoder_dir: Path,
    fr_v1: VersionInfo,
    good: common_pb2.Template,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    logs = tmp_path_factory.mktemp("decoding-empty")
    env = _server_env(mlflow.uri, logs / "cache", FACEXPLAIN_MODEL_NAME=LATE_DECODER)
    empty = start_service("decoding", logs, env=env, timeout=300)
    try:
        for method, request in (
            ("Decode", decoding_pb2.DecodeRequest(template=good)),
            ("DecodeBatch", decoding_pb2.DecodeBatchRequest(templates=[good])),
            ("Interpolate", decoding_pb2.InterpolateRequest(a=good, b=good)),
            ("Reconstruct", decoding_pb2.ReconstructRequest(image=image_from_path(FACE_A))),
        ):
            err = _rejected(empty, method, request)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (method, err.details())
            assert "no decoder loaded yet" in (err.details() or "") and LATE_DECODER in (err.details() or "")
        assert empty.alive()
        # the CLI stops at the first service-side error (exit 4) instead of listing every image as failed
        proc = _reconstruct_cli(
            str(SAMPLE / "orl" / "s1"), "--target", empty.address, "--out", str(logs / "out"), "--quiet"
        )
        assert proc.returncode == 4 and "UNAVAILABLE" in proc.stderr, proc.stderr
        with DecodingClient(empty.address, timeout=60) as c:
            status = c.model_status()
            assert [(m.kind, m.model.name, m.model.version) for m in status.models] == [
                ("embedder", DEFAULT_FR_MODEL, "1")
            ]
            assert status.last_reload_error.startswith("decoder: ") and LATE_DECODER in status.last_reload_error
            assert status.registry_reachable
            # the watcher keeps polling: registering the decoder under that name serves it within a poll
            registry.register_bundle(decoder_dir, LATE_DECODER, description="arrives late", alias=CHAMPION)
            _wait(lambda: _decoder_version(c, good) == "1", 60, "the empty server to load the late decoder")
            resp = c.decode(good)
            assert (resp.decoder.name, resp.fr_model.version) == (LATE_DECODER, "1")
            status = c.model_status()
            assert [m.kind for m in status.models] == ["decoder", "embedder"] and status.last_reload_error == ""
    finally:
        code = empty.stop()
    assert code == 0, f"exit {code}; log tail:\n{empty.log_text()[-2000:]}"


# -- the CLI --------------------------------------------------------------------------------------------


def _reconstruct_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "reconstruct", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_reconstruct_cli_on_the_sample_faces(svc: RunningService, tmp_path: Path) -> None:
    out = tmp_path / "recon"
    proc = _reconstruct_cli(str(SAMPLE), "--target", svc.address, "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    inputs = sorted(p for p in SAMPLE.rglob("*") if p.suffix in (".jpg", ".pgm"))
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(out / "failed.csv", newline="") as fh:
        failed = list(csv.DictReader(fh))
    assert len(rows) + len(failed) == len(inputs) == 36
    assert len(rows) >= 30, failed  # the CelebA faces at least
    for row in rows:
        assert set(row) == {"path", "psnr", "ssim", "identity_cosine", "same_person"}
        assert (SAMPLE / row["path"]).is_file()
        assert math.isfinite(float(row["psnr"]))
        assert -1 <= float(row["ssim"]) <= 1 and -1 <= float(row["identity_cosine"]) <= 1
        assert row["same_person"] in ("true", "false")
    for row in failed:
        assert row["reason"].split(":")[0] in ("FAILED_PRECONDITION", "INVALID_ARGUMENT"), row
    # stems: unique ones kept, the ORL file names (1.pgm in s1 and s2) disambiguated by their path
    assert (out / "001085.aligned.png").is_file() and (out / "001085.recon.png").is_file()
    orl_done = [r["path"] for r in rows if r["path"].startswith("orl/")]
    for rel in orl_done:
        stem = rel.rsplit(".", 1)[0].replace("/", "__")
        assert (out / f"{stem}.recon.png").is_file(), stem
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 2 * len(rows)
    assert all(Image.open(p).size == (OUT_SIZE, OUT_SIZE) for p in pngs)
    assert f"{len(rows)} reconstructed, {len(failed)} failed" in proc.stdout
    assert "mean PSNR" in proc.stdout and f"decoder {DEFAULT_DECODER_MODEL} v1" in proc.stdout


def test_reconstruct_cli_records_failures_and_disambiguates_names(svc: RunningService, tmp_path: Path) -> None:
    src = tmp_path / "in"
    for folder, face in (("a", FACE_A), ("b", FACE_B)):
        (src / folder).mkdir(parents=True)
        shutil.copy(face, src / folder / "same.jpg")
    Image.new("RGB", (120, 90), (128, 128, 128)).save(src / "blank.png")
    (src / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "out"
    proc = _reconstruct_cli(str(src), "--target", svc.address, "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "a__same.aligned.png",
        "a__same.recon.png",
        "b__same.aligned.png",
        "b__same.recon.png",
        "failed.csv",
        "metrics.csv",
    ]
    with open(out / "failed.csv", newline="") as fh:
        failed = list(csv.DictReader(fh))
    assert [r["path"] for r in failed] == ["blank.png"] and failed[0]["reason"].startswith("FAILED_PRECONDITION: ")
    assert "2 reconstructed, 1 failed" in proc.stdout
    # nothing reconstructed at all is an error
    only_blank = tmp_path / "blank"
    only_blank.mkdir()
    shutil.copy(src / "blank.png", only_blank / "blank.png")
    proc = _reconstruct_cli(str(only_blank), "--target", svc.address, "--out", str(tmp_path / "o2"), "--quiet")
    assert proc.returncode == 1 and "no image reconstructed" in proc.stderr


def test_reconstruct_cli_reports_unreachable_service(tmp_path: Path) -> None:
    proc = _reconstruct_cli(
        str(SAMPLE / "orl"), "--target", "127.0.0.1:1", "--out", str(tmp_path / "x"), "--connect-timeout", "2"
    )
    assert proc.returncode == 3 and "not reachable" in proc.stderr
