"""bench/bench_decoder.py heldout: its pure parts (gates, result assembly, served models) and its CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

from bench.bench_decoder import HELDOUT_GATES, SEALED_LIST, _served_models, heldout_gates, heldout_summary
from tests.conftest import REPO
from training.decoder.run import QUALITY_GATES


def test_gates_are_the_training_gates() -> None:
    assert HELDOUT_GATES == {"psnr": 14.0, "ssim": 0.42, "identity_cosine": 0.93}
    assert all(QUALITY_GATES[f"test_{k}"] == v for k, v in HELDOUT_GATES.items())
    assert SEALED_LIST.is_file()


def test_gate_check() -> None:
    assert heldout_gates({"psnr": 14.0, "ssim": 0.42, "identity_cosine": 0.93}) == dict.fromkeys(HELDOUT_GATES, True)
    assert heldout_gates({"psnr": 13.99, "ssim": 0.5, "identity_cosine": math.nan}) == {
        "psnr": False,
        "ssim": True,
        "identity_cosine": False,
    }
    assert not any(heldout_gates({}).values())


def _row(identity: str, psnr: float, ssim: float, cos: float, same: bool) -> dict[str, object]:
    return {"identity": identity, "psnr": psnr, "ssim": ssim, "identity_cosine": cos, "same_person": same}


def test_summary_means_accepted_rate_misses_and_verdict() -> None:
    rows = [_row("1", 15.0, 0.5, 0.95, True), _row("1", 14.0, 0.44, 0.94, False), _row("2", 16.0, 0.47, 0.96, True)]
    out = heldout_summary(rows, [("x.jpg", "FAILED_PRECONDITION: no face", "9")], n_identities=3)
    assert out["faces"] == 3 and out["misses"] == 1 and out["missed"] == [["x.jpg", "FAILED_PRECONDITION: no face"]]
    assert out["identities"] == 3 and out["identities_reconstructed"] == 2
    assert math.isclose(out["mean"]["psnr"], 15.0) and math.isclose(out["mean"]["ssim"], 0.47)
    assert math.isclose(out["mean"]["identity_cosine"], 0.95) and math.isclose(out["mean"]["accepted"], 2 / 3)
    assert out["passed"] is True and all(out["gates"].values())
    low = heldout_summary([_row("1", 13.0, 0.5, 0.95, True)], [], n_identities=1)
    assert low["passed"] is False and low["gates"]["psnr"] is False
    empty = heldout_summary([], [("a", "b", "1")], n_identities=1)
    assert empty["passed"] is False and empty["faces"] == 0 and math.isnan(empty["mean"]["psnr"])


def test_served_models_by_kind() -> None:
    def loaded(kind: str, name: str, version: str, serving: bool) -> SimpleNamespace:
        ref = SimpleNamespace(name=name, version=version, alias="champion")
        return SimpleNamespace(kind=kind, model=ref, serving=serving, metadata={"bundle_sha256": f"sha-{version}"})

    status = SimpleNamespace(
        models=[
            loaded("decoder", "dfd", "1", False),
            loaded("decoder", "dfd", "2", True),
            loaded("embedder", "fr", "3", True),
        ]
    )
    out = _served_models(status)
    assert out["decoder"]["version"] == "2" and out["decoder"]["bundle_sha256"] == "sha-2"
    assert out["embedder"]["name"] == "fr"


def test_help_names_the_subcommand() -> None:
    res = subprocess.run(
        [sys.executable, "bench/bench_decoder.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and "heldout" in res.stdout and "--max-faces" in res.stdout
