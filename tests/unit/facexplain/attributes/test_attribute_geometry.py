"""Pixel- and landmark-level attribute estimators (issue 6): geometry ratios, colour moments, LBP texture.

Each is checked where the truth is known: geometry against exact similarity invariance of its
formulae and against the whole detect -> align -> landmark pipeline on rescaled and rotated photos;
colour moments against constructed images whose moments are known in closed form; LBP against
patterns whose codes can be worked out by hand.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facexplain.attributes.catalog import AttributeCatalog, FaceBatch, UnknownAttributeError
from facexplain.attributes.colour import (
    COMPONENTS as COLOUR_COMPONENTS,
)
from facexplain.attributes.colour import (
    MIN_PIXELS,
    ColourEstimator,
    colour_moments,
    colour_moments_of_faces,
    region_masks,
)
from facexplain.attributes.crops import scale_points
from facexplain.attributes.geometry import RATIO_NAMES, RATIOS, GeometryEstimator, geometry_ratios
from facexplain.attributes.pose import image_landmarks, mirror_landmarks
from facexplain.attributes.texture import (
    FLAT_CODE,
    NON_UNIFORM_CODE,
    PATCH_NAMES,
    TextureEstimator,
    lbp_codes,
    lbp_grid_histograms,
)

REPO = Path(__file__).resolve().parents[4]
# Transforms of the input photo for the invariance check: (scale, in-plane rotation in degrees).
PHOTO_TRANSFORMS = ((0.6, 0.0), (1.5, 0.0), (1.0, 15.0), (1.0, -15.0))
MAX_REL_CHANGE = 0.02


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chip_faces(sample_faceset: Any, default_pipeline: Any) -> FaceBatch:
    """The sample's 150-px aligned chips in [0, 1] with landmarks found on the chips themselves."""
    chips = sample_faceset.chips.float() / 255.0
    return FaceBatch(chips, image_landmarks(default_pipeline.landmark_net, chips))


@pytest.fixture(scope="module")
def small_faces(chip_faces: FaceBatch) -> FaceBatch:
    """The same faces at the decoder's 64 px (antialiased resize, landmarks mapped to the new pixel grid)."""
    images = F.interpolate(chip_faces.images, size=64, mode="bilinear", antialias=True, align_corners=False)
    return FaceBatch(images.clamp(0, 1), scale_points(chip_faces.landmarks, 150, 64))


# -- geometry ------------------------------------------------------------------------------------------------


def test_at_least_twenty_ratios_finite_and_positive_on_real_faces(chip_faces: FaceBatch) -> None:
    est = GeometryEstimator()
    assert len(est.specs) == len(RATIOS) >= 20
    assert len(set(RATIO_NAMES)) == len(RATIO_NAMES)
    for spec in est.specs:
        assert spec.group == "geometry" and spec.unit == "" and spec.components == (spec.name,)
        assert spec.description
    out = est.estimate(chip_faces, RATIO_NAMES)
    assert list(out) == list(RATIO_NAMES)
    for name, v in out.items():
        assert v.shape == (len(chip_faces), 1) and v.dtype == np.float64
        assert np.isfinite(v).all() and (v > 0).all(), name
    # the ratios differ between people: no constant (e.g. a length divided by itself)
    spread = np.array([np.std(out[n]) / np.mean(out[n]) for n in RATIO_NAMES])
    assert (spread > 0.01).all(), dict(zip(RATIO_NAMES, spread.round(4), strict=True))


def test_ratio_formulae_are_exactly_similarity_and_mirror_invariant(sample_faceset: Any) -> None:
    lm = sample_faceset.landmarks.to(torch.float64)
    base = geometry_ratios(lm)
    rng = np.random.default_rng(0)
    for _ in range(5):
        angle = rng.uniform(-math.pi, math.pi)
        scale = rng.uniform(0.2, 5.0)
        shift = torch.tensor(rng.uniform(-300, 300, size=2))
        cos, sin = math.cos(angle), math.sin(angle)
        rot = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
        moved = geometry_ratios(scale * lm @ rot.T + shift)
        for n in RATIO_NAMES:
            np.testing.assert_allclose(moved[n], base[n], rtol=1e-9, err_msg=n)
    # left and right features are averaged, so a mirrored face (landmarks re-indexed) has the same shape
    mirrored = geometry_ratios(mirror_landmarks(lm, 150))
    for n in RATIO_NAMES:
        np.testing.assert_allclose(mirrored[n], base[n], rtol=1e-9, err_msg=n)


