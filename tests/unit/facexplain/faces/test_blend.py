"""Region masks, blending and the ordered-pair stream behind SSI discovery."""

from __future__ import annotations

import math

import pytest
import torch

from facexplain.data.faceset import FaceSet
from facexplain.faces.blend import (
    REGIONS,
    blend,
    gaussian_feather,
    iter_blend_batches,
    iter_blends,
    n_ordered_pairs,
    pair_at,
    pair_masks,
    region_mask,
    region_points,
)


def _landmarks_with(points: dict[int, tuple[float, float]]) -> torch.Tensor:
    """68 landmarks all at (0, 0) except the given ones."""
    lm = torch.zeros(68, 2)
    for i, xy in points.items():
        lm[i] = torch.tensor(xy)
    return lm


def test_region_points_forms_and_errors() -> None:
    assert region_points("nose") == (tuple(range(27, 36)),)
    assert len(region_points("eyes")) == 2  # one hull per eye + brow
    assert set(region_points("lower_face")[0]) == set(range(48, 68)) | set(range(5, 12))
    assert region_points([1, 2, 3]) == ((1, 2, 3),)
    assert region_points([[1, 2], [3]]) == ((1, 2), (3,))
    assert region_points(torch.tensor([4, 5])) == ((4, 5),)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown region"):
        region_points("ears")
    with pytest.raises(ValueError, match=r"0\.\.67"):
        region_points([3, 68])
    with pytest.raises(ValueError, match="at least one"):
        region_points([])


def test_hull_mask_is_the_polygon_when_not_dilated_or_feathered() -> None:
    lm = _landmarks_with({27: (10.0, 10.0), 28: (29.0, 10.0), 29: (29.0, 29.0), 30: (10.0, 29.0), 31: (20.0, 20.0)})
    m = region_mask(lm, [27, 28, 29, 30, 31], size=40, dilate=0.0, feather=0.0)
    assert m.shape == (1, 1, 40, 40) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert int(m.sum()) == 20 * 20  # pixels 10..29 inclusive on both axes
    assert m[0, 0, 10:30, 10:30].min() == 1.0
    # dilation grows it by whole pixels on each side (square corners, as the distance is per edge)
    assert int(region_mask(lm, [27, 28, 29, 30], 40, dilate=2.0, feather=0.0).sum()) == 24 * 24


def test_degenerate_groups_are_disks_and_capsules() -> None:
    lm = _landmarks_with({40: (20.0, 20.0)})
    disk = region_mask(lm, [40], size=41, dilate=3.0, feather=0.0)[0, 0]
    expected = sum(1 for dx in range(-3, 4) for dy in range(-3, 4) if dx * dx + dy * dy <= 9)
    assert int(disk.sum()) == expected
    lm2 = _landmarks_with({40: (10.0, 20.0), 41: (30.0, 20.0)})
    capsule = region_mask(lm2, [40, 41], size=41, dilate=0.5, feather=0.0)[0, 0]
    assert int(capsule.sum()) == 21 and int(capsule[20].sum()) == 21  # the segment's pixels


def test_gaussian_feather_is_smooth_and_preserves_mass() -> None:
    m = torch.zeros(1, 1, 50, 50)
    m[0, 0, 20:30, 20:30] = 1.0
    f = gaussian_feather(m, 2.0)
    assert math.isclose(float(f.sum()), 100.0, rel_tol=1e-4)  # far from the border nothing is lost
    assert float(f.min()) >= 0.0 and float(f.max()) <= 1.0
    assert 0.0 < float(f[0, 0, 25, 19]) < 1.0  # soft edge
    assert float(f[0, 0, 25, 25]) > 0.95 and float(f[0, 0, 25, 5]) < 1e-6
    assert torch.equal(gaussian_feather(m, 0.0), m)
    with pytest.raises(ValueError):
        gaussian_feather(m, -1.0)


