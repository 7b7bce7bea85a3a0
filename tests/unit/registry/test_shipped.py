"""Shipped models (registry.shipped): pins checked before anything is parsed, FR binding by digest, policy.

The first tests build a small models/ folder of their own; the last ones check the repository's real one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from facexplain.artifacts.bundle import bundle_digest, read_metadata
from facexplain.artifacts.decoder import save_decoder_bundle
from facexplain.artifacts.embedder import DEFAULT_FR_MODEL
from facexplain.models.decoder import DecoderConfig, DeepFaceDecoder
from registry import CANDIDATE, CHAMPION, RegistryNotFound, VersionInfo
from registry.shipped import (
    SUMS,
    ShippedModelError,
    list_shipped,
    register_shipped,
    verify_pins,
    write_sums,
)
from tests.conftest import REPO

NAME = "facexplain-dfd-test"
FR_DIGEST = "ab" * 32


def _models(tmp: Path, gates_passed: str = "true") -> Path:
    models = tmp / "models"
    root = models / NAME / "1"
    torch.manual_seed(0)
    dec = DeepFaceDecoder(DecoderConfig(template_dim=128, out_size=32, base_channels=4, max_channels=8))
    save_decoder_bundle(
        root / "bundle",
        dec,
        name=NAME,
        fr_model={"name": DEFAULT_FR_MODEL, "version": "1", "bundle_sha256": FR_DIGEST},
        golden_template=torch.randn(128, generator=torch.Generator().manual_seed(1)) * 0.13,
        chip_padding=0.25,
    )
    card = {"name": NAME, "release": "1", "summary": "a test decoder", "mlflow_run_id": "r1",
            "tags": {"test_psnr": "14.5", "heldout_psnr": "14.2", "gates_passed": gates_passed}}  # fmt: skip
    (root / "card.json").write_text(json.dumps(card))
    (root / "MODEL_CARD.md").write_text("# a test decoder\n")
    write_sums(models)
    return models


class FakeRegistry:
    """What register_shipped asks of a registry; versions kept in memory."""

    def __init__(self, fr_version: str | None, store: Path) -> None:
        self.fr_version = fr_version
        self.store = store
        self.versions: list[tuple[str, Path, dict[str, str]]] = []
        self.aliases: dict[str, str] = {}

    def find_by_digest(self, name: str, digest: str) -> VersionInfo | None:
        if name == DEFAULT_FR_MODEL:
            return VersionInfo(name, self.fr_version) if self.fr_version and digest == FR_DIGEST else None
        for k, (_n, bundle, tags) in enumerate(self.versions, 1):
            if bundle_digest(read_metadata(bundle)) == digest:
                return VersionInfo(name, str(k), tags=tags)
        return None

    def resolve(self, name: str, alias: str) -> VersionInfo:
        if alias not in self.aliases:
            raise RegistryNotFound(alias)
        return VersionInfo(name, self.aliases[alias])

    def register_bundle(self, bundle: Path, name: str, *, alias: str | None, extra_tags: dict[str, str], **_: Any):  # type: ignore[no-untyped-def]
        keep = self.store / f"{name}-v{len(self.versions) + 1}"
        shutil.copytree(bundle, keep)
        self.versions.append((name, keep, extra_tags))
        version = str(len(self.versions))
        if alias:
            self.aliases[alias] = version
        return VersionInfo(name, version, tags=extra_tags)


def test_pins_cover_every_file_and_name_the_one_that_changed(tmp_path: Path) -> None:
    models = _models(tmp_path)
    verify_pins(models)
    (shipped,) = list_shipped(models)
    assert shipped.label == f"models/{NAME}/1" and shipped.fr_model == {
        "name": DEFAULT_FR_MODEL, "version": "1", "bundle_sha256": FR_DIGEST}  # fmt: skip

    weights = models / NAME / "1" / "bundle" / "weights" / "decoder.pt"
    good = weights.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    weights.write_bytes(bytes(bad))
    with pytest.raises(ShippedModelError, match=rf"models/{NAME}/1/bundle/weights/decoder\.pt was changed"):
        list_shipped(models)
    weights.write_bytes(good)

    card = models / NAME / "1" / "card.json"  # metadata is pinned as much as weights
    card.write_text(card.read_text().replace("14.2", "19.9"))
    with pytest.raises(ShippedModelError, match=rf"models/{NAME}/1/card\.json was changed"):
        verify_pins(models)

    models2 = _models(tmp_path / "again")
    (models2 / NAME / "1" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ShippedModelError, match=rf"models/{NAME}/1/extra\.bin is not pinned"):
        verify_pins(models2)
    (models2 / NAME / "1" / "extra.bin").unlink()
    (models2 / NAME / "1" / "MODEL_CARD.md").unlink()
    with pytest.raises(ShippedModelError, match=rf"models/{NAME}/1/MODEL_CARD\.md is pinned .* but missing"):
        verify_pins(models2)
    (models2 / SUMS).unlink()
    with pytest.raises(ShippedModelError, match="not pinned"):
        verify_pins(models2)


def test_registration_binds_the_fr_version_holding_the_digest_and_keeps_the_shipped_bytes(tmp_path: Path) -> None:
    models = _models(tmp_path)
    (shipped,) = list_shipped(models)
    reg = FakeRegistry(fr_version="3", store=tmp_path)  # this registry holds the FR weights as v3, not v1
    done = register_shipped(reg, shipped)  # type: ignore[arg-type]
    assert done.new and done.alias == CHAMPION and done.info.version == "1"
    _name, registered, tags = reg.versions[0]
    assert read_metadata(registered)["fr_model"]["version"] == "3"
    assert tags["shipped_from"] == f"models/{NAME}/1" and tags["heldout_psnr"] == "14.2"
    assert tags["shipped_training_run"] == "r1"
    verify_pins(models)  # the shipped bytes are untouched
    assert read_metadata(shipped.bundle)["fr_model"]["version"] == "1"
    again = register_shipped(reg, shipped)  # type: ignore[arg-type]
    assert not again.new and again.info.version == "1" and len(reg.versions) == 1


def test_registration_needs_the_fr_model_and_never_makes_a_failed_model_champion(tmp_path: Path) -> None:
    (shipped,) = list_shipped(_models(tmp_path))
    with pytest.raises(ShippedModelError, match=r"does not hold: register that model first"):
        register_shipped(FakeRegistry(fr_version=None, store=tmp_path), shipped)  # type: ignore[arg-type]
    (failed,) = list_shipped(_models(tmp_path / "f", gates_passed="false"))
    reg = FakeRegistry(fr_version="1", store=tmp_path)
    done = register_shipped(reg, failed)  # type: ignore[arg-type]
    assert done.alias == CANDIDATE and CHAMPION not in reg.aliases


# -- the repository's own models/ ------------------------------------------------------------------------

MODELS = REPO / "models"


def test_the_shipped_models_are_pinned_small_and_carded() -> None:
    shipped = list_shipped(MODELS)  # pins verified
    assert {
        "facexplain-dfd-dlib128",
        "facexplain-probes-faceapi",
        "facexplain-sadfad-celeba",
        "facexplain-dfd-sadfad",
    } <= {m.name for m in shipped}
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total < 60e6, f"models/ holds {total / 1e6:.1f} MB"
    for m in shipped:
        card = m.card
        for key in ("summary", "commit", "mlflow_run_id", "recipe", "data", "metrics", "tags"):
            assert card.get(key), (m.label, key)
        assert card["recipe"]["train_command"] and card["recipe"]["recreate"]
        assert "non-commercial" in card["data"]["terms"]
        # the tags registration uses agree with the bundle's own record of its gates, where it keeps one
        recorded = (read_metadata(m.bundle).get("training") or {}).get("gates_passed")
        gates = card["tags"].get("gates_passed")
        # an FR net trained by a pipeline without gates (the SAD/FAD net) records none, and claims none
        assert gates in ("true", "false") or (gates is None and recorded is None and card["kind"] == "embedder")
        assert recorded is None or gates == str(recorded).lower(), m.label
        text = (m.root / "MODEL_CARD.md").read_text()
        assert ("not served by default" in text) == (gates == "false"), m.label


def test_the_default_decoder_belongs_to_the_default_fr_bundle_and_records_its_held_out_check(tmp_path: Path) -> None:
    """register-defaults binds the shipped decoder by the FR bundle's digest: if the default FR bundle's
    metadata ever changes, this fails here rather than at a user's registration."""
    from facexplain.artifacts.embedder import save_embedder_bundle

    meta = save_embedder_bundle(tmp_path / "fr", name=DEFAULT_FR_MODEL)
    dec = next(m for m in list_shipped(MODELS) if m.name == "facexplain-dfd-dlib128")
    assert dec.fr_model is not None and dec.fr_model["bundle_sha256"] == bundle_digest(meta)
    held = dec.card["heldout"]["strict"]
    assert held["identities"] >= 20 and held["faces"] >= 400 and len(held["left_out"]) == 5
    bounds = {"psnr": 14.0, "ssim": 0.42, "identity_cosine": 0.93}
    assert held["passed"] == all(held["mean"][k] >= v for k, v in bounds.items())
    assert dec.card["tags"]["heldout_psnr"] == f"{held['mean']['psnr']:.4f}"