def _transform_photo(image: torch.Tensor, scale: float, angle: float) -> torch.Tensor:
    """(3, H, W) [0, 255] photo -> rescaled by ``scale`` and rotated by ``angle`` degrees about its centre.

    The canvas grows to hold the whole rotated photo (nothing of the face is cut off); the corners it
    gains repeat the border pixels, so no black wedges give the detector or landmark net an edge to see.
    """
    import cv2

    a = image.permute(1, 2, 0).numpy()
    h, w = a.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    c, s = abs(m[0, 0]), abs(m[0, 1])
    out_w, out_h = math.ceil(h * s + w * c), math.ceil(h * c + w * s)
    m[0, 2] += out_w / 2 - w / 2
    m[1, 2] += out_h / 2 - h / 2
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out = cv2.warpAffine(a, m, (out_w, out_h), flags=interp, borderMode=cv2.BORDER_REPLICATE)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).contiguous()


def _pipeline_ratios(pipeline: Any, photos: list[torch.Tensor]) -> np.ndarray:
    """Photos -> (n, R) ratios: detect, landmarks, align, then the landmark net on the chip; NaN rows = no face."""
    results = pipeline.analyze(photos)
    found = [i for i, r in enumerate(results) if r is not None]
    out = np.full((len(photos), len(RATIO_NAMES)), np.nan)
    if found:
        chips = torch.stack([results[i].chip for i in found]) / 255.0
        faces = FaceBatch(chips, image_landmarks(pipeline.landmark_net, chips))
        est = GeometryEstimator().estimate(faces, RATIO_NAMES)
        out[found] = np.concatenate([est[n] for n in RATIO_NAMES], axis=1)
    return out


def test_ratios_from_the_pipeline_are_invariant_to_photo_scale_and_rotation(default_pipeline: Any) -> None:
    """Relative change |r'/r - 1| of each ratio between a photo and its rescaled/rotated copy, both run
    through detect -> align -> landmark net on the 150-px chip.

    Alignment undoes the similarity, so what remains is the landmark net's jitter on resampled pixels
    (largest for the short lengths around the lips, and for the 0.6x photos, whose chips are upsampled).
    Asserted, both < 2 %:
      * per transform: the mean over faces and ratios;
      * per ratio: the median over faces and transforms.
    Measured on data/sample (30 photos then, 36 now; 24 at 0.6x, where the 92 x 112 ORL photos shrink below what the
    detector finds): per-transform means 1.37 / 0.52 / 1.04 / 1.10 % (0.6x, 1.5x, +15, -15 degrees), the
    worst per-ratio medians 1.66 % (philtrum / lip-to-chin) and 1.47 % (upper lip / mouth width).
    """
    from facexplain.data.faces import list_images, load_image

    paths = list_images(REPO / "data" / "sample")
    assert len(paths) >= 20
    photos = [load_image(p) for p in paths]
    base = _pipeline_ratios(default_pipeline, photos)
    assert np.isfinite(base).all()
    rel = []
    for scale, angle in PHOTO_TRANSFORMS:
        moved = _pipeline_ratios(default_pipeline, [_transform_photo(p, scale, angle) for p in photos])
        found = np.isfinite(moved).all(axis=1)
        assert found.sum() >= 20, f"x{scale} {angle:+.0f} deg: faces found in only {found.sum()} photos"
        rel.append(np.abs(moved / base - 1.0))
    changes = np.stack(rel)  # (T, n, R), NaN where a transformed photo had no face
    per_transform = np.nanmean(changes, axis=(1, 2))
    per_ratio = np.nanmedian(changes.transpose(2, 0, 1).reshape(len(RATIO_NAMES), -1), axis=1)
    worst = np.argsort(-per_ratio)[:5]
    labels = [f"x{scale} {angle:+.0f} deg" for scale, angle in PHOTO_TRANSFORMS]
    print(
        "mean relative change per transform:",
        {k: round(float(v), 4) for k, v in zip(labels, per_transform, strict=True)},
    )
    print("worst per-ratio medians:", {RATIO_NAMES[j]: round(float(per_ratio[j]), 4) for j in worst})
    assert (per_transform < MAX_REL_CHANGE).all(), per_transform
    assert (per_ratio < MAX_REL_CHANGE).all(), {RATIO_NAMES[j]: per_ratio[j] for j in worst}


