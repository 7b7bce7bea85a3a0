"""TorchServe as an export target (issue 24): the default FR model exported from the session's real MLflow
registry with `facexplain export torchserve`, served by a real TorchServe on loopback, gives the embedding
service's templates on real faces, over REST and TorchServe's gRPC API, with TorchServe's own batching.

TorchServe is an optional install (`make setup-torchserve`). Without Java the module is skipped; with Java
on the machine but no TorchServe it fails, saying what to run, so CI (which runs `make setup-torchserve`)
never passes by silently skipping it. One server serves the whole module (its start-up takes 15-30 s).

The decoder is the shipped one (models/), bound to the session's FR version and registered under a name of
its own (the session's ``facexplain-dfd-dlib128`` belongs to the training fixture's version numbering).
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
from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL
from facexplain.data.faces import list_images
from registry import CHAMPION, Registry, VersionInfo
from tests.conftest import REPO
from tests.servers import retarget_decoder_bundle

pytestmark = pytest.mark.integration

N_FACES = 6  # sent at once, so TorchServe batches them (batch 16 / 50 ms)
MIN_COSINE = 0.9999
DECODER = "facexplain-dfd-torchserve"
SHIPPED_DECODER = REPO / "models" / DEFAULT_DECODER_MODEL / "1" / "bundle"


@pytest.fixture(scope="module")
def store(
    mlflow: Any, registry: Registry, fr_v1: VersionInfo, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Both archives, written by the CLI from the session's registry: TorchServe model name -> .mar."""
    missing = torchserve_missing()
    if missing:
        if shutil.which("java"):
            pytest.fail(f"java is installed but TorchServe cannot run: {missing}")
        pytest.skip(f"TorchServe needs Java 17: {missing}")
    work = tmp_path_factory.mktemp("ts-export")
    bundle = retarget_decoder_bundle(SHIPPED_DECODER, work / "decoder", fr_v1.version)
    registry.register_bundle(bundle, DECODER, description="shipped decoder (TorchServe test)", alias=CHAMPION)
    out = work / "store"
    for ref in (f"{DEFAULT_FR_MODEL}@{CHAMPION}", f"{DECODER}@{CHAMPION}"):
        assert cli_main(["export", "torchserve", ref, "--out", str(out), "--uri", mlflow.uri]) == 0
    return {DEFAULT_FR_MODEL: out / f"{DEFAULT_FR_MODEL}.mar", DECODER: out / f"{DECODER}.mar"}


@pytest.fixture(scope="module")
def exported(store: dict[str, Path]) -> Path:
    return store[DEFAULT_FR_MODEL]


@pytest.fixture(scope="module")
def torchserve(store: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTorchServe]:
    mars = {name: mar.name for name, mar in store.items()}
    # The worker runs torch on its main thread, whose spinning OpenMP team is 5-10x slower on a busy CI machine
    # (bench/bench_serving.py); passive waiting keeps the module's time down and changes no result.
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    server = start_torchserve(tmp_path_factory.mktemp("ts"), store[DEFAULT_FR_MODEL].parent, mars, env=env, timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def faces(celeba_dir: Path) -> list[Path]:
    return list_images(celeba_dir / "images")[:N_FACES]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def ours(embedding_client: Any, faces: list[Path]) -> np.ndarray:
    """The embedding service's templates of ``faces`` (the reference every TorchServe answer is held to)."""
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
    torchserve: RunningTorchServe, ours: np.ndarray, faces: list[Path]
) -> None:
    from services.torchserve.client import rest_predict, template_of

    def one(p: Path) -> list[float]:
        return template_of(rest_predict(torchserve.rest, DEFAULT_FR_MODEL, p.read_bytes(), "image/jpeg"))

    with ThreadPoolExecutor(len(faces)) as pool:  # concurrent: TorchServe batches them
        ts = np.asarray(list(pool.map(one, faces)), dtype=np.float32)
    cos = _cosines(ts, ours)
    assert cos.min() >= MIN_COSINE, f"TorchServe vs embedding service cosines {np.round(cos, 6).tolist()}"


def test_grpc_templates_equal_the_embedding_service(
    torchserve: RunningTorchServe, ours: np.ndarray, faces: list[Path]
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
    cos = _cosines(ts, ours)
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


def test_decoder_archive_decodes_as_facexplain_does(
    torchserve: RunningTorchServe,
    store: dict[str, Path],
    ours: np.ndarray,
    fr_v1: VersionInfo,
    tmp_path: Path,
) -> None:
    """A service template in, the decoder's face out: the pixels the bundle's own loader and decode give."""
    import io

    import torch
    from google.protobuf import json_format
    from PIL import Image

    from facexplain.artifacts.decoder import load_decoder_bundle
    from services.api.v1 import common_pb2
    from services.torchserve.client import rest_predict

    template = ours[0]
    ref = common_pb2.ModelRef(name=DEFAULT_FR_MODEL, version=fr_v1.version)
    msg = common_pb2.Template(values=template.tolist(), dim=template.size, model=ref)
    png = rest_predict(torchserve.rest, DECODER, json_format.MessageToJson(msg).encode(), "application/json")
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    with zipfile.ZipFile(store[DECODER]) as zf:
        zf.extractall(tmp_path)
    want = load_decoder_bundle(tmp_path / "bundle").decode(torch.from_numpy(template)[None])[0]
    want_px = (want.clamp(0, 1) * 255).round().permute(1, 2, 0).numpy().astype(np.int16)
    assert got.shape == want_px.shape
    assert int(np.abs(got - want_px).max()) <= 1
    other_version = common_pb2.ModelRef(name=DEFAULT_FR_MODEL, version="99")
    other = common_pb2.Template(values=template.tolist(), model=other_version)
    with pytest.raises(urllib.error.HTTPError) as wrong:
        rest_predict(torchserve.rest, DECODER, json_format.MessageToJson(other).encode(), "application/json")
    assert wrong.value.code == 400
    assert json.loads(wrong.value.read())["code"] == "FAILED_PRECONDITION"
