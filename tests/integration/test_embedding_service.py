"""The embedding service over real gRPC on loopback: responses, rejections, health, metrics, logs."""

from __future__ import annotations

import io
import re
import struct
import urllib.request
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from cli.launcher import RunningService
from facexplain.data.faces import load_image
from facexplain.pipeline import FacePipeline
from sdk.client import EmbeddingClient, image_from_path, open_channel
from services.api.v1 import common_pb2

pytestmark = pytest.mark.integration


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (what a decompression bomb looks like to a parser)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture(scope="module")
def face_paths(celeba_dir: Path) -> list[Path]:
    return sorted((celeba_dir / "images").glob("*.jpg"))[:4]


@pytest.fixture(scope="module")
def good_image(face_paths: list[Path]) -> common_pb2.Image:
    return image_from_path(face_paths[0])


def _assert_serving(client: EmbeddingClient, good: common_pb2.Image, svc: RunningService) -> None:
    assert svc.alive(), "server process died"
    resp = client.embed(good)
    assert resp.template.dim == 128


def test_embed_names_model_and_returns_geometry(
    embedding_client: EmbeddingClient, good_image: common_pb2.Image
) -> None:
    resp = embedding_client.embed(good_image, return_aligned=True)
    assert resp.model.name == "dlib-resnet128" and resp.model.version == "local"
    assert resp.template.model.name == resp.model.name
    assert resp.template.dim == 128 and len(resp.template.values) == 128 and not resp.template.normalized
    norm = float(np.linalg.norm(resp.template.values))
    assert 0.8 < norm < 2.5, norm  # raw dlib-style templates are not unit length
    assert len(resp.landmarks.points) == 68
    assert resp.face.x2 > resp.face.x1 and resp.face.y2 > resp.face.y1 and 0 < resp.face.score <= 1
    chip = Image.open(io.BytesIO(resp.aligned.encoded))
    assert chip.size == (150, 150)
    normed = embedding_client.embed(good_image, normalize=True)
    assert normed.template.normalized
    assert abs(float(np.linalg.norm(normed.template.values)) - 1.0) < 1e-4


def test_embed_accepts_raw_tensors(embedding_client: EmbeddingClient, face_paths: list[Path]) -> None:
    arr = np.asarray(Image.open(face_paths[1]).convert("RGB"))
    as_u8 = common_pb2.Image(
        tensor=common_pb2.Tensor(dtype=common_pb2.DTYPE_UINT8, shape=list(arr.shape), data=arr.tobytes())
    )
    as_f32 = common_pb2.Image(
        tensor=common_pb2.Tensor(
            dtype=common_pb2.DTYPE_FLOAT32, shape=list(arr.shape), data=(arr.astype("<f4") / 255).tobytes()
        )
    )
    enc = embedding_client.embed(image_from_path(face_paths[1])).template.values
    t8 = embedding_client.embed(as_u8).template.values
    t32 = embedding_client.embed(as_f32).template.values
    assert np.allclose(enc, t8, atol=1e-4)
    assert np.allclose(t8, t32, atol=1e-3)


def _float_chip(chip255: torch.Tensor) -> common_pb2.Image:
    """A (3, S, S) chip in [0, 255] as a float32 HWC tensor in [0, 1] (no 8-bit rounding on the way)."""
    arr = (chip255 / 255.0).clamp(0, 1).permute(1, 2, 0).contiguous().numpy().astype("<f4")
    return common_pb2.Image(
        tensor=common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=list(arr.shape), data=arr.tobytes())
    )


def test_aligned_chip_gets_the_photo_template(
    embedding_client: EmbeddingClient, default_pipeline: FacePipeline, face_paths: list[Path]
) -> None:
    photo = embedding_client.embed(image_from_path(face_paths[0]), return_aligned=True)
    want = np.array(photo.template.values)
    result = default_pipeline.analyze([load_image(face_paths[0])])[0]
    assert result is not None
    # this process's pipeline aligned the chip the service aligned (same weights, same code)
    assert np.abs(result.template.numpy() - want).max() < 1e-5
    aligned = embedding_client.embed(_float_chip(result.chip), aligned=True)
    assert np.abs(np.array(aligned.template.values) - want).max() < 1e-5
    assert aligned.model == photo.model
    assert not aligned.HasField("face") and not aligned.HasField("landmarks")  # no detector ran
    # the PNG chip the service returned is rounded to 8 bits: the same face to the model, not the same bits
    again = np.array(embedding_client.embed(photo.aligned, aligned=True).template.values)
    assert float(again @ want / np.linalg.norm(again) / np.linalg.norm(want)) > 0.9999