# -- colour --------------------------------------------------------------------------------------------------


def test_colour_moments_in_closed_form() -> None:
    uniform = np.tile([0.2, 0.5, 0.9], (50, 1))
    m = colour_moments(uniform)
    np.testing.assert_allclose(m[:3], [0.2, 0.5, 0.9])
    assert (m[3:] == 0).all()  # std 0 and skewness 0 (one colour has no asymmetry), not NaN
    # a fraction p of value b, the rest a: skewness (1 - 2p) / sqrt(p (1 - p)), whatever a and b (b > a)
    p, k = 0.25, 40
    two = np.full((k, 3), 0.1)
    two[: int(p * k)] = [0.9, 0.6, 0.3]
    m = colour_moments(two)
    mean = (1 - p) * 0.1 + p * np.array([0.9, 0.6, 0.3])
    std = np.sqrt(p * (1 - p)) * (np.array([0.9, 0.6, 0.3]) - 0.1)
    np.testing.assert_allclose(m[:3], mean)
    np.testing.assert_allclose(m[3:6], std)
    np.testing.assert_allclose(m[6:], (1 - 2 * p) / math.sqrt(p * (1 - p)))
    assert np.isnan(colour_moments(uniform[: MIN_PIXELS - 1])).all()
    assert COLOUR_COMPONENTS == ("r_mean", "g_mean", "b_mean", "r_std", "g_std", "b_std", "r_skew", "g_skew", "b_skew")


@pytest.mark.parametrize("size", [150, 64])
def test_region_moments_on_constructed_images(chip_faces: FaceBatch, size: int) -> None:
    lm = scale_points(chip_faces.landmarks[:4], 150, size)
    colour = torch.tensor([0.3, 0.55, 0.8]).view(1, 3, 1, 1)
    images = colour.expand(4, 3, size, size).clone()
    out = colour_moments_of_faces(images, lm)
    for name in ("skin_colour", "hair_colour", "iris_colour"):
        np.testing.assert_allclose(out[name][:, :3], np.tile([0.3, 0.55, 0.8], (4, 1)), atol=1e-6)
        assert (out[name][:, 3:] == 0).all(), name
    # a quarter of each face's skin pixels (raster order) set to a second colour: known mean, std and skew
    skin = region_masks(lm, size)["skin"]
    other = torch.tensor([0.9, 0.15, 0.2])
    for i in range(4):
        ys, xs = torch.nonzero(skin[i], as_tuple=True)
        q = len(ys) // 4
        images[i, :, ys[:q], xs[:q]] = other.view(3, 1)
        p = q / len(ys)
        m = colour_moments_of_faces(images[i : i + 1], lm[i : i + 1], ["skin_colour"])["skin_colour"][0]
        lo, hi = np.array([0.3, 0.55, 0.8]), other.numpy().astype(np.float64)
        np.testing.assert_allclose(m[:3], (1 - p) * lo + p * hi, atol=1e-6)
        np.testing.assert_allclose(m[3:6], math.sqrt(p * (1 - p)) * np.abs(hi - lo), atol=1e-6)
        expected_skew = (1 - 2 * p) / math.sqrt(p * (1 - p)) * np.sign(hi - lo)
        np.testing.assert_allclose(m[6:], expected_skew, atol=1e-4)


