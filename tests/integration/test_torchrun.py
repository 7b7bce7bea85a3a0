"""Decoder training under ``torchrun --nproc_per_node=2`` (gloo, CPU) against the session's real registry.

What a Kubeflow ``PyTorchJob`` runs on several nodes, here as two processes on loopback: the real CLI
(``-m cli.main train decoder``), the real MLflow server, the real registry. The same tiny config then
trains in one process, and the two registered versions must be the same kind of thing: the same
bundle files, metadata keys, version tags and loader. Rank 1 must leave no trace in MLflow: one run
per training, and only rank 0 prints the result.

Both runs share a fresh var folder, so the two-process run is the one that downloads the FR model and
builds the face set (the node's first rank builds, the other waits and reads the cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli.launcher import REPO, RunningMlflow
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL
from registry import Registry, VersionInfo

# Two trainings and a face set built from scratch: about 80 s on 2 idle cores, minutes when they are busy.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

MODEL = "facexplain-dfd-torchrun-test"  # a name of its own: the session's decoder v1 stays what other tests expect
EXPERIMENT = "facexplain-decoders"

# data/sample (30 faces), 1 epoch, narrow decoder, batch 4 per rank: a few steps on every rank.
TINY = [
    "--preset", "demo", "--epochs", "1", "--batch-size", "4", "--base-channels", "8", "--max-channels", "32",
    "--threads", "1", "--register-as", MODEL, "--quiet",
]  # fmt: skip


def _train(command: list[str], registry_uri: str, fr: VersionInfo, out: Path, var: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FACEXPLAIN_VAR_DIR": str(var), "OMP_NUM_THREADS": "1"}
    env.pop("FACEXPLAIN_PRINT_SUMMARY_JSON", None)
    proc = subprocess.run(
        [*command, "-m", "cli.main", "train", "decoder", *TINY,
         "--registry", registry_uri, "--fr-model", f"{fr.name}@{fr.version}", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _runs(registry_uri: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return {}
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=1000)}


def _key_tree(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata's keys, nested, without the values (weights, figures, ids differ from run to run)."""
    return {k: _key_tree(v) if isinstance(v, dict) else type(v).__name__ for k, v in meta.items()}


def _files(bundle: Path) -> list[str]:
    return sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def trained(mlflow: RunningMlflow, fr_v1: VersionInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two-process run, then the one-process run of the same config; what each registered and left."""
    assert fr_v1.name == DEFAULT_FR_MODEL
    var = tmp_path_factory.mktemp("var")
    out: dict[str, Any] = {}
    before = set(_runs(mlflow.uri))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp_out = tmp_path_factory.mktemp("ddp")
    out["ddp_proc"] = _train(["nice", "-n", "15", *torchrun], mlflow.uri, fr_v1, ddp_out, var)
    after_ddp = set(_runs(mlflow.uri))
    one_out = tmp_path_factory.mktemp("one")
    out["one_proc"] = _train(["nice", "-n", "15", sys.executable], mlflow.uri, fr_v1, one_out, var)
    after_one = set(_runs(mlflow.uri))
    out["ddp_runs"], out["one_runs"] = after_ddp - before, after_one - after_ddp
    out["ddp"] = json.loads((ddp_out / "summary.json").read_text())
    out["one"] = json.loads((one_out / "summary.json").read_text())
    out["ddp_out"], out["one_out"] = ddp_out, one_out
    return out


def test_two_ranks_register_one_version_from_one_run(trained: dict[str, Any], mlflow: RunningMlflow) -> None:
    ddp = trained["ddp"]
    assert ddp["epochs_run"] == 1 and ddp["registered"]["name"] == MODEL
    # rank 1 made no MLflow run: the job made exactly one, and the version comes from it
    assert trained["ddp_runs"] == {ddp["run_id"]}
    assert len(trained["one_runs"]) == 1
    run = _runs(mlflow.uri)[ddp["run_id"]]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["dist_world_size"] == "2" and params["dist_backend"] == "gloo"
    assert params["dist_global_batch_size"] == "8" and len(params["dist_rank_seeds"].split(",")) == 2
    assert params["seed"] == "0"  # the run's seed, recorded as in one process
    # the logged training figures are every rank's: the faces of the epoch's steps, both shards
    assert run.data.metrics["train_total"] > 0
    one_params = _runs(mlflow.uri)[trained["one"]["run_id"]].data.params
    assert not [k for k in one_params if k.startswith("dist_")]  # one process: the parameters it always had
    # rank 1 wrote nothing of its own: the output folder holds what one process leaves
    assert _files(trained["ddp_out"]) == _files(trained["one_out"])
    # only rank 0 reports: one result line, one registration line
    stdout = trained["ddp_proc"].stdout
    assert stdout.count("registered facexplain-dfd-torchrun-test version") == 1, stdout
    assert stdout.count("MLflow run ") == 1, stdout


def test_same_kind_of_bundle_as_one_process(trained: dict[str, Any], registry: Registry, tmp_path: Path) -> None:
    from facexplain.artifacts.bundle import read_metadata
    from facexplain.artifacts.decoder import KIND_DECODER, load_decoder_bundle, validate_decoder

    ddp_reg, one_reg = trained["ddp"]["registered"], trained["one"]["registered"]
    assert ddp_reg["name"] == one_reg["name"] == MODEL and ddp_reg["version"] != one_reg["version"]
    ddp_v = registry.get_version(MODEL, ddp_reg["version"])
    one_v = registry.get_version(MODEL, one_reg["version"])
    assert ddp_v.run_id == trained["ddp"]["run_id"] and one_v.run_id == trained["one"]["run_id"]
    assert sorted(ddp_v.tags) == sorted(one_v.tags)
    for key in ("kind", "fr_model_name", "fr_model_version", "gates_passed", "data_manifest_sha256"):
        assert ddp_v.tags[key] == one_v.tags[key], key
    assert ddp_v.tags["kind"] == KIND_DECODER
    ddp_dir = registry.download(ddp_v, tmp_path / "cache")
    one_dir = registry.download(one_v, tmp_path / "cache")
    assert _files(ddp_dir) == _files(one_dir)
    ddp_meta, one_meta = read_metadata(ddp_dir), read_metadata(one_dir)
    assert _key_tree(ddp_meta) == _key_tree(one_meta)
    assert ddp_meta["kind"] == KIND_DECODER and ddp_meta["fr_model"] == one_meta["fr_model"]
    assert ddp_meta["decoder"] == one_meta["decoder"]  # the same architecture
    assert ddp_meta["training"]["seed"] == one_meta["training"]["seed"] == 0
    assert ddp_meta["training"]["faces"] == one_meta["training"]["faces"]  # one split, whatever the ranks
    # it loads and passes its golden check as the services load it
    report = validate_decoder(load_decoder_bundle(ddp_dir), ddp_dir)  # raises BundleError on any failure
    assert report.batch_max_abs_diff <= 1e-4
    import torch

    ddp_w = torch.load(ddp_dir / ddp_meta["components"]["decoder"]["file"], weights_only=True)
    one_w = torch.load(one_dir / one_meta["components"]["decoder"]["file"], weights_only=True)
    assert ddp_w.keys() == one_w.keys()
    assert all(ddp_w[k].shape == one_w[k].shape for k in ddp_w)
