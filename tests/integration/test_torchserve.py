"""TorchServe as an export target (issue 24): the default FR model exported from the session's real MLflow
registry with `facexplain export torchserve`, served by a real TorchServe on loopback, gives the embedding
service's templates on real faces, over REST and TorchServe's gRPC API, with TorchServe's own batching.

TorchServe is an optional install (`make setup-torchserve`). Without Java the module is skipped; with Java
on the machine but no TorchServe it fails, saying what to run, so CI (which runs `make setup-torchserve`)
never passes by silently skipping it. One server serves the whole module (its start-up takes 15-30 s).
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cli.main import main as cli_main
from cli.torchserve import RunningTorchServe, start_torchserve, torchserve_missing
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL
from facexplain.data.faces import list_images
from registry import CHAMPION, Registry, VersionInfo

pytestmark = pytest.mark.integration

N_FACES = 8  # sent at once, so TorchServe batches them (batch 16 / 50 ms)
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def exported(mlflow: Any, fr_v1: VersionInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = torchserve_missing()
    if missing:
        if shutil.which("java"):
            pytest.fail(f"java is installed but TorchServe cannot run: {missing}")
        pytest.skip(f"TorchServe needs Java 17: {missing}")
    store = tmp_path_factory.mktemp("ts-store")
    ref = f"{DEFAULT_FR_MODEL}@{CHAMPION}"
    assert cli_main(["export", "torchserve", ref, "--out", str(store), "--uri", mlflow.uri]) == 0
    return store / f"{DEFAULT_FR_MODEL}.mar"


@pytest.fixture(scope="module")
def torchserve(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTorchServe]:
    server = start_torchserve(
        tmp_path_factory.mktemp("ts"), exported.parent, {DEFAULT_FR_MODEL: exported.name}, timeout=300
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def faces(celeba_dir: Path) -> list[Path]:
    return list_images(celeba_dir / "images")[:N_FACES]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _service_templates(embedding_client: Any, faces: list[Path]) -> np.ndarray:
    from sdk.client import image_from_path, template_array

    resp = embedding_client.embed_batch([image_from_path(p) for p in faces])
    assert all(r.WhichOneof("outcome") == "ok" for r in resp.results)
    return np.stack([template_array(r.ok.template) for r in resp.results])


def test_archive_holds_the_verified_bundle_and_batching(exported: Path, registry: Registry, fr_v1: VersionInfo) -> None:
    with zipfile.ZipFile(exported) as zf:
        names = set(zf.namelist())
        spec = json.loads(zf.read("facexplain-export.json"))
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
        config = zf.read("model-config.yaml").decode()
    assert "bundle/bundle.json" in names and "facexplain_handler.py" in names
    assert manifest["model"]["handler"] == "facexplain_handler.py"
    assert (spec["name"], spec["version"], spec["kind"]) == (DEFAULT_FR_MODEL, fr_v1.version, "embedder")
    assert spec["bundle_sha256"] == registry.get_version(DEFAULT_FR_MODEL, fr_v1.version).tags["bundle_sha256"]
    assert "batchSize: 16" in config and "maxBatchDelay: 50" in config


def test_altered_archive_is_refused(exported: Path, tmp_path: Path) -> None:
    """The worker loads through the bundle loader: a changed weight byte or a swapped digest stops it, by name."""
    from facexplain.artifacts.bundle import BundleError
    from services.torchserve.facexplain_handler import load_exported

    with zipfile.ZipFile(exported) as zf:
        zf.extractall(tmp_path)
    shard = sorted((tmp_path / "bundle" / "weights").glob("face_recognition_model*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"corrupt artifact: sha256 of weights/{shard.name}"):
        load_exported(tmp_path)
    spec_path = tmp_path / "facexplain-export.json"
    spec = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps({**spec, "bundle_sha256": "0" * 64}))
    with pytest.raises(BundleError, match="differs from the exported"):
        load_exported(tmp_path)


def test_rest_templates_equal_the_embedding_service(
    torchserve: RunningTorchServe, embedding_client: Any, faces: list[Path]
) -> None:
    from services.torchserve.client import rest_predict, template_of

    def one(p: Path) -> list[float]:
        return template_of(rest_predict(torchserve.rest, DEFAULT_FR_MODEL, p.read_bytes(), "image/jpeg"))

    with ThreadPoolExecutor(len(faces)) as pool:  # concurrent: TorchServe batches them
        ts = np.asarray(list(pool.map(one, faces)), dtype=np.float32)
    ours = _service_templates(embedding_client, faces)
    cos = _cosines(ts, ours)
    assert cos.min() >= MIN_COSINE, f"TorchServe vs embedding service cosines {np.round(cos, 6).tolist()}"


def test_grpc_templates_equal_the_embedding_service(
    torchserve: RunningTorchServe, embedding_client: Any, faces: list[Path]
) -> None:
    from services.torchserve.client import TorchServeGrpc, template_of

    client = TorchServeGrpc(torchserve.grpc_target)
    try:
        with ThreadPoolExecutor(len(faces)) as pool:
            ts = np.asarray(
                list(pool.map(lambda p: template_of(client.predict(DEFAULT_FR_MODEL, p.read_bytes())), faces)),
                dtype=np.float32,
            )
    finally:
        client.close()
    cos = _cosines(ts, _service_templates(embedding_client, faces))
    assert cos.min() >= MIN_COSINE, f"TorchServe (gRPC) vs embedding service cosines {np.round(cos, 6).tolist()}"


def test_bad_input_gets_a_precise_status(torchserve: RunningTorchServe) -> None:
    import io

    from PIL import Image

    from services.torchserve.client import rest_predict

    with pytest.raises(urllib.error.HTTPError) as bad:
        rest_predict(torchserve.rest, DEFAULT_FR_MODEL, b"not an image at all", "application/octet-stream")
    assert bad.value.code == 400
    assert json.loads(bad.value.read())["code"] == "INVALID_ARGUMENT"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, format="PNG")
    with pytest.raises(urllib.error.HTTPError) as noface:
        rest_predict(torchserve.rest, DEFAULT_FR_MODEL, buf.getvalue(), "image/png")
    assert noface.value.code == 422
    assert json.loads(noface.value.read())["code"] == "FAILED_PRECONDITION"