def test_regions_scale_with_the_image_and_real_faces_get_values(chip_faces: FaceBatch, small_faces: FaceBatch) -> None:
    big = region_masks(chip_faces.landmarks, 150)
    small = region_masks(small_faces.landmarks, 64)
    for k in ("skin", "hair", "eyes"):
        area_big = big[k].sum((1, 2)).double() / 150**2
        area_small = small[k].sum((1, 2)).double() / 64**2
        assert bool((area_small > 0).all()), k
        # the same fraction of the image at both sizes (pixel quantisation aside: eyes are ~30 px at 64)
        assert float((area_small / area_big - 1).abs().median()) < 0.1, k
    est = ColourEstimator()
    assert [s.name for s in est.specs] == ["skin_colour", "hair_colour", "iris_colour"]
    assert all(s.group == "colour" and s.components == COLOUR_COMPONENTS for s in est.specs)
    out150 = est.estimate(chip_faces, ["skin_colour", "hair_colour", "iris_colour"])
    out64 = est.estimate(small_faces, ["skin_colour", "hair_colour", "iris_colour"])
    for name in out150:
        assert out150[name].shape == (len(chip_faces), 9)
        assert np.isfinite(out150[name]).all() and np.isfinite(out64[name]).all(), name
        # region means agree between the 150-px chip and its 64-px resize (measured: skin and hair within
        # 0.01; an iris is a few pixels at 64 px, where the resize blurs the sclera into it: within 0.06)
        tol = 0.1 if name == "iris_colour" else 0.02
        assert np.abs(out150[name][:, :3] - out64[name][:, :3]).max() < tol, name
    # iris pixels are darker than skin: the darker half of the eye opening is iris and pupil
    luma = np.array([0.299, 0.587, 0.114])
    assert ((out150["iris_colour"][:, :3] @ luma) < (out150["skin_colour"][:, :3] @ luma)).mean() > 0.9


def test_darker_image_has_darker_skin_and_degenerate_regions_give_nan(chip_faces: FaceBatch) -> None:
    est = ColourEstimator()
    base = est.estimate(chip_faces, ["skin_colour"])["skin_colour"]
    dark = est.estimate(FaceBatch(chip_faces.images * 0.7, chip_faces.landmarks), ["skin_colour"])["skin_colour"]
    assert (dark[:, :3] < base[:, :3]).all()
    # moments of a linearly darkened region: mean and std scale, skewness does not change
    np.testing.assert_allclose(dark[:, :6], 0.7 * base[:, :6], rtol=1e-4)
    np.testing.assert_allclose(dark[:, 6:], base[:, 6:], rtol=1e-3, atol=1e-4)
    lm = chip_faces.landmarks[:2].clone()
    lm[0, 36:42] = lm[0, 36:42].mean(0)  # each eye collapsed to a point: no iris pixels
    lm[0, 42:48] = lm[0, 42:48].mean(0)
    lm[1] = float("nan")  # no landmarks at all: nothing is estimable
    out = est.estimate(FaceBatch(chip_faces.images[:2], lm), ["skin_colour", "iris_colour"])
    assert np.isnan(out["iris_colour"][0]).all() and np.isfinite(out["skin_colour"][0]).all()
    assert np.isnan(out["iris_colour"][1]).all() and np.isnan(out["skin_colour"][1]).all()


# -- texture -------------------------------------------------------------------------------------------------


def test_lbp_codes_of_known_patterns() -> None:
    flat = torch.full((1, 6, 6), 7.0)
    assert bool((lbp_codes(flat) == FLAT_CODE).all())
    # a bright spot: code 0 at the spot (every neighbour darker), the flat code everywhere else
    spot = torch.zeros(1, 7, 7)
    spot[0, 3, 3] = 100
    codes = lbp_codes(spot)[0]
    assert int(codes[2, 2]) == 0 and int((codes == FLAT_CODE).sum()) == codes.numel() - 1
    # a dark spot: its 8 neighbours see one darker pixel: 7 ones in a row (uniform, code 7)
    pit = 100 - spot
    codes = lbp_codes(pit)[0]
    assert int(codes[2, 2]) == FLAT_CODE and int((codes == 7).sum()) == 8
    # a vertical step edge, dark left: the first bright column has 3 darker neighbours -> 5 ones
    step = torch.zeros(1, 6, 8)
    step[0, :, 4:] = 50
    codes = lbp_codes(step)[0]
    assert bool((codes[:, 3] == 5).all()) and int((codes == 5).sum()) == codes.shape[0]
    # a checkerboard: bright pixels see 1,0,1,0,... around them (8 transitions) -> non-uniform
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    board = ((yy + xx) % 2).float().unsqueeze(0) * 10
    codes = lbp_codes(board)[0]
    bright = board[0, 1:-1, 1:-1] > 0
    assert bool((codes[bright] == NON_UNIFORM_CODE).all()) and bool((codes[~bright] == FLAT_CODE).all())
    # rotation invariance: a rotated image has the rotated code map
    g = torch.randint(0, 5, (1, 9, 9)).float()
    assert torch.equal(lbp_codes(torch.rot90(g, 1, (1, 2))), torch.rot90(lbp_codes(g), 1, (1, 2)))