def test_blend_ends_are_exact() -> None:
    g = torch.Generator().manual_seed(0)
    face = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    region = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    ones, zeros = torch.ones(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    assert torch.equal(blend(face, region, ones), region.float())
    assert torch.equal(blend(face, region, zeros), face.float())
    half = blend(face, region, torch.full((2, 1, 16, 16), 0.5))
    assert torch.allclose(half, (face.float() + region.float()) / 2)


def test_pair_stream_covers_every_ordered_pair_once() -> None:
    n = 7
    pairs = [(int(i), int(j)) for fi, ri in iter_blend_batches(n, 5) for i, j in zip(fi, ri, strict=True)]
    assert len(pairs) == n_ordered_pairs(n) == 42
    assert len(set(pairs)) == 42 and all(i != j for i, j in pairs)
    assert set(pairs) == {(i, j) for i in range(n) for j in range(n) if i != j}
    assert [p[0] for p in pairs] == sorted(p[0] for p in pairs)  # grouped by face donor
    sizes = [len(fi) for fi, _ in iter_blend_batches(n, 5)]
    assert sizes == [5] * 8 + [2]
    resumed = [(int(i), int(j)) for fi, ri in iter_blend_batches(n, 4, start=10) for i, j in zip(fi, ri, strict=True)]
    assert resumed == pairs[10:]
    i, j = pair_at(torch.tensor([0, 41]), n)
    assert (i.tolist(), j.tolist()) == ([0, 6], [1, 5])
    assert next(iter_blend_batches(2, 10))[0].tolist() == [0, 1]
    with pytest.raises(ValueError):
        next(iter_blend_batches(1, 4))
    with pytest.raises(ValueError):
        next(iter_blend_batches(3, 0))


def test_pair_masks_modes() -> None:
    m = torch.zeros(3, 1, 4, 4)
    m[0, 0, 0, 0] = 1.0
    m[1, 0, 3, 3] = 1.0
    fi, ri = torch.tensor([0]), torch.tensor([1])
    assert float(pair_masks(m, fi, ri, "union").sum()) == 2.0
    assert float(pair_masks(m, fi, ri, "region_donor")[0, 0, 3, 3]) == 1.0
    assert float(pair_masks(m, fi, ri, "face_donor")[0, 0, 0, 0]) == 1.0


def test_real_region_masks_and_blends(sample_faceset: FaceSet) -> None:
    fs = sample_faceset.subset(range(4))
    lm = fs.landmarks
    for name in REGIONS:
        m = region_mask(lm, name, 150)
        assert m.shape == (4, 1, 150, 150)
        frac = float(m.mean())
        assert 0.01 < frac < 0.25, (name, frac)  # a part of the face, not the chip
    nose = region_mask(lm, "nose", 150)
    eyes = region_mask(lm, "eyes", 150)
    lower = region_mask(lm, "lower_face", 150)
    idx = torch.arange(4)

    def at(mask: torch.Tensor, points: range | list[int]) -> torch.Tensor:
        xy = lm[:, list(points)].mean(dim=1).round().long()
        return mask[idx, 0, xy[:, 1], xy[:, 0]]

    assert bool((at(nose, [30]) > 0.99).all())  # nose tip
    assert bool((at(eyes, range(36, 42)) > 0.97).all()) and bool((at(eyes, range(42, 48)) > 0.97).all())
    assert bool((at(lower, [62]) > 0.99).all())  # inner upper lip
    assert bool((at(eyes, [62]) < 1e-3).all()) and bool((at(lower, range(36, 42)) < 1e-3).all())
    assert bool((at(eyes, [28]) < 0.5).all())  # the nose bridge between the eyes is not "eyes"
    # the chip corners stay untouched by every region
    assert float(torch.stack([nose, eyes, lower])[..., :10, :10].max()) == 0.0

    seen = 0
    for fi, ri, batch in iter_blends(fs.chips, lm, "nose", batch_size=5):
        assert batch.shape == (len(fi), 3, 150, 150) and batch.dtype == torch.float32
        mask = pair_masks(nose, fi, ri)
        outside = (mask == 0).expand_as(batch)
        inside = (mask == 1).expand_as(batch)
        assert torch.equal(batch[outside], fs.chips[fi].float()[outside])
        assert torch.equal(batch[inside], fs.chips[ri].float()[inside])
        seen += len(fi)
    assert seen == 12
