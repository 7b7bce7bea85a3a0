"""Decoder bundles: round trip, the FR model they name, and validation that catches damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from facexplain.artifacts.bundle import BUNDLE_JSON, BundleError, read_metadata, write_metadata
from facexplain.artifacts.decoder import load_decoder_bundle, save_decoder_bundle, validate_decoder
from facexplain.models.decoder import DecoderConfig, DeepFaceDecoder

FR = {"name": "facexplain-fr-dlib128", "version": "3", "bundle_sha256": "ab" * 32}


def _decoder() -> DeepFaceDecoder:
    torch.manual_seed(0)
    return DeepFaceDecoder(DecoderConfig(out_size=32, base_channels=8, max_channels=32))


def _golden() -> torch.Tensor:
    return torch.randn(128, generator=torch.Generator().manual_seed(1)) * 0.13


def test_round_trip_and_validation(tmp_path: Path) -> None:
    dec = _decoder()
    meta = save_decoder_bundle(
        tmp_path / "b", dec, name="facexplain-dfd-test", fr_model=FR, golden_template=_golden(), chip_padding=0.25
    )
    assert meta["kind"] == "decoder" and meta["fr_model"]["version"] == "3"
    loaded = load_decoder_bundle(tmp_path / "b")
    assert (loaded.fr_name, loaded.fr_version, loaded.out_size) == (FR["name"], "3", 32)
    t = torch.randn(5, 128)
    dec.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.decode(t), dec(t), atol=1e-6)
    rep = validate_decoder(loaded, tmp_path / "b")
    assert rep.max_abs_diff <= 1 / 255 and rep.batch_max_abs_diff == 0.0


def test_refuses_missing_fr_model(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="fr_model"):
        save_decoder_bundle(
            tmp_path / "b",
            _decoder(),
            name="facexplain-dfd-test",
            fr_model={"name": "x", "version": ""},
            golden_template=_golden(),
            chip_padding=0.25,
        )


def test_validation_catches_changed_weights(tmp_path: Path) -> None:
    root = tmp_path / "b"
    save_decoder_bundle(
        root, _decoder(), name="facexplain-dfd-test", fr_model=FR, golden_template=_golden(), chip_padding=0.25
    )
    state = torch.load(root / "weights" / "decoder.pt", weights_only=True)
    state["to_rgb.bias"] += 0.5
    torch.save(state, root / "weights" / "decoder.pt")
    with pytest.raises(BundleError, match=r"corrupt artifact: sha256 of weights/decoder\.pt"):
        load_decoder_bundle(root)
    meta = read_metadata(root)
    write_metadata(root, meta)  # re-sign the files: only the golden decode can notice now
    loaded = load_decoder_bundle(root)
    with pytest.raises(BundleError, match="golden decode differs"):
        validate_decoder(loaded, root)


def test_rejects_inconsistent_architecture(tmp_path: Path) -> None:
    root = tmp_path / "b"
    save_decoder_bundle(
        root, _decoder(), name="facexplain-dfd-test", fr_model=FR, golden_template=_golden(), chip_padding=0.25
    )
    meta = json.loads((root / BUNDLE_JSON).read_text())
    meta["decoder"]["base_channels"] = 16
    (root / BUNDLE_JSON).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"cannot load decoder\.pt"):
        load_decoder_bundle(root, verify=False)
    meta["decoder"]["bogus"] = 1
    (root / BUNDLE_JSON).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="unknown DecoderConfig fields"):
        load_decoder_bundle(root, verify=False)