def test_aligned_batch_and_wrong_sizes(
    embedding_client: EmbeddingClient, default_pipeline: FacePipeline, face_paths: list[Path]
) -> None:
    photo = embedding_client.embed(image_from_path(face_paths[1]), return_aligned=True)
    small = io.BytesIO()
    Image.open(io.BytesIO(photo.aligned.encoded)).resize((64, 64)).save(small, "PNG")
    resp = embedding_client.embed_batch(
        [photo.aligned, common_pb2.Image(encoded=small.getvalue()), image_from_path(face_paths[1])], aligned=True
    )
    assert [r.WhichOneof("outcome") for r in resp.results] == ["ok", "error", "error"]
    single = embedding_client.embed(photo.aligned, aligned=True).template.values
    assert np.allclose(resp.results[0].ok.template.values, single, atol=1e-5)
    for r in resp.results[1:]:
        assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "must be a 150x150 chip" in r.error.message
    assert "got a 64x64 image" in resp.results[1].error.message
    width, height = Image.open(face_paths[1]).size
    with pytest.raises(grpc.RpcError) as err:
        embedding_client.embed(image_from_path(face_paths[1]), aligned=True)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be a 150x150 chip" in err.value.details() and f"got a {width}x{height} image" in err.value.details()
    assert embedding_client.embed(image_from_path(face_paths[1])).template.dim == 128  # photos still served


