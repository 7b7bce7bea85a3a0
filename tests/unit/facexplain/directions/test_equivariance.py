"""Geometric transforms of chips, least-squares equivariance maps, and verification with/without them."""

from __future__ import annotations

import pytest
import torch

from facexplain.data.faceset import FaceSet
from facexplain.directions.equivariance import (
    GeometricTransform,
    apply_map,
    embed_transformed,
    evaluate_map,
    fit_linear_map,
    geometric_transform,
)
from facexplain.metrics.verification import DLIB_L2_RULE, VerificationRule


def _image(seed: int, h: int = 9, w: int = 9) -> torch.Tensor:
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def test_identity_rotation_and_translation_are_exact_on_the_pixel_grid() -> None:
    x = _image(0)
    assert torch.allclose(geometric_transform(x, GeometricTransform()), x, atol=1e-3)
    # positive angles turn the content counter-clockwise as displayed, like rot90
    assert torch.allclose(GeometricTransform(angle=90).apply(x), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-3)
    assert torch.allclose(GeometricTransform(angle=-90).apply(x), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-3)
    rect = _image(1, 6, 10)  # non-square: 180 degrees is still a rigid flip of both axes
    assert torch.allclose(GeometricTransform(angle=180).apply(rect), rect.flip(-1).flip(-2), atol=1e-3)
    shifted = GeometricTransform(tx=2, ty=-1).apply(x)
    assert torch.allclose(shifted[..., :-1, 2:], x[..., 1:, :-2], atol=1e-3)  # content moved right 2, up 1
    assert float(shifted[..., :, :2].abs().max()) == 0.0 and float(shifted[..., -1, :].abs().max()) == 0.0
    single = GeometricTransform(angle=90).apply(x[0].to(torch.uint8))
    assert single.shape == (3, 9, 9) and single.dtype == torch.float32


def test_scaling_keeps_the_centre_and_enlarges() -> None:
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 8:13, 8:13] = 1.0  # a 5x5 square at the centre
    big = GeometricTransform(scale=2.0).apply(x)
    assert float(big[0, 0, 10, 10]) == 1.0
    assert 80 < float(big.sum()) < 120  # area x4
    small = GeometricTransform(scale=0.5).apply(x, padding_mode="border")
    assert float(small.sum()) < float(x.sum())
    with pytest.raises(ValueError):
        GeometricTransform(scale=0.0)


def test_fit_recovers_a_planted_linear_map() -> None:
    g = torch.Generator().manual_seed(2)
    n, d = 300, 12
    m = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)
    transformed = torch.randn(n, d, generator=g, dtype=torch.float64)
    originals = transformed @ m.T
    emap = fit_linear_map(originals, transformed, transform=GeometricTransform(angle=10))
    assert torch.allclose(emap.matrix, m, atol=1e-9) and emap.bias is None and abs(emap.r2 - 1) < 1e-12
    assert emap.transform is not None and emap.transform.as_dict()["angle"] == 10
    assert torch.allclose(apply_map(transformed.float(), emap), originals.float(), atol=1e-4)
    # with an intercept
    b = torch.randn(d, generator=g, dtype=torch.float64)
    affine = fit_linear_map(originals + b, transformed, bias=True)
    assert affine.bias is not None and torch.allclose(affine.bias, b, atol=1e-9)
    assert torch.allclose(affine.matrix, m, atol=1e-9)
    # a ridge shrinks the map
    ridged = fit_linear_map(originals, transformed, ridge=100.0)
    assert float(ridged.matrix.norm()) < float(m.norm()) and ridged.r2 < 1.0
    with pytest.raises(ValueError, match="paired"):
        fit_linear_map(originals, transformed[:5])


def test_map_restores_verification_of_distorted_probes() -> None:
    g = torch.Generator().manual_seed(3)
    ids, per, d = 12, 4, 16
    centres = torch.randn(ids, d, generator=g, dtype=torch.float64)
    originals = centres.repeat_interleave(per, 0) + 0.05 * torch.randn(ids * per, d, generator=g, dtype=torch.float64)
    identities = [f"id{k}" for k in range(ids) for _ in range(per)]
    distortion = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]  # a rotation in D
    transformed = originals @ distortion.T
    emap = fit_linear_map(originals, transformed)
    rule = VerificationRule("l2", 0.5, True, "test rule")
    ev = evaluate_map(originals, transformed, emap, rule, identities)
    assert ev.n_probes == ids * per and ev.rule_source == "test rule"
    assert ev.same_image_accept_with == 1.0 and ev.same_image_accept_without < 0.2
    assert ev.mean_score_with < 1e-6 < ev.mean_score_without
    assert ev.tar_with is not None and ev.tar_without is not None and ev.tar_with > ev.tar_without
    assert ev.far_with == 0.0 and ev.auc_with is not None and ev.auc_with > 0.99
    plain = evaluate_map(originals, transformed, emap, DLIB_L2_RULE)
    assert plain.tar_with is None and plain.auc_without is None


def test_embed_transformed_on_real_chips(sample_faceset: FaceSet, default_pipeline) -> None:  # type: ignore[no-untyped-def]
    """A real FR template moves when the chip is rotated, and an identity transform leaves it alone."""
    fs = sample_faceset.subset(range(4))
    same = embed_transformed(fs.chips, default_pipeline.embed_chips, GeometricTransform(), batch_size=2)
    # stored chips are rounded to uint8, the stored templates were taken before: equal up to that rounding
    assert float(DLIB_L2_RULE.score(same, fs.templates).max()) < 0.02
    turned = embed_transformed(fs.chips, default_pipeline.embed_chips, GeometricTransform(angle=30), batch_size=4)
    assert turned.shape == (4, 128)
    moved = DLIB_L2_RULE.score(turned, fs.templates)
    assert bool((moved > 0.05).all())  # well above the rounding difference above
