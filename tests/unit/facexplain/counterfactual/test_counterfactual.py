"""Counterfactual explanation (s_a, ranking, LBP map, top-k overlap) and the decoder-as-defence summary.

Everything on constructed values with known answers; one cheap real run (PGD on two sample faces with
the default FR net, a stub decoder and a texture-only catalogue) checks determinism under a seed.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facexplain.counterfactual import (
    Significance,
    attribute_significance,
    decode_and_reembed,
    defence_summary,
    explain_counterfactual,
    heatmap_png,
    heatmap_rgb,
    lbp_significance_map,
    rank_significance,
    roc_curve,
    significance_ratio,
    topk_overlap,
)
from facexplain.counterfactual.explain import lbp_map_from_rows
from facexplain.metrics.verification import DLIB_L2_RULE, VerificationRule, roc_auc

COSINE = VerificationRule(metric="cosine", threshold=0.9, accept_below=False, source="test")


# -- s_a --------------------------------------------------------------------------------------------------


def test_significance_ratio_and_zero_denominators() -> None:
    assert significance_ratio(3.0, 2.0) == 1.5
    assert significance_ratio(1.0, 0.0) == math.inf  # the attack moved what the pair shares
    assert math.isnan(significance_ratio(0.0, 0.0))  # nothing moved, nothing differs
    assert math.isnan(significance_ratio(math.nan, 1.0))
    assert math.isnan(significance_ratio(1.0, math.nan))


def test_attribute_significance_known_values() -> None:
    probe = {"yaw": [10.0], "colour": [0.0, 0.0, 0.0], "gender": [1.0], "age": [30.0], "pose": [math.nan]}
    ref = {"yaw": [12.0], "colour": [3.0, 4.0, 0.0], "gender": [1.0], "age": [30.0], "pose": [1.0]}
    adv = {"yaw": [16.0], "colour": [0.6, 0.8, 0.0], "gender": [0.0], "age": [30.0], "pose": [2.0]}
    rows = attribute_significance(probe, ref, adv, groups={"yaw": "pose", "colour": "colour"})
    by = {r.attribute: r for r in rows}
    assert by["yaw"].s_a == pytest.approx(3.0) and by["yaw"].significant  # |10-16| / |10-12|
    assert by["yaw"].delta == pytest.approx(6.0) and by["yaw"].delta_reference == pytest.approx(2.0)
    assert by["colour"].s_a == pytest.approx(0.2) and not by["colour"].significant  # 1 / 5, Euclidean
    assert by["gender"].s_a == math.inf and by["gender"].significant
    assert math.isnan(by["age"].s_a) and not by["age"].significant
    assert math.isnan(by["pose"].s_a)  # not estimable on the probe
    assert by["yaw"].group == "pose" and by["gender"].group == ""
    assert math.isnan(by["yaw"].delta_control)
    # ranking: inf, then finite descending, NaN last (in input order)
    assert [r.attribute for r in rows] == ["gender", "yaw", "colour", "age", "pose"]


def test_ranking_ties_and_control() -> None:
    probe = {"a": [0.0], "b": [0.0], "c": [0.0]}
    ref = {"a": [1.0], "b": [2.0], "c": [1.0]}
    adv = {"a": [2.0], "b": [4.0], "c": [2.0]}  # all s_a = 2; b has the larger numerator
    control = {"a": np.array([[0.5], [-1.5], [np.nan]]), "b": np.zeros((2, 1))}
    rows = attribute_significance(probe, ref, adv, control=control)
    assert [r.attribute for r in rows] == ["b", "a", "c"]
    by = {r.attribute: r for r in rows}
    assert by["a"].delta_control == pytest.approx(1.0)  # mean(|0.5|, |-1.5|), NaN row ignored
    assert by["b"].delta_control == 0.0 and math.isnan(by["c"].delta_control)
    # rank_significance is stable and idempotent
    assert rank_significance(rows) == rows
    shuffled = [rows[2], rows[0], rows[1]]
    assert [r.attribute for r in rank_significance(shuffled)] == ["b", "c", "a"]  # ties keep input order


def test_attribute_significance_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="missing"):
        attribute_significance({"a": [1.0]}, {}, {"a": [1.0]})
    with pytest.raises(ValueError, match="dimensions"):
        attribute_significance({"a": [1.0]}, {"a": [1.0, 2.0]}, {"a": [1.0]})
    with pytest.raises(ValueError, match="one face"):
        attribute_significance({"a": np.zeros((2, 1))}, {"a": [1.0]}, {"a": [1.0]})


# -- LBP map ----------------------------------------------------------------------------------------------


def _checker(size: int, period: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((x // period + y // period) % 2).float() * 0.8 + 0.1).expand(3, size, size).clone()


def test_lbp_significance_map_known_patches() -> None:
    size = 70  # 10 px per patch on the 7 x 7 grid
    probe = _checker(size, 2)
    ref = probe.clone()
    ref[:, 30:40, 30:40] = 0.5  # the reference differs only in the centre patch
    adv = probe.clone()
    adv[:, 0:10, 0:10] = 0.5  # the attack changes only the top-left patch ...
    adv[:, 30:40, 30:40] = 0.5  # ... and the centre, exactly as much as the pair differs there
    m = lbp_significance_map(probe, ref, adv)
    assert m.shape == (7, 7)
    assert m[0, 0] == math.inf  # changed by the attack, identical in the pair
    assert m[3, 3] == pytest.approx(1.0)
    # neighbours of a changed patch share a few border codes with it: inf next to the attack-only patch,
    # 1 next to the centre (changed alike in pair and attack); patches far from both are 0/0 = NaN
    assert all(math.isnan(v) or math.isinf(v) or v == pytest.approx(1.0) for v in m.ravel())
    assert np.isnan(m[6, 6]) and np.isnan(m[0, 6])


def test_lbp_map_from_rows_and_heatmap() -> None:
    rows = [Significance("lbp_r0_c0", "texture", 1.0, 1.0, 1.0), Significance("lbp_r6_c6", "texture", math.inf, 1, 0)]
    m = lbp_map_from_rows(rows)
    assert m[0, 0] == 1.0 and m[6, 6] == math.inf and np.isnan(m[3, 3])
    rgb = heatmap_rgb(m, size=70)
    assert rgb.shape == (70, 70, 3) and rgb.dtype == np.uint8
    assert (rgb[35, 35] == 128).all()  # NaN: mid-grey
    assert rgb[65, 65].sum() > rgb[5, 5].sum()  # inf takes the top (brightest) colour
    png = heatmap_png(m, size=64, background=torch.rand(3, 64, 64))
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == (64, 64)
    with pytest.raises(ValueError):
        heatmap_rgb(np.zeros(5))


# -- agreement of two attack families --------------------------------------------------------------------


def test_topk_overlap() -> None:
    a = [f"x{i}" for i in range(12)]
    b = ["x0", "x2", "x1", "y0", "x4", "x3", "y1", "x6", "x5", "y2", "x7"]
    ov = topk_overlap(a, b, k=10)
    assert ov.count == 7 and ov.jaccard == pytest.approx(7 / 13) and ov.fraction == pytest.approx(0.7)
    assert ov.common == ("x0", "x1", "x2", "x3", "x4", "x5", "x6")
    assert ov.only_a == ("x7", "x8", "x9") and ov.only_b == ("y0", "y1", "y2")
    same = topk_overlap(a, a, k=10)
    assert same.count == 10 and same.jaccard == 1.0
    # rows: NaN s_a is not ranked
    rows_a = [Significance("p", "", 3.0, 3, 1), Significance("q", "", math.nan, 0, 0), Significance("r", "", 1, 1, 1)]
    rows_b = [Significance("r", "", 5.0, 5, 1), Significance("s", "", 2.0, 2, 1)]
    ov2 = topk_overlap(rows_a, rows_b, k=2)
    assert ov2.common == ("r",) and ov2.only_a == ("p",) and ov2.only_b == ("s",)
    assert math.isnan(topk_overlap([], [], k=3).jaccard)
    with pytest.raises(ValueError):
        topk_overlap(a, b, k=0)


# -- decoder as defence ---------------------------------------------------------------------------------------


def test_roc_curve_known_points_and_auc() -> None:
    # L2 distances: smaller = more alike; genuine pairs at 0.1, 0.3, 0.5; impostors at 0.4, 0.8
    d = np.array([0.1, 0.3, 0.5, 0.4, 0.8])
    g = np.array([1, 1, 1, 0, 0], dtype=bool)
    roc = roc_curve(d, g, DLIB_L2_RULE)
    np.testing.assert_allclose(roc.fpr, [0, 0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(roc.tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert roc.thresholds[0] == -math.inf and roc.thresholds[1:].tolist() == [0.1, 0.3, 0.4, 0.5, 0.8]
    assert roc.auc == pytest.approx(5 / 6)  # 5 of 6 (genuine, impostor) pairs ordered right
    assert roc.auc == pytest.approx(np.trapezoid(roc.tpr, roc.fpr))
    # similarity metric, with ties counted half
    s = np.array([0.9, 0.5, 0.5, 0.1])
    g2 = np.array([1, 1, 0, 0], dtype=bool)
    roc2 = roc_curve(s, g2, COSINE)
    assert roc2.auc == pytest.approx(roc_auc(s, g2)) == pytest.approx(0.875)
    assert roc2.auc == pytest.approx(np.trapezoid(roc2.tpr, roc2.fpr))
    assert roc2.thresholds[0] == math.inf and len(roc2.points()) == 4
    with pytest.raises(ValueError, match="both"):
        roc_curve([0.1, 0.2], [True, True], DLIB_L2_RULE)


def test_defence_summary_on_constructed_scores() -> None:
    rule = DLIB_L2_RULE  # accept when distance < 0.6
    genuine = [True, True, True, False, False, False]
    clean = [0.3, 0.4, 0.7, 0.9, 0.8, 0.5]  # pair 2 already rejected (not eligible), pair 5 already accepted
    attacked = [0.7, 0.5, 0.9, 0.5, 0.9, 0.5]  # dodge works on pair 0 only; impersonation on pair 3 only
    defended = [0.5, 0.5, 0.8, 0.7, 0.9, 0.6]  # the defence undoes pair 0's and pair 3's flips
    s = defence_summary(rule, genuine, clean, attacked, defended, scores_clean_defended=clean)
    assert s.n_pairs == 6 and s.n_eligible == 4  # pairs 0, 1, 3, 4
    assert s.attack_success_rate == pytest.approx(2 / 4)
    assert s.attack_success_rate_with == pytest.approx(0.0)
    assert s.clean.auc == pytest.approx(roc_auc(-np.array(clean), np.array(genuine)))
    assert s.attacked.auc < s.clean.auc and s.defended.auc > s.attacked.auc
    assert set(s.aucs()) == {"clean", "attacked", "attacked_decoded", "clean_decoded"}
    # only the impostor pairs attacked (a fixed impersonation goal)
    only = defence_summary(
        rule, genuine, clean, attacked, defended, attacked=[False, False, False, True, True, True], dodge=[False] * 6
    )
    assert only.n_eligible == 2 and only.attack_success_rate == pytest.approx(0.5)
    none = defence_summary(rule, genuine, clean, clean, clean, attacked=[False] * 6)
    assert none.n_eligible == 0 and math.isnan(none.attack_success_rate)


def test_decode_and_reembed_shapes() -> None:
    def decode(z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z[:, :3, None, None].expand(-1, 3, 32, 32) * 4)

    seen: list[tuple[int, ...]] = []

    def embed(chips: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(chips.shape))
        assert float(chips.min()) >= 0 and float(chips.max()) <= 255
        return chips.mean(dim=(2, 3))

    faces, t = decode_and_reembed(torch.randn(5, 8), decode, embed, chip_size=48)
    assert faces.shape == (5, 3, 32, 32) and t.shape == (5, 3) and seen == [(5, 3, 48, 48)]


# -- a real, cheap run: deterministic under a seed -----------------------------------------------------------------


class _TextureCatalog:
    """The LBP patches only (no nets): a cheap, real estimator."""

    def resolve(self, names: list[str]) -> list[object]:
        from facexplain.attributes.texture import TextureEstimator

        return [s for s in TextureEstimator().specs if not names or s.name in names]

    def estimate(self, images: torch.Tensor, names: list[str] = (), landmarks: object = None) -> dict[str, np.ndarray]:  # type: ignore[assignment]
        from facexplain.attributes.texture import PATCH_NAMES, lbp_grid_histograms

        h = lbp_grid_histograms(images)
        wanted = list(names) or list(PATCH_NAMES)
        return {n: h[:, PATCH_NAMES.index(n) // 7, PATCH_NAMES.index(n) % 7] for n in wanted}


def test_real_pgd_explanation_is_deterministic() -> None:
    from facexplain.attacks import AttackBudget, VerificationObjective, chip_embedder, pgd
    from facexplain.models.recognition import FaceRecognitionNet
    from facexplain.pipeline import FacePipeline

    torch.set_num_threads(1)
    sample = Path(__file__).resolve().parents[4] / "data" / "sample" / "celeba" / "id7201"
    paths = sorted(sample.iterdir())[:2]
    pipe = FacePipeline.default("cpu")
    images = [
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) for p in paths
    ]
    results = pipe.analyze(images)
    assert all(r is not None for r in results)
    chips = (torch.stack([r.chip for r in results if r is not None]) / 255.0).clamp(0, 1)
    net: FaceRecognitionNet = pipe.recognition_net
    embed = chip_embedder(net)
    with torch.no_grad():
        z = embed(chips)
    objective = VerificationObjective(DLIB_L2_RULE, "dodge")
    assert bool(DLIB_L2_RULE.accepts(z[:1], z[1:]))  # a genuine pair the model accepts

    # a fixed random linear "decoder": deterministic, and sensitive to the template
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(128, 3 * 32 * 32, generator=gen) * 0.5

    def decode(t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(t @ w).view(-1, 3, 32, 32)

    tables = []
    for _ in range(2):
        r = pgd(embed, chips[:1], z[1:], objective, AttackBudget(8 / 255, steps=5, random_start=True), seed=7)
        assert bool(r.flipped[0])
        with torch.no_grad():
            z_adv = embed(r.adversarial)
        ex = explain_counterfactual(decode, _TextureCatalog(), z[0], z[1], z_adv[0], z_random=z[:1] + 0.01)
        tables.append([(row.attribute, row.s_a, row.delta, row.delta_control) for row in ex.rows])
        assert ex.lbp_map.shape == (7, 7) and ex.decoded_adversarial.shape == (3, 32, 32)
        np.testing.assert_allclose(lbp_map_from_rows(ex.rows), ex.lbp_map)
    assert tables[0] == tables[1]
    assert len(tables[0]) == 49