BAD_INPUTS = {
    "non-image bytes": (
        common_pb2.Image(encoded=b"this is not an image at all" * 10),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a decodable image",
    ),
    "empty image": (common_pb2.Image(), grpc.StatusCode.INVALID_ARGUMENT, "image is empty"),
    "0x0 tensor": (
        common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DTYPE_UINT8, shape=[0, 0, 3])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no pixels",
    ),
    "0x0 png header": (common_pb2.Image(encoded=_png_header_only(0, 0)), grpc.StatusCode.INVALID_ARGUMENT, ""),
    "20000x20000 png": (
        common_pb2.Image(encoded=_png_header_only(20000, 20000)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "exceeds the limit",
    ),
    "wrong tensor dtype": (
        common_pb2.Image(
            tensor=common_pb2.Tensor(dtype=common_pb2.DTYPE_UNSPECIFIED, shape=[4, 4, 3], data=b"\0" * 48)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "dtype",
    ),
    "wrong tensor shape": (
        common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DTYPE_UINT8, shape=[4, 4, 4], data=b"\0" * 64)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "shape",
    ),
    "tensor bytes do not match shape": (
        common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DTYPE_UINT8, shape=[8, 8, 3], data=b"\0" * 10)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs 192",
    ),
    "float tensor with NaN": (
        common_pb2.Image(
            tensor=common_pb2.Tensor(
                dtype=common_pb2.DTYPE_FLOAT32, shape=[2, 2], data=np.array([0, np.nan, 0, 0], "<f4").tobytes()
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NaN",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_rejected_and_server_keeps_serving(
    case: str, embedding_client: EmbeddingClient, embedding_service: RunningService, good_image: common_pb2.Image
) -> None:
    image, code, fragment = BAD_INPUTS[case]
    with pytest.raises(grpc.RpcError) as err:
        embedding_client.embed(image)
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details()
    _assert_serving(embedding_client, good_image, embedding_service)


def test_truncated_jpeg(
    embedding_client: EmbeddingClient,
    embedding_service: RunningService,
    face_paths: list[Path],
    good_image: common_pb2.Image,
) -> None:
    data = face_paths[2].read_bytes()
    with pytest.raises(grpc.RpcError) as err:
        embedding_client.embed(common_pb2.Image(encoded=data[: len(data) // 3]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated" in err.value.details() or "corrupt" in err.value.details()
    _assert_serving(embedding_client, good_image, embedding_service)


def test_no_face_is_failed_precondition(
    embedding_client: EmbeddingClient, embedding_service: RunningService, good_image: common_pb2.Image
) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(90, 110, size=(200, 240, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    with pytest.raises(grpc.RpcError) as err:
        embedding_client.embed(common_pb2.Image(encoded=buf.getvalue()))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no face found" in err.value.details()
    _assert_serving(embedding_client, good_image, embedding_service)


def test_oversized_message_is_resource_exhausted(
    embedding_service: RunningService, embedding_client: EmbeddingClient, good_image: common_pb2.Image
) -> None:
    big = common_pb2.Image(encoded=b"\xff" * (17 * 1024 * 1024))  # server limit is 16 MiB by default
    with pytest.raises(grpc.RpcError) as err:
        embedding_client.embed(big)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_serving(embedding_client, good_image, embedding_service)


def test_batch_reports_per_item_errors(embedding_client: EmbeddingClient, face_paths: list[Path]) -> None:
    images = [
        image_from_path(face_paths[0]),
        common_pb2.Image(encoded=b"garbage"),
        image_from_path(face_paths[1]),
        common_pb2.Image(encoded=_png_header_only(20000, 20000)),
    ]
    resp = embedding_client.embed_batch(images)
    assert [r.index for r in resp.results] == [0, 1, 2, 3]
    outcomes = [r.WhichOneof("outcome") for r in resp.results]
    assert outcomes == ["ok", "error", "ok", "error"]
    assert resp.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert resp.results[3].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    single = embedding_client.embed(images[2]).template.values
    assert np.allclose(resp.results[2].ok.template.values, single, atol=1e-4)
    assert resp.model.name == "dlib-resnet128"


def test_batch_over_limit(embedding_client: EmbeddingClient, good_image: common_pb2.Image) -> None:
    with pytest.raises(grpc.RpcError) as err:
        embedding_client.embed_batch([good_image] * 33)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "FACEXPLAIN_MAX_BATCH_SIZE" in err.value.details()


def test_verify_images_and_templates(embedding_client: EmbeddingClient, orl_dir: Path) -> None:
    a, b, c = orl_dir / "s1" / "1.pgm", orl_dir / "s1" / "2.pgm", orl_dir / "s2" / "1.pgm"
    same = embedding_client.verify(
        common_pb2.Probe(image=image_from_path(a)), common_pb2.Probe(image=image_from_path(b))
    )
    diff = embedding_client.verify(
        common_pb2.Probe(image=image_from_path(a)), common_pb2.Probe(image=image_from_path(c))
    )
    assert same.rule.metric == "l2" and same.rule.threshold == pytest.approx(0.6) and same.rule.accept_below
    assert same.same_person and not diff.same_person
    assert same.l2_distance < diff.l2_distance
    # the same decision from templates as from images
    again = embedding_client.verify(common_pb2.Probe(template=same.a), common_pb2.Probe(template=same.b))
    assert again.l2_distance == pytest.approx(same.l2_distance, abs=1e-5) and again.same_person


@pytest.mark.parametrize(
    "values, code, fragment",
    [
        ([0.1] * 64, grpc.StatusCode.INVALID_ARGUMENT, "dimension 64"),
        ([float("nan")] + [0.1] * 127, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        ([0.0] * 128, grpc.StatusCode.INVALID_ARGUMENT, "zero vector"),
    ],
)
def test_verify_rejects_bad_templates(
    embedding_client: EmbeddingClient,
    good_image: common_pb2.Image,
    values: list[float],
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    bad = common_pb2.Probe(template=common_pb2.Template(values=values))
    with pytest.raises(grpc.RpcError) as err:
        embedding_client.verify(bad, common_pb2.Probe(image=good_image))
    assert err.value.code() == code and fragment in err.value.details()


def test_verify_rejects_template_of_other_model(
    embedding_client: EmbeddingClient, good_image: common_pb2.Image
) -> None:
    other = common_pb2.Template(values=[0.1] * 128, model=common_pb2.ModelRef(name="some-other-fr", version="3"))
    with pytest.raises(grpc.RpcError) as err:
        embedding_client.verify(common_pb2.Probe(template=other), common_pb2.Probe(image=good_image))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_landmarks(embedding_client: EmbeddingClient, good_image: common_pb2.Image) -> None:
    resp = embedding_client.landmarks(good_image)
    assert len(resp.faces) == 1 and len(resp.faces[0].landmarks.points) == 68
    box = resp.faces[0].box
    xs = [p.x for p in resp.faces[0].landmarks.points]
    assert box.x1 - 20 < np.mean(xs) < box.x2 + 20


def test_deadline_is_honoured(embedding_client: EmbeddingClient, face_paths: list[Path]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        embedding_client.embed_batch([image_from_path(p) for p in face_paths] * 4, timeout=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_health_and_reflection(embedding_service: RunningService) -> None:
    channel = open_channel(embedding_service.address)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "facexplain.v1.EmbeddingService"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "facexplain.v1.EmbeddingService" in names and "grpc.health.v1.Health" in names
    channel.close()


def test_model_status(embedding_client: EmbeddingClient) -> None:
    status = embedding_client.model_status()
    assert status.models[0].model.name == "dlib-resnet128" and status.models[0].kind == "embedder"
    assert status.models[0].metadata["template_dim"] == "128"
    assert status.models[0].loaded_at.seconds > 0


def test_metrics_endpoint(
    embedding_service: RunningService, embedding_client: EmbeddingClient, good_image: common_pb2.Image
) -> None:
    embedding_client.embed(good_image)
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{embedding_service.metrics_port}/metrics", timeout=10).read().decode()
    )
    assert re.search(r'facexplain_requests_total\{code="OK",method="Embed",service="embedding"\} [1-9]', text)
    assert 'facexplain_model_served{model="dlib-resnet128",service="embedding",version="local"} 1.0' in text
    assert "facexplain_request_seconds_bucket" in text


def test_logs_hold_no_biometric_data(
    embedding_service: RunningService, embedding_client: EmbeddingClient, good_image: common_pb2.Image
) -> None:
    values = embedding_client.embed(good_image).template.values
    log = embedding_service.log_text()
    assert '"method": "Embed"' in log  # the log does record the events
    for v in values[:16]:
        assert f"{v:.6f}"[:8] not in log
    assert not re.search(r"(-?\d+\.\d{3,}[,\s]+){8,}", log), "a run of numbers (a template?) reached the log"
    assert "\\xff\\xd8" not in log and "JFIF" not in log
