"""Promotion policy: failed gates never take an alias implicitly; forcing needs a reason and is recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from facexplain.artifacts.bundle import BundleError, flat_metadata, read_metadata
from facexplain.artifacts.decoder import save_decoder_bundle
from facexplain.models.decoder import DecoderConfig, DeepFaceDecoder
from registry import (
    CANDIDATE,
    CHALLENGER,
    CHAMPION,
    PromotionRefused,
    Registry,
    RegistryNotFound,
    VersionInfo,
    gates_failed,
    initial_alias,
    promote,
    registration_alias,
    served_tags,
)

NAME = "facexplain-dfd-test"
GOOD = {"kind": "decoder", "bundle_format": "1", "bundle_sha256": "ab" * 32, "template_dim": "128",
        "input_size": "150", "fr_model_name": "facexplain-fr-dlib128", "fr_model_version": "1"}  # fmt: skip


class FakeRegistry:
    def __init__(self, tags: dict[str, dict[str, str]], aliases: dict[str, str] | None = None) -> None:
        self.tags = tags
        self.aliases = dict(aliases or {})

    def get_version(self, name: str, version: str) -> VersionInfo:
        if version not in self.tags:
            raise RegistryNotFound(f"{name} v{version} not found")
        return VersionInfo(name, version, tags=dict(self.tags[version]))

    def resolve(self, name: str, alias: str) -> VersionInfo:
        if alias not in self.aliases:
            raise RegistryNotFound(f"{name}@{alias} not found")
        return self.get_version(name, self.aliases[alias])

    def set_alias(self, name: str, alias: str, version: str) -> VersionInfo:
        self.aliases[alias] = version
        return self.get_version(name, version)

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self.tags[version][key] = value


def _reg(**kw: Any) -> Any:
    return FakeRegistry(
        {"1": dict(GOOD), "2": {**GOOD, "gates_passed": "false", "gates_failed": "test_psnr,test_rank1"},
         "3": {**GOOD, "gates_passed": "true"}},
        **kw,
    )  # fmt: skip


def test_gates_failed_reads_the_tag() -> None:
    assert gates_failed({"gates_passed": "false"}) and gates_failed({"gates_passed": "False "})
    assert not gates_failed({"gates_passed": "true"}) and not gates_failed({})  # no gates recorded: no refusal
    # a held-out miss is a failed gate even when the training run's own gates passed
    assert gates_failed({"gates_passed": "true", "heldout_passed": "false"})
    assert not gates_failed({"gates_passed": "true", "heldout_passed": "true"})


def test_registration_alias_never_makes_failed_gates_champion() -> None:
    empty, served = _reg(), _reg(aliases={CHAMPION: "1"})
    failed, passed = {"gates_passed": "false"}, {"gates_passed": "true"}
    assert registration_alias(empty, NAME, "auto", passed) == CHAMPION
    assert registration_alias(served, NAME, "auto", passed) == CHALLENGER
    assert registration_alias(served, NAME, CHAMPION, passed) == CHAMPION  # asked for, gates passed
    for wanted in ("auto", CHAMPION, CHALLENGER):
        assert registration_alias(empty, NAME, wanted, failed) == CANDIDATE
        assert registration_alias(served, NAME, wanted, failed) == CANDIDATE
    assert registration_alias(empty, NAME, "", failed) == ""
    assert registration_alias(empty, NAME, "auto", None) == CHAMPION  # no gates recorded (SAD/FAD, defaults)
    assert initial_alias(empty, NAME) == CHAMPION and initial_alias(served, NAME) == ""
    assert initial_alias(empty, NAME, failed) == CANDIDATE


def test_promote_refuses_failed_gates_unless_forced_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = _reg(aliases={CHAMPION: "1"})
    with pytest.raises(PromotionRefused, match=r"quality gates failed \(gates_passed=false: test_psnr,test_rank1\)"):
        promote(reg, NAME, "2")
    with pytest.raises(PromotionRefused, match="needs --reason"):
        promote(reg, NAME, "2", force=True)
    assert reg.aliases[CHAMPION] == "1" and "promotion_forced_by" not in reg.tags["2"]
    # candidate may always point at it; a passing version needs no force and leaves no record
    assert promote(reg, NAME, "2", CANDIDATE).forced == ()
    done = promote(reg, NAME, "3")
    assert done.previous == "1" and done.forced == () and "promotion_forced_by" not in reg.tags["3"]
    monkeypatch.setenv("FACEXPLAIN_USER", "alice")
    done = promote(reg, NAME, "2", force=True, reason="demo on 30 faces")
    assert reg.aliases[CHAMPION] == "2" and done.previous == "3" and len(done.forced) == 1
    tags = reg.tags["2"]
    assert tags["promotion_forced_by"] == "alice" and tags["promotion_forced_reason"] == "demo on 30 faces"
    assert tags["promotion_forced_at"].startswith("20") and done.info.tags["promotion_forced_by"] == "alice"
    promote(reg, NAME, "2", CHALLENGER, force=True, reason="canary", by="bob")
    assert reg.tags["2"]["promotion_forced_by"] == "bob"


def test_promote_refuses_missing_tags_and_force_records_it() -> None:
    reg = FakeRegistry({"1": {"kind": "decoder"}})
    with pytest.raises(PromotionRefused, match="lacks required tags"):
        promote(reg, NAME, "1")
    done = promote(reg, NAME, "1", force=True, by="ci")  # as before: no reason needed for missing tags
    assert done.forced and reg.tags["1"]["promotion_forced_by"] == "ci"


def test_served_tags_are_quality_and_promotion_records() -> None:
    tags = {**GOOD, "test_psnr": "14.1", "val_auc": "0.9", "gates_passed": "false", "gates_failed": "x",
            "promotion_forced_by": "a", "data_manifest_sha256": "cd", "mlflow.user": "x"}  # fmt: skip
    assert set(served_tags(tags)) == {
        "test_psnr", "val_auc", "gates_passed", "gates_failed", "promotion_forced_by", "data_manifest_sha256"
    }  # fmt: skip


def _decoder_bundle(out: Path, gates_passed: bool = False) -> Path:
    torch.manual_seed(0)
    dec = DeepFaceDecoder(DecoderConfig(out_size=32, base_channels=8, max_channels=32))
    golden = torch.randn(128, generator=torch.Generator().manual_seed(1)) * 0.13
    save_decoder_bundle(
        out, dec, name=NAME, fr_model={"name": "facexplain-fr-dlib128", "version": "1", "bundle_sha256": "ab" * 32},
        golden_template=golden, chip_padding=0.25,
        training={"metrics": {"test_psnr": 12.345678, "test_ssim": 0.3, "test_identity_cosine": 0.8,
                              "test_accepted": 0.5, "test_rank1": 0.25, "train_seconds": 3.0},
                  "gates_passed": gates_passed},
    )  # fmt: skip
    return out


def test_decoder_tags_carry_the_held_out_metrics(tmp_path: Path) -> None:
    flat = flat_metadata(read_metadata(_decoder_bundle(tmp_path / "b")))
    assert flat["test_psnr"] == "12.3457" and flat["test_rank1"] == "0.2500" and flat["test_accepted"] == "0.5000"
    assert flat["gates_passed"] == "false" and "train_seconds" not in flat


def test_registration_refuses_a_bundle_whose_bytes_changed(tmp_path: Path) -> None:
    bundle = _decoder_bundle(tmp_path / "b")
    weights = bundle / "weights" / "decoder.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    reg = Registry("http://127.0.0.1:9")  # never reached: the check comes first
    with pytest.raises(BundleError, match=r"refusing to register .* corrupt artifact: sha256 of weights/decoder\.pt"):
        reg.register_bundle(bundle, NAME)
    assert reg._client is None
