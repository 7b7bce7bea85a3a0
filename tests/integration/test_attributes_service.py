"""The attributes service over real gRPC, with the session's real MLflow registry, FR model and decoder.

The registry (conftest.py, shared with the decoding and directions tests) holds the default FR model
as ``facexplain-fr-dlib128`` v1 and the demo decoder trained for it as ``facexplain-dfd-dlib128`` v1,
both champion. One attributes server follows both aliases (no accessory probe set configured, so no
accessory attributes), reads ServerDatasets under a temporary data root, and standardises differences
by the bundled sample faces. Importance runs on the bundled sample faces (data/sample, 36 images).

Rejections go over a plain channel (no retries, no wait-for-ready) so the status a test sees is the
server's own answer, and each is followed by a good request: a bad input never takes a server down.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from cli.launcher import REPO, RunningMlflow, RunningService, start_service
from facexplain.artifacts.decoder import DEFAULT_DECODER_MODEL
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL
from registry import CHAMPION, Registry, VersionInfo, promote
from sdk.client import (
    AttributesClient,
    folder_dataset,
    image_from_path,
    inline_dataset,
    labeled_image,
    server_dataset,
    wait_ready,
)
from services.api.v1 import attributes_pb2, attributes_pb2_grpc, common_pb2
from tests.service_env import registry_service_env

pytestmark = pytest.mark.integration

SAMPLE = REPO / "data" / "sample"
FACE_A = SAMPLE / "celeba" / "id7201" / "001085.jpg"
FACE_B = sorted((SAMPLE / "celeba" / "id7205").iterdir())[0]
DIM = 128
OUT_SIZE = 64
FR_V1 = common_pb2.ModelRef(name=DEFAULT_FR_MODEL, version="1")
# Attributes ranked in the tests: one or more per group (texture's 49 patches would only cost time).
RANKED = ["yaw", "pitch", "roll", "skin_colour", "hair_colour", "age", "gender", "expression"]
RANKED += ["nose_width_to_mouth_width", "interocular_to_face_width", "lbp_r3_c3"]
GROUP_ORDER = ["geometry", "pose", "colour", "age", "gender", "expression", "accessory", "texture"]
# The ranking against the shuffled control needs a trained decoder (the session's demo decoder sees 24
# faces): bench/bench_attributes.py measures it with the registered one.
SEED = 11
BOOTSTRAP = 20


def _env(uri: str, cache: Path, **extra: str) -> dict[str, str]:
    return registry_service_env(
        uri,
        cache,
        FACEXPLAIN_MAX_DATASET_ITEMS="200",
        FACEXPLAIN_BATCH_SIZE="8",
        FACEXPLAIN_MAX_BOOTSTRAP="500",
        FACEXPLAIN_MAX_PERMUTATIONS="300",
        **extra,
    )


def _rejected(svc: RunningService, method: str, request: Any) -> grpc.RpcError:
    """Call ``method`` once without retries (draining a stream); it must fail. Returns the error."""
    ch = grpc.insecure_channel(svc.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    stub = attributes_pb2_grpc.AttributesServiceStub(ch)
    with ch, pytest.raises(grpc.RpcError) as info:
        result = getattr(stub, method)(request, timeout=300)
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


def _blank_png(seed: int) -> common_pb2.Image:
    """A smooth colour gradient with no face in it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:160, 0:200]
    arr = np.stack([x * 255 / 200, y * 255 / 160, np.full_like(x, rng.integers(0, 255))], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return common_pb2.Image(encoded=buf.getvalue())


def _template(values: Any, model: common_pb2.ModelRef = FR_V1) -> common_pb2.Template:
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    return common_pb2.Template(values=v.tolist(), dim=int(v.size), model=model)


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def _rows(table: attributes_pb2.ImportanceTable) -> dict[str, attributes_pb2.ImportanceRow]:
    return {r.attribute: r for r in table.rows}


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """faces/: 8 sample faces (the first photo of each of the sample's first 8 CelebA people); outside/: a
    folder beside the root."""
    base = tmp_path_factory.mktemp("attributes-data")
    root = base / "root"
    (root / "faces").mkdir(parents=True)
    for ident in sorted((SAMPLE / "celeba").iterdir())[:8]:
        first = sorted(ident.iterdir())[0]
        shutil.copy(first, root / "faces" / f"{ident.name}.jpg")
    (base / "outside").mkdir()
    shutil.copy(FACE_A, base / "outside" / "a.jpg")
    return root


@pytest.fixture(scope="module")
def svc(
    mlflow: RunningMlflow, decoder_v1: VersionInfo, data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    logs = tmp_path_factory.mktemp("attributes-svc")
    env = _env(mlflow.uri, logs / "cache", FACEXPLAIN_DATA_ROOT=str(data_root))
    service = start_service("attributes", logs, env=env, timeout=300)
    yield service
    code = service.stop()
    assert code == 0, f"attributes service exit {code}; log tail:\n{service.log_text()[-2000:]}"
    # biometric data never reaches the log: no run of numbers that could be a template
    assert not re.search(r"(-?\d+\.\d+,\s*){8,}", service.log_text())


OTHER_FR = "facexplain-sadfad-attributes-test"  # their own names: the SAD/FAD tests own facexplain-sadfad-casia
OTHER_DECODER = "facexplain-dfd-sadfad-attributes-test"


@pytest.fixture(scope="module")
def other_svc(
    mlflow: RunningMlflow, sample_faceset: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    """A second attributes service on a different registered FR model: a SAD/FAD net (smoke preset, 16
    filters) trained on the sample faces, with a decoder trained for it by `facexplain train decoder`."""
    from tests.servers import train_decoder_cli
    from training.sadfad.config import PRESETS, TrainSADFADConfig
    from training.sadfad.run import train_sadfad

    cfg = TrainSADFADConfig().replace(**PRESETS["smoke"]).replace(register_as=OTHER_FR, alias=CHAMPION)
    work = tmp_path_factory.mktemp("attr-sadfad")
    fr = train_sadfad(cfg, out_dir=work, tracking_uri=mlflow.uri, faces=sample_faceset, progress=False)
    assert fr.registered["name"] == OTHER_FR
    out = tmp_path_factory.mktemp("attr-sadfad-decoder")
    summary = train_decoder_cli(
        mlflow.uri, OTHER_FR, str(fr.registered["version"]), out,
        "--alias", CHAMPION, "--register-as", OTHER_DECODER, "--perceptual", "dlib_resnet", "--epochs", "3",
    )  # fmt: skip
    if summary["registered"]["alias"] != CHAMPION:
        promote(
            Registry(mlflow.uri, timeout_s=10, max_retries=2),
            OTHER_DECODER,
            summary["registered"]["version"],
            CHAMPION,
            force=True,
            reason="test fixture: a 3-epoch decoder for the second FR model of the compare test",
            by="tests/integration/test_attributes_service.py",
        )
    logs = tmp_path_factory.mktemp("attributes-other-svc")
    env = _env(
        mlflow.uri, logs / "cache", FACEXPLAIN_FR_MODEL_NAME=OTHER_FR, FACEXPLAIN_DECODER_MODEL_NAME=OTHER_DECODER
    )
    service = start_service("attributes", logs, env=env, timeout=300)
    yield service
    assert service.stop() == 0, service.log_text()[-2000:]


@pytest.fixture(scope="module")
def client(svc: RunningService) -> Iterator[AttributesClient]:
    c = AttributesClient(svc.address, timeout=600)
    wait_ready(c.channel, 30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def sample_dataset() -> common_pb2.Dataset:
    """The 36 bundled sample faces (30 CelebA, 6 ORL) plus two images without a face, inline."""
    dataset, _names = folder_dataset(str(SAMPLE), "sample")
    for k in range(2):
        dataset.inline.items.append(labeled_image(f"blank{k}.png", image=_blank_png(k)))
    return dataset


@pytest.fixture(scope="module")
def importance_events(client: AttributesClient, sample_dataset: common_pb2.Dataset) -> list[Any]:
    events = client.importance(
        sample_dataset, attributes=RANKED, n_bootstrap=BOOTSTRAP, seed=SEED, shuffled_control=True
    )
    return list(events)


@pytest.fixture(scope="module")
def table(importance_events: list[Any]) -> attributes_pb2.ImportanceTable:
    assert importance_events[-1].WhichOneof("event") == "table"
    return importance_events[-1].table


# -- catalogue and status -------------------------------------------------------------------------------


def test_list_attributes_covers_every_group_in_order(client: AttributesClient) -> None:
    resp = client.list_attributes()
    infos = list(resp.attributes)
    names = [a.name for a in infos]
    assert len(names) == len(set(names))
    groups = [a.group for a in infos]
    # grouped, in the API's group order; no probe set configured -> no accessory attributes
    seen = [g for k, g in enumerate(groups) if k == 0 or groups[k - 1] != g]
    assert seen == [g for g in GROUP_ORDER if g != "accessory"]
    assert sum(g == "geometry" for g in groups) >= 20 and sum(g == "texture" for g in groups) == 49
    by_name = {a.name: a for a in infos}
    assert set(RANKED) <= set(by_name)
    assert by_name["yaw"].unit == "deg" and list(by_name["yaw"].components) == ["yaw"]
    assert len(by_name["expression"].components) == 7 and by_name["skin_colour"].components
    assert by_name["age"].estimator.name == "face-api/age_gender_model" and by_name["age"].estimator.version
    assert not by_name["yaw"].estimator.name  # computed from landmarks, no model of its own
    assert all(a.description for a in infos)
    assert (resp.fr_model.name, resp.fr_model.version) == (DEFAULT_FR_MODEL, "1")
    assert (resp.decoder.name, resp.decoder.version) == (DEFAULT_DECODER_MODEL, "1")


def test_model_status_and_reload(client: AttributesClient, mlflow: RunningMlflow) -> None:
    status = client.model_status()
    kinds: dict[str, list[Any]] = {}
    for m in status.models:
        kinds.setdefault(m.kind, []).append(m)
    fr, decoder = kinds["embedder"][0], kinds["decoder"][0]
    assert (fr.model.name, fr.model.version, fr.model.alias, fr.serving) == (DEFAULT_FR_MODEL, "1", CHAMPION, True)
    assert (decoder.model.name, decoder.model.version) == (DEFAULT_DECODER_MODEL, "1")
    assert {m.model.name for m in kinds["attribute_estimator"]} >= {"face-api/age_gender_model"}
    assert status.registry_reachable and status.registry_uri == mlflow.uri
    reload = client.reload()
    assert reload.error == "" and not reload.changed


# -- sample-specific ------------------------------------------------------------------------------------


def test_recover_attributes_from_an_image_and_from_its_template(client: AttributesClient) -> None:
    resp = client.recover_attributes(common_pb2.Probe(image=image_from_path(FACE_A)), return_decoded=True)
    listed = [a.name for a in client.list_attributes().attributes]
    assert [v.name for v in resp.recovered] == listed == [v.name for v in resp.original]
    assert (resp.fr_model.name, resp.fr_model.version) == (DEFAULT_FR_MODEL, "1")
    assert (resp.decoder.name, resp.decoder.version) == (DEFAULT_DECODER_MODEL, "1")
    assert (resp.template.model.name, resp.template.model.version) == (DEFAULT_FR_MODEL, "1")
    assert len(resp.template.values) == DIM
    assert _png(resp.decoded).shape == (OUT_SIZE, OUT_SIZE, 3)
    original = {v.name: list(v.value) for v in resp.original}
    recovered = {v.name: list(v.value) for v in resp.recovered}
    assert 5 < original["age"][0] < 90 and 0 <= original["gender"][0] <= 1
    assert math.isclose(sum(original["expression"]), 1.0, abs_tol=1e-3)
    assert all(math.isfinite(x) for x in recovered["skin_colour"])
    # the same template again gives the same recovered values, and no original
    again = client.recover_attributes(common_pb2.Probe(template=resp.template), attributes=["age", "skin_colour"])
    assert [v.name for v in again.recovered] == ["skin_colour", "age"]  # catalogue order, not request order
    assert not again.original and not again.decoded.encoded
    for v in again.recovered:
        np.testing.assert_allclose(list(v.value), recovered[v.name], rtol=1e-5, atol=1e-5)


def test_diff_attributes_sorted_by_standardized_magnitude(client: AttributesClient) -> None:
    a = common_pb2.Probe(image=image_from_path(FACE_A))
    b = common_pb2.Probe(image=image_from_path(FACE_B))
    resp = client.diff_attributes(a, b, attributes=RANKED, return_decoded=True)
    assert sorted(d.name for d in resp.diffs) == sorted(RANKED)
    finite = [d for d in resp.diffs if math.isfinite(d.magnitude)]
    keys = [(d.standardized, d.magnitude) for d in finite]
    assert keys == sorted(keys, reverse=True)
    assert [d.name for d in resp.diffs[: len(finite)]] == [d.name for d in finite]  # not estimable last
    for d in finite:
        np.testing.assert_allclose(list(d.delta), np.subtract(list(d.b), list(d.a)), atol=1e-4)
        assert math.isclose(d.magnitude, float(np.linalg.norm(list(d.delta))), rel_tol=1e-4, abs_tol=1e-5)
    # the reference faces give every estimable attribute a scale: standardized is known
    assert sum(d.standardized > 0 for d in finite) >= len(finite) - 1
    assert _png(resp.decoded_a).shape == _png(resp.decoded_b).shape == (OUT_SIZE, OUT_SIZE, 3)
    # a face against itself: nothing differs
    same = client.diff_attributes(common_pb2.Probe(template=resp.a), common_pb2.Probe(template=resp.a))
    assert all(d.magnitude == 0 for d in same.diffs if math.isfinite(d.magnitude))


# -- model-specific importance ---------------------------------------------------------------------------


def test_importance_streams_progress_then_one_table(
    importance_events: list[Any], table: attributes_pb2.ImportanceTable, sample_dataset: common_pb2.Dataset
) -> None:
    kinds = [e.WhichOneof("event") for e in importance_events]
    assert kinds[-1] == "table" and set(kinds[:-1]) == {"progress"}
    progress = [e.progress for e in importance_events[:-1]]
    stages = [p.stage for p in progress]
    assert stages.index("embedding") < stages.index("recovery") < stages.index("importance")
    n_given = len(sample_dataset.inline.items)
    # images without a face are skipped and counted (both blank images at least)
    skipped = [p for p in progress if p.stage == "skipped"]
    assert len(skipped) == 1 and skipped[0].done >= 2 and skipped[0].total == n_given
    assert "no face found" in skipped[0].message
    assert table.n_items == n_given - skipped[0].done >= 25
    last = [p for p in progress if p.stage == "importance"][-1]
    assert last.done == last.total == len(RANKED)
    assert (table.fr_model.name, table.fr_model.version) == (DEFAULT_FR_MODEL, "1")
    assert (table.decoder.name, table.decoder.version) == (DEFAULT_DECODER_MODEL, "1")
    assert table.estimator == "knn" and table.seed == SEED and table.n_bootstrap == BOOTSTRAP
    assert math.isclose(table.ci_level, 0.95, rel_tol=1e-6) and not table.mlflow_run_id
    assert re.fullmatch(r"[0-9a-f]{64}", table.data_manifest_sha256)


def test_importance_table_rows_are_ordered_with_intervals(table: attributes_pb2.ImportanceTable) -> None:
    rows = list(table.rows)
    summary = ", ".join(f"{r.attribute} {r.mi:.3f}/{r.control_mi:.3f} (n={r.n})" for r in rows)
    print(f"sample faces, MI/control: {summary}")
    assert sorted(r.attribute for r in rows) == sorted(RANKED)
    mi = [r.mi for r in rows if math.isfinite(r.mi)]
    assert mi == sorted(mi, reverse=True) and len(mi) >= 6, summary
    assert [r.attribute for r in rows[len(mi) :]] == [r.attribute for r in rows if not math.isfinite(r.mi)]
    for r in rows:
        if math.isfinite(r.mi):
            assert r.ci_low <= r.mi + 1e-9 and r.mi - 1e-9 <= r.ci_high and r.n >= 20, summary
            assert r.mi >= 0 and r.control_mi >= 0
            assert 1 / 21 - 1e-9 <= r.p_value <= 1.0  # 20 shuffles: (1 + hits) / 21


def test_importance_is_reproducible_and_logs_an_mlflow_run(
    client: AttributesClient,
    sample_dataset: common_pb2.Dataset,
    table: attributes_pb2.ImportanceTable,
    registry: Registry,
) -> None:
    subset = ["yaw", "age", "gender"]
    again = client.run_importance(
        client.importance(
            sample_dataset,
            attributes=subset,
            n_bootstrap=BOOTSTRAP,
            seed=SEED,
            shuffled_control=True,
            log_run=True,
            experiment="attr-tests",
        )
    )
    # every row is seeded from (seed, attribute name): the same rows whatever else is asked for
    first = _rows(table)
    assert [r.attribute for r in again.rows] == [a for a in (r.attribute for r in table.rows) if a in subset]
    for r in again.rows:
        assert r == first[r.attribute] or (math.isnan(r.mi) and math.isnan(first[r.attribute].mi))
    assert again.data_manifest_sha256 == table.data_manifest_sha256
    run = registry.client.get_run(again.mlflow_run_id)
    assert run.data.params["seed"] == str(SEED) and run.data.params["fr_model"] == f"{DEFAULT_FR_MODEL}@1"
    assert run.data.params["data_manifest_sha256"] == table.data_manifest_sha256
    assert run.data.params["dataset_skipped"] == str(len(sample_dataset.inline.items) - table.n_items)
    artifacts = {a.path for a in registry.client.list_artifacts(again.mlflow_run_id, "importance")}
    assert artifacts == {"importance/importance.csv", "importance/importance.json", "importance/importance.png"}
    assert registry.client.get_experiment(run.info.experiment_id).name == "attr-tests"


def test_importance_on_a_server_dataset_with_a_different_seed(client: AttributesClient) -> None:
    """A ServerDataset (8 faces) and the discrete estimator: it runs, labels the table, and the seed is recorded."""
    result = client.run_importance(
        client.importance(server_dataset("faces"), attributes=["gender", "yaw"], estimator="discrete", seed=3)
    )
    assert result.estimator == "discrete" and result.seed == 3 and result.n_items == 8
    assert all(
        r.ci_low == r.mi == r.ci_high and r.control_mi == 0 and r.p_value == 1
        for r in result.rows
        if math.isfinite(r.mi)
    )


def test_cancelling_importance_stops_the_job_and_the_server_keeps_serving(
    client: AttributesClient, svc: RunningService, sample_dataset: common_pb2.Dataset
) -> None:
    call = client.importance(sample_dataset, n_bootstrap=400, seed=1, shuffled_control=True)
    for event in call:
        if event.WhichOneof("event") == "progress" and event.progress.stage == "embedding" and event.progress.done:
            break
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    _wait(lambda: "job importance cancelled" in svc.log_text(), 60, "the importance job to stop")
    assert svc.alive()
    resp = client.recover_attributes(common_pb2.Probe(image=image_from_path(FACE_A)), attributes=["yaw"], timeout=120)
    assert [v.name for v in resp.recovered] == ["yaw"]


# -- rejections -------------------------------------------------------------------------------------------


def test_every_rejection_has_its_code_and_a_clear_message(
    svc: RunningService, client: AttributesClient, data_root: Path
) -> None:
    face = common_pb2.Probe(image=image_from_path(FACE_A))
    small = inline_dataset(
        [labeled_image(f"f{i}", image=image_from_path(p)) for i, p in enumerate(sorted(data_root.glob("faces/*")))]
    )
    cases: list[tuple[str, Any, grpc.StatusCode, str]] = [
        # unknown attribute: the message lists the known ones
        (
            "RecoverAttributes",
            attributes_pb2.RecoverAttributesRequest(probe=face, attributes=["yaw", "beard_length"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"unknown attribute.*'beard_length'.*known:.*yaw",
        ),
        (
            "Importance",
            attributes_pb2.ImportanceRequest(dataset=small, attributes=["nose_size"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"unknown attribute.*'nose_size'.*known:",
        ),
        (
            "DiffAttributes",
            attributes_pb2.DiffAttributesRequest(a=face, b=face, attributes=["bogus"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"unknown attribute",
        ),
        # empty datasets
        (
            "Importance",
            attributes_pb2.ImportanceRequest(dataset=inline_dataset([])),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"no items",
        ),
        (
            "Importance",
            attributes_pb2.ImportanceRequest(dataset=common_pb2.Dataset(name="x")),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"dataset is empty",
        ),
        # no face anywhere in the dataset, or in a single probe
        (
            "Importance",
            attributes_pb2.ImportanceRequest(
                dataset=inline_dataset([labeled_image(f"b{k}", image=_blank_png(k)) for k in range(3)])
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            r"no usable face.*no face found",
        ),
        (
            "RecoverAttributes",
            attributes_pb2.RecoverAttributesRequest(probe=common_pb2.Probe(image=_blank_png(0))),
            grpc.StatusCode.FAILED_PRECONDITION,
            r"no face found",
        ),
        (
            "DiffAttributes",
            attributes_pb2.DiffAttributesRequest(a=face, b=common_pb2.Probe(image=_blank_png(1))),
            grpc.StatusCode.FAILED_PRECONDITION,
            r"^b: no face found",
        ),
        # bad templates and probes
        (
            "RecoverAttributes",
            attributes_pb2.RecoverAttributesRequest(probe=common_pb2.Probe(template=_template(np.ones(64)))),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"dimension 64",
        ),
        (
            "RecoverAttributes",
            attributes_pb2.RecoverAttributesRequest(
                probe=common_pb2.Probe(template=_template([math.nan] + [0.1] * (DIM - 1)))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"NaN",
        ),
        (
            "RecoverAttributes",
            attributes_pb2.RecoverAttributesRequest(
                probe=common_pb2.Probe(
                    template=_template(np.ones(DIM), common_pb2.ModelRef(name="facexplain-fr-other", version="1"))
                )
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            r"facexplain-fr-other",
        ),
        (
            "RecoverAttributes",
            attributes_pb2.RecoverAttributesRequest(probe=common_pb2.Probe()),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"empty",
        ),
        (
            "RecoverAttributes",
            attributes_pb2.RecoverAttributesRequest(
                probe=common_pb2.Probe(image=common_pb2.Image(encoded=b"not an image"))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"not a decodable image",
        ),
        # unknown estimator and bad job parameters
        (
            "Importance",
            attributes_pb2.ImportanceRequest(dataset=small, estimator="binning"),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"unknown estimator 'binning'.*knn.*discrete",
        ),
        (
            "Importance",
            attributes_pb2.ImportanceRequest(dataset=small, n_bootstrap=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"n_bootstrap",
        ),
        (
            "Importance",
            attributes_pb2.ImportanceRequest(dataset=small, n_bootstrap=501),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            r"FACEXPLAIN_MAX_BOOTSTRAP",
        ),
        (
            "Importance",
            attributes_pb2.ImportanceRequest(dataset=small, shuffled_control=True, n_permutations=-2),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"n_permutations is -2",
        ),
        (
            "Importance",
            attributes_pb2.ImportanceRequest(dataset=small, shuffled_control=True, n_permutations=301),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            r"FACEXPLAIN_MAX_PERMUTATIONS",
        ),
        (
            "Importance",
            attributes_pb2.ImportanceRequest(dataset=small, ci_level=1.5),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"ci_level",
        ),
        # templates cannot be measured: importance needs the images
        (
            "Importance",
            attributes_pb2.ImportanceRequest(
                dataset=inline_dataset([labeled_image("t", template=_template(np.ones(DIM)))])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"needs images",
        ),
        # ServerDataset outside the data root
        (
            "Importance",
            attributes_pb2.ImportanceRequest(dataset=server_dataset("../outside")),
            grpc.StatusCode.PERMISSION_DENIED,
            r"leaves the server's data root",
        ),
    ]
    for method, request, code, pattern in cases:
        err = _rejected(svc, method, request)
        assert err.code() == code, f"{method} {pattern}: got {err.code()} {err.details()}"
        assert re.search(pattern, err.details() or ""), f"{method}: {err.details()!r} does not match {pattern!r}"
    assert svc.alive()
    resp = client.recover_attributes(face, attributes=["age"], timeout=120)
    assert [v.name for v in resp.recovered] == ["age"]


# -- CLI ---------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_cli_importance_writes_csv_and_png_and_compares_two_services(
    svc: RunningService, other_svc: RunningService, data_root: Path, tmp_path: Path
) -> None:
    """--compare runs the same job on a second service serving a different registered FR model (and its
    own decoder): each column is that model's own table, and the two models' tables differ."""
    out = tmp_path / "imp"
    attrs = ["hair_colour", "age", "gender"]
    proc = _cli(
        "attributes", "importance", "--target", svc.address, "--data", str(data_root / "faces"),
        "--attributes", *attrs, "--bootstrap", "5", "--seed", "2", "--control", "--quiet",
        "--fr-model", f"{DEFAULT_FR_MODEL}@1", "--compare", other_svc.address, "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "importance.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["attribute"] for r in rows] and sorted(r["attribute"] for r in rows) == sorted(attrs)
    assert set(rows[0]) == {"attribute", "group", "mi", "ci_low", "ci_high", "control_mi", "n", "p_value"}
    assert all(0 <= int(r["n"]) <= 8 for r in rows) and rows[0]["n"] == "8", rows
    for png in (out / "importance.png", out / "importance_compare.png", out / "compare" / "importance.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 300
    with open(out / "compare" / "importance.csv") as fh:
        other_rows = list(csv.DictReader(fh))
    with open(out / "importance_compare.csv") as fh:
        side = list(csv.DictReader(fh))
    assert len(side) == len(attrs)
    # one column set per model, named by the model that produced it
    a, b = f"{DEFAULT_FR_MODEL}@1", f"{OTHER_FR}@1"
    assert [k for k in side[0] if k.endswith("_mi") and "control" not in k] == [f"{a}_mi", f"{b}_mi"]
    # each column is its own service's table
    mine = {r["attribute"]: float(r["mi"]) for r in rows}
    theirs = {r["attribute"]: float(r["mi"]) for r in other_rows}
    for r in side:
        assert float(r[f"{a}_mi"]) == pytest.approx(mine[r["attribute"]], abs=1e-5)
        assert float(r[f"{b}_mi"]) == pytest.approx(theirs[r["attribute"]], abs=1e-5)
    print("I(a; â) default vs SAD/FAD:", {k: (round(mine[k], 4), round(theirs[k], 4)) for k in attrs})
    # two different networks with their own decoders recover different attributes from the same faces
    assert any(abs(mine[k] - theirs[k]) > 1e-3 for k in attrs), (mine, theirs)
    assert "3 attributes ranked" in proc.stdout and f"side by side with {OTHER_FR} v1" in proc.stdout
    # a wrong FR model is refused before any work
    bad = _cli(
        "attributes", "importance", "--target", svc.address, "--data", str(data_root / "faces"),
        "--fr-model", "facexplain-fr-other", "--out", str(tmp_path / "bad"), "--quiet",
    )  # fmt: skip
    assert bad.returncode == 4 and "facexplain-fr-other" in bad.stderr
