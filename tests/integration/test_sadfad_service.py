"""SAD/FAD nets, trained by the real pipeline, registered and served through gRPC like the default model.

All five variants of the paper (base, base-aug, sad, fad, sad+fad) train a few steps of the
``smoke`` preset on the bundled sample faces against the session's real MLflow server; sad+fad
goes through the `facexplain train sadfad` CLI as a user runs it, the other four in-process
(same function, no second interpreter start). Each becomes a version of one registered model.
A real embedding service then serves that model by its alias and, as the alias moves, every
variant in turn: the templates it returns have the variant's dimension and name its version.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cli.launcher import REPO, RunningMlflow, RunningService, start_service
from facexplain.data.faceset import FaceSet
from registry import CHAMPION, Registry
from sdk.client import EmbeddingClient, wait_ready
from services.api.v1 import common_pb2
from training.sadfad.config import PRESETS, VARIANT_NAMES, TrainSADFADConfig

pytestmark = pytest.mark.integration

NAME = "facexplain-sadfad-celeba"
FACE = REPO / "data" / "sample" / "celeba" / "id7201" / "001085.jpg"
OTHER_PERSON = REPO / "data" / "sample" / "celeba" / "id7202" / "006155.jpg"


def _train_cli(uri: str, out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable, "-m", "cli.main", "train", "sadfad", "--preset", "smoke",
            "--variant", "sad+fad", "--registry", uri, "--out", str(out), "--quiet", "--alias", CHAMPION,
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def trained(
    mlflow: RunningMlflow, sample_faceset: FaceSet, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """variant -> its run summary (registered version included)."""
    from training.sadfad.run import train_sadfad

    out: dict[str, dict[str, Any]] = {"sad+fad": _train_cli(mlflow.uri, tmp_path_factory.mktemp("sadfad-cli"))}
    smoke = TrainSADFADConfig().replace(**PRESETS["smoke"])
    for variant in VARIANT_NAMES:
        if variant in out:
            continue
        cfg = smoke.replace(variant=variant, alias="challenger")
        summary = train_sadfad(
            cfg,
            out_dir=tmp_path_factory.mktemp(f"sadfad-{variant.replace('+', '-')}"),
            tracking_uri=mlflow.uri,
            faces=sample_faceset,
            progress=False,
        )
        out[variant] = {"registered": summary.registered, "metrics": summary.metrics, "run_id": summary.run_id}
    return out


@pytest.fixture(scope="module")
def served(
    mlflow: RunningMlflow, trained: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningService, EmbeddingClient]]:
    logs = tmp_path_factory.mktemp("sadfad-svc")
    svc = start_service(
        "embedding",
        logs,
        env={
            "FACEXPLAIN_REGISTRY_URI": mlflow.uri,
            "FACEXPLAIN_MODEL_NAME": NAME,
            "FACEXPLAIN_MODEL_ALIAS": CHAMPION,
            "FACEXPLAIN_POLL_INTERVAL_S": "3600",  # the test reloads explicitly
            "FACEXPLAIN_MODEL_CACHE_DIR": str(logs / "cache"),
        },
        timeout=180,
    )
    client = EmbeddingClient(svc.address, timeout=120)
    wait_ready(client.channel, 30)
    yield svc, client
    client.close()
    assert svc.stop() == 0, svc.log_text()[-2000:]


def _image(path: Path) -> common_pb2.Image:
    return common_pb2.Image(encoded=path.read_bytes())


def test_every_variant_trains_tracks_and_registers(trained: dict[str, dict[str, Any]], mlflow: RunningMlflow) -> None:
    registry = Registry(mlflow.uri, timeout_s=10, max_retries=2)
    versions = {v: s["registered"]["version"] for v, s in trained.items()}
    assert sorted(trained) == sorted(VARIANT_NAMES) and len(set(versions.values())) == 5
    assert registry.resolve(NAME, CHAMPION).version == versions["sad+fad"]
    for variant, version in versions.items():
        info = registry.get_version(NAME, version)
        assert info.tags["variant"] == variant
        assert info.tags["kind"] == "embedder" and info.tags["template_dim"] == "16"
        assert float(info.tags["val_clean_auc"]) >= 0.0  # validation verification was measured and recorded


def test_registered_variants_are_served_by_alias(
    served: tuple[RunningService, EmbeddingClient], trained: dict[str, dict[str, Any]], mlflow: RunningMlflow
) -> None:
    _, client = served
    registry = Registry(mlflow.uri, timeout_s=10, max_retries=2)
    try:
        for variant in VARIANT_NAMES:
            version = trained[variant]["registered"]["version"]
            registry.set_alias(NAME, CHAMPION, version)
            reload = client.stub.Reload(common_pb2.ReloadRequest(), timeout=120)
            assert reload.error == "", reload.error
            resp = client.embed(_image(FACE))
            assert (resp.model.name, resp.model.version) == (NAME, version), variant
            assert resp.template.dim == 16 and len(resp.template.values) == 16
            # verification runs under the rule calibrated on the variant's validation identities
            probe_a = common_pb2.Probe(image=_image(FACE))
            same = client.verify(probe_a, probe_a)
            assert same.same_person and same.rule.metric == "cosine"
            other = client.verify(probe_a, common_pb2.Probe(image=_image(OTHER_PERSON)))
            assert other.rule.threshold == pytest.approx(same.rule.threshold)
    finally:
        registry.set_alias(NAME, CHAMPION, trained["sad+fad"]["registered"]["version"])


def test_bad_input_to_a_served_sadfad_model_is_rejected_and_it_keeps_serving(
    served: tuple[RunningService, EmbeddingClient],
) -> None:
    _, client = served
    with pytest.raises(grpc.RpcError) as err:
        client.embed(common_pb2.Image(encoded=b"not an image"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wrong_dim = common_pb2.Probe(template=common_pb2.Template(values=[0.1] * 128, dim=128))
    with pytest.raises(grpc.RpcError) as err:
        client.verify(wrong_dim, common_pb2.Probe(image=_image(FACE)))
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert client.embed(_image(FACE)).template.dim == 16
