"""The export's pure parts: references, TorchServe's batching settings, a loopback-only config.properties,
and the handler's per-request errors (no TorchServe, no registry: those are tests/integration/test_torchserve.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.torchserve.export import (
    BatchingSettings,
    ExportError,
    Ports,
    parse_ref,
    torchserve_model_name,
    write_config,
)


def test_refs_name_an_alias_or_a_version() -> None:
    assert parse_ref("facexplain-fr-dlib128@champion") == ("facexplain-fr-dlib128", "champion", None)
    assert parse_ref("facexplain-fr-dlib128@3") == ("facexplain-fr-dlib128", None, "3")
    assert parse_ref("m@v12") == ("m", None, "12")
    for bad in ("facexplain-fr-dlib128", "@champion", "m@"):
        with pytest.raises(ExportError, match="NAME@ALIAS"):
            parse_ref(bad)


def test_model_names_are_url_path_segments() -> None:
    assert torchserve_model_name("facexplain-fr-dlib128") == "facexplain-fr-dlib128"
    assert torchserve_model_name("team/model.v2") == "team_model_v2"


def test_model_config_carries_torchserve_batching() -> None:
    yaml = BatchingSettings(batch_size=8, max_batch_delay_ms=20).yaml()
    assert "batchSize: 8\n" in yaml and "maxBatchDelay: 20\n" in yaml
    assert "minWorkers: 1\n" in yaml and "maxWorkers: 1\n" in yaml


def test_config_binds_every_listener_to_loopback(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.properties", tmp_path / "store", Ports(1, 2, 3, 4, 5))
    props = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")
    assert props["inference_address"] == "http://127.0.0.1:1"
    assert props["management_address"] == "http://127.0.0.1:2"
    assert props["metrics_address"] == "http://127.0.0.1:3"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("4", "5")
    assert props["enable_model_api"] == "false"


class _Context:
    def __init__(self) -> None:
        self.status: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int, phrase: str, idx: int) -> None:
        self.status[idx] = (code, phrase)


def test_handler_answers_bad_items_without_failing_the_batch() -> None:
    from services.torchserve.facexplain_handler import LoadedVersion, embed_batch

    class NoModel:
        def analyze(self, images: list[Any], selection: Any) -> list[Any]:
            raise AssertionError("nothing decodable: the pipeline must not run")

    ctx = _Context()
    served = LoadedVersion("embedder", "m", "1", NoModel(), 1024)
    out = embed_batch(served, [{"body": b"not an image"}, {"body": "text"}], ctx)
    assert [o["code"] for o in out] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert ctx.status[0][0] == ctx.status[1][0] == 400