def test_lbp_grid_histograms(chip_faces: FaceBatch, small_faces: FaceBatch) -> None:
    const = torch.full((2, 3, 64, 64), 0.4)
    h = lbp_grid_histograms(const)
    assert h.shape == (2, 7, 7, 10)
    assert (h[..., FLAT_CODE] == 1).all()
    for faces in (chip_faces, small_faces):
        h = lbp_grid_histograms(faces.images, batch_size=7)
        assert h.shape == (len(faces), 7, 7, 10)
        np.testing.assert_allclose(h.sum(-1), 1.0, atol=1e-12)
        assert (h >= 0).all()
        # a face has texture: flat patterns are not everything, and uniform codes are most of it
        assert h[..., FLAT_CODE].mean() < 0.5 and h[..., NON_UNIFORM_CODE].mean() < 0.5
    # uint8 [0, 255] and [0, 1] floats of the same pixels give the same histograms
    u8 = (chip_faces.images[:3] * 255).round().to(torch.uint8)
    np.testing.assert_array_equal(lbp_grid_histograms(u8), lbp_grid_histograms(u8.float() / 255))


def test_texture_estimator_has_one_attribute_per_patch(small_faces: FaceBatch) -> None:
    est = TextureEstimator()
    assert len(est.specs) == 49 and [s.name for s in est.specs] == list(PATCH_NAMES)
    assert PATCH_NAMES[0] == "lbp_r0_c0" and PATCH_NAMES[-1] == "lbp_r6_c6"
    assert all(s.group == "texture" and s.unit == "fraction" and s.dim == 10 for s in est.specs)
    out = est.estimate(small_faces, ["lbp_r2_c5", "lbp_r6_c0"])
    full = lbp_grid_histograms(small_faces.images)
    np.testing.assert_array_equal(out["lbp_r2_c5"], full[:, 2, 5])
    np.testing.assert_array_equal(out["lbp_r6_c0"], full[:, 6, 0])


# -- the three together, and bad input -----------------------------------------------------------------------


def test_catalog_runs_the_three_estimators(small_faces: FaceBatch) -> None:
    cat = AttributeCatalog([GeometryEstimator(), ColourEstimator(), TextureEstimator()])
    assert len(cat) == len(RATIOS) + 3 + 49
    out = cat.estimate(small_faces.images[:3], landmarks=small_faces.landmarks[:3])
    assert len(out) == len(cat)
    assert all(v.shape == (3, s.dim) for s, v in zip(cat.specs, out.values(), strict=True))


def test_wrong_shapes_and_names_raise() -> None:
    with pytest.raises(ValueError, match="68, 2"):
        geometry_ratios(torch.zeros(2, 67, 2))
    with pytest.raises(ValueError, match="68, 2"):
        geometry_ratios(np.zeros((68, 2)))
    with pytest.raises(UnknownAttributeError, match="nose_width_to_mouth_width"):
        geometry_ratios(torch.zeros(1, 68, 2), ["nose_size"])
    with pytest.raises(ValueError, match="S, S"):
        colour_moments_of_faces(torch.zeros(1, 3, 64, 60), torch.zeros(1, 68, 2))
    with pytest.raises(ValueError, match="68, 2"):
        colour_moments_of_faces(torch.zeros(2, 3, 64, 64), torch.zeros(1, 68, 2))
    with pytest.raises(ValueError, match="K, 3"):
        colour_moments(np.zeros((10, 4)))
    with pytest.raises(ValueError, match="68, 2"):
        region_masks(torch.zeros(68, 2), 64)
    with pytest.raises(UnknownAttributeError, match="skin_colour"):
        colour_moments_of_faces(torch.zeros(1, 3, 64, 64), torch.zeros(1, 68, 2), ["eye_colour"])
    with pytest.raises(ValueError, match="S, S"):
        lbp_grid_histograms(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="at least"):
        lbp_grid_histograms(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="H, W"):
        lbp_codes(torch.zeros(8, 8))
    with pytest.raises(UnknownAttributeError, match="lbp_r0_c0"):
        TextureEstimator().estimate(FaceBatch(torch.zeros(1, 3, 64, 64), torch.zeros(1, 68, 2)), ["lbp_r7_c0"])
    with pytest.raises(ValueError, match="68, 2"):
        FaceBatch(torch.zeros(1, 3, 64, 64), torch.zeros(1, 5, 2))
