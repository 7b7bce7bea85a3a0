"""The Deep Face Decoder: shapes, range, gradients, config round trip and determinism."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from facexplain.models.decoder import DecoderConfig, DeepFaceDecoder

SMALL: dict[str, Any] = {"base_channels": 8, "max_channels": 32}


def _templates(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 128, generator=g) * 0.13  # raw templates have norm ~1.49


@pytest.mark.parametrize("size", [64, 112])
def test_output_shape_and_range(size: int) -> None:
    decoder = DeepFaceDecoder(DecoderConfig(out_size=size, **SMALL))
    out = decoder(_templates())
    assert out.shape == (4, 3, size, size)
    assert out.min() >= 0.0 and out.max() <= 1.0
    decoder.eval()
    assert decoder(_templates()).shape == (4, 3, size, size)


@pytest.mark.parametrize(("size", "render"), [(64, 64), (112, 112), (128, 128), (150, 160), (224, 224)])
def test_geometry_picks_exact_or_smallest_render(size: int, render: int) -> None:
    _, _, rendered = DecoderConfig(out_size=size).geometry()
    assert rendered == render


def test_non_power_size_is_resized_and_stays_in_range() -> None:
    decoder = DeepFaceDecoder(DecoderConfig(out_size=150, **SMALL)).eval()
    out = decoder(_templates(2))
    assert out.shape == (2, 3, 150, 150)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_gradient_reaches_every_parameter() -> None:
    decoder = DeepFaceDecoder(DecoderConfig(**SMALL))
    decoder(_templates()).mean().backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_input_is_normalised() -> None:
    """Only the template's direction matters: scaling it changes nothing."""
    decoder = DeepFaceDecoder(DecoderConfig(**SMALL)).eval()
    t = _templates()
    torch.testing.assert_close(decoder(t), decoder(t * 3.7))


def test_config_round_trip_rebuilds_identical_model() -> None:
    config = DecoderConfig(out_size=112, dropout=0.3, block_dropout=0.1, upsample="bilinear", **SMALL)
    data = json.loads(json.dumps(config.to_dict()))
    assert DecoderConfig.from_dict(data) == config
    original = DeepFaceDecoder(config).eval()
    rebuilt = DeepFaceDecoder.from_config(data).eval()
    rebuilt.load_state_dict(original.state_dict())
    t = _templates()
    torch.testing.assert_close(rebuilt(t), original(t), rtol=0, atol=0)


def test_config_rejects_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown"):
        DecoderConfig.from_dict({"template_dim": 128, "bogus": 1})
    with pytest.raises(ValueError):
        DecoderConfig(upsample="transposed")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DecoderConfig(dropout=1.0)


def test_wrong_template_dimension_is_rejected() -> None:
    decoder = DeepFaceDecoder(DecoderConfig(**SMALL)).eval()
    with pytest.raises(ValueError, match="templates"):
        decoder(torch.zeros(2, 64))


def test_seeded_construction_and_eval_are_deterministic() -> None:
    def build() -> DeepFaceDecoder:
        torch.manual_seed(1234)
        return DeepFaceDecoder(DecoderConfig(**SMALL)).eval()

    a, b = build(), build()
    t = _templates()
    torch.testing.assert_close(a(t), b(t), rtol=0, atol=0)
    torch.testing.assert_close(a(t), a(t), rtol=0, atol=0)


def test_dropout_is_active_in_train_mode_only() -> None:
    decoder = DeepFaceDecoder(DecoderConfig(dropout=0.5, **SMALL))
    t = _templates(8)
    decoder.train()
    torch.manual_seed(0)
    first = decoder(t)
    torch.manual_seed(1)
    assert not torch.equal(first, decoder(t))
    decoder.eval()
    torch.testing.assert_close(decoder(t), decoder(t), rtol=0, atol=0)
