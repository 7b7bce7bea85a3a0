"""Occlusion analysis measures (DFD §4.3.2) on constructed images whose answers are known."""

from __future__ import annotations

import pytest
import torch

from facexplain.faces.occlusion import OCCLUSION_REGIONS, chip_mesh, dlib_frontal_template, occlusion_masks, region_rect
from facexplain.metrics.occlusion import mask_at, occlusion_effects
from facexplain.metrics.verification import DLIB_L2_RULE

S = 16


def _scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A face (0.6 grey), the same with a black square hidden (rows/cols 4..7), and that mask."""
    original = torch.full((3, S, S), 0.6)
    mask = torch.zeros(1, 1, S, S, dtype=torch.bool)
    mask[..., 4:8, 4:8] = True
    occluded = torch.where(mask[0], torch.tensor(0.0), original)[None]
    return original, occluded, mask


def test_a_decoder_that_paints_the_occluder_does_not_fill_in() -> None:
    original, occluded, mask = _scene()
    t = torch.ones(8)
    [e] = occlusion_effects(t, t[None], t[None], original, occluded, original, occluded.clone(), mask, DLIB_L2_RULE)
    assert e.inside_to_occluder == pytest.approx(0.0)
    assert e.inside_to_original == pytest.approx(0.6)
    assert e.outside_to_original == pytest.approx(0.0)
    assert not e.fills_in
    assert e.occluded_fraction == pytest.approx(16 / 256)


def test_a_decoder_that_draws_the_face_fills_in() -> None:
    original, occluded, mask = _scene()
    clean = torch.randn(8)
    moved = clean + 0.5 * torch.randn(8)
    [e] = occlusion_effects(
        clean, moved[None], clean[None], original, occluded, original, original[None].clone(), mask, DLIB_L2_RULE
    )
    assert e.fills_in and e.inside_to_original == pytest.approx(0.0) and e.inside_to_occluder == pytest.approx(0.6)
    assert e.inside_to_clean_decoding == pytest.approx(0.0)
    assert e.decoded_identity_cosine == pytest.approx(1.0) and e.decoded_same_person
    assert e.template_cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(clean, moved, dim=0)))
    assert e.as_dict()["fills_in"] is True


def test_mismatched_inputs_are_refused() -> None:
    original, occluded, mask = _scene()
    t = torch.ones(8)
    with pytest.raises(ValueError):
        occlusion_effects(t, t[None].repeat(2, 1), t[None], original, occluded, original, occluded, mask, DLIB_L2_RULE)


def test_mask_at_averages_coverage_when_shrinking() -> None:
    m = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    m[..., :2, :2] = True
    assert mask_at(m, 2)[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert mask_at(m, 4).dtype == torch.float32


def test_region_rectangles_cover_their_landmarks_in_face_order() -> None:
    pts, index = dlib_frontal_template(150)
    rects = {r: region_rect(r, 150) for r in OCCLUSION_REGIONS}
    for r, lms in OCCLUSION_REGIONS.items():
        p = pts[[index.index(i) for i in lms]]
        assert bool(rects[r].contains(p).all()), r
    assert rects["eyes"].y1 < rects["mouth"].y0  # eyes above the mouth in the chip
    assert rects["nose"].y0 < rects["mouth"].y0
    with pytest.raises(KeyError):
        region_rect("ears")


def test_on_the_mean_face_the_warped_mask_is_the_rectangle() -> None:
    """A face at the mean landmark positions is the template itself: the mask is the plain rectangle."""
    mesh = chip_mesh(150)
    pts, index = dlib_frontal_template(150)
    lm = torch.zeros(1, 68, 2)
    lm[0, list(index)] = pts
    lm[0, :17] = pts[0]  # jaw points are not in the mesh
    rect = region_rect("nose", 150)
    mask = occlusion_masks(mesh, lm, rect, 150)[0, 0]
    ys, xs = mask.nonzero(as_tuple=True)
    assert int(xs.min()) >= int(rect.x0) and int(xs.max()) <= int(rect.x1) + 1
    assert int(ys.min()) >= int(rect.y0) and int(ys.max()) <= int(rect.y1) + 1
    area = (rect.x1 - rect.x0) * (rect.y1 - rect.y0)
    assert abs(int(mask.sum()) - area) / area < 0.1
