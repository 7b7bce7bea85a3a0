"""Peak-location statistics (Yin et al. Fig. 5 / 9) on constructed response maps whose peaks are known.

The training pipeline only shows that these numbers are produced; here every one of them is held
against the answer worked out by hand from where the peaks were put, so a metric that returned a
constant, swapped rows and columns, or ignored empty maps would fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from facexplain.faces.occlusion import FaceMesh
from facexplain.metrics.interpretability import (
    cell_centres,
    location_spread,
    peak_location_stats,
    peak_locations,
)

M, S = 4, 32  # 4 x 4 maps of a 32-px input: cell (r, c) centres on ((c + 0.5) * 8 - 0.5, (r + 0.5) * 8 - 0.5)


def _centre(r: int, c: int) -> tuple[float, float]:
    return ((c + 0.5) * S / M - 0.5, (r + 0.5) * S / M - 0.5)


def _maps(peaks: list[list[tuple[tuple[int, int] | None, tuple[int, int] | None]]]) -> torch.Tensor:
    """peaks[face][filter] = (positive cell or None, negative cell or None) -> (F, N, M, M) maps with a
    small background so that argmax / argmin can only land on the planted cells."""
    f, n = len(peaks), len(peaks[0])
    maps = torch.zeros(f, n, M, M)
    for i, row in enumerate(peaks):
        for j, (pos, neg) in enumerate(row):
            if pos is not None:
                maps[i, j, pos[0], pos[1]] = 3.0 + i  # peak heights differ: only the location may matter
            if neg is not None:
                maps[i, j, neg[0], neg[1]] = -2.0 - j
    return maps


def test_cell_centres_are_x_then_y_in_input_pixels() -> None:
    flat = torch.tensor([0, 3, 4, 15])  # (0,0), (0,3), (1,0), (3,3)
    got = cell_centres(flat, M, S)
    want = torch.tensor([_centre(0, 0), _centre(0, 3), _centre(1, 0), _centre(3, 3)])
    torch.testing.assert_close(got, want)
    assert got[1].tolist() == [27.5, 3.5]  # column 3 is x, row 0 is y


def test_peak_locations_find_the_planted_cells_and_flag_empty_maps() -> None:
    maps = _maps([[((1, 2), (3, 0)), (None, (0, 1))], [((2, 2), None), (None, None)]])
    pos, pos_ok, neg, neg_ok = peak_locations(maps, S)
    assert pos_ok.tolist() == [[True, False], [True, False]]
    assert neg_ok.tolist() == [[True, True], [False, False]]
    assert pos[0, 0].tolist() == list(_centre(1, 2)) and pos[1, 0].tolist() == list(_centre(2, 2))
    assert neg[0, 0].tolist() == list(_centre(3, 0)) and neg[0, 1].tolist() == list(_centre(0, 1))


def test_stats_of_known_peaks_without_a_mesh() -> None:
    # filter 0: positive peak always on cell (1, 1): spread 0. Its negative peak alternates between
    # (0, 0) and (0, 2), 16 px apart on x: mean halfway, spread 8 px.
    # filter 1: positive peak on (0, 0), (0, 0), (2, 0): mean y = (3.5 + 3.5 + 19.5) / 3, spread
    # sqrt((2 * (16/3)^2 + (32/3)^2) / 3); never negative: NaN statistics and count 0.
    # filter 2: an all-zero map on every face: no peak of either sign.
    maps = _maps(
        [
            [((1, 1), (0, 0)), ((0, 0), None), (None, None)],
            [((1, 1), (0, 2)), ((0, 0), None), (None, None)],
            [((1, 1), (0, 0)), ((2, 0), None), (None, None)],
            [((1, 1), (0, 2)), (None, None), (None, None)],
        ]
    )
    maps[3, 1] = -1.0  # all negative: a negative peak (argmin of equal values: the first cell), no positive one
    rep = peak_location_stats(maps, S)
    assert (rep.faces, rep.map_size, rep.input_size) == (4, M, S)

    pos, neg = rep.positive, rep.negative
    assert pos.count.tolist() == [4, 3, 0] and neg.count.tolist() == [4, 1, 0]
    torch.testing.assert_close(pos.mean[0], torch.tensor(_centre(1, 1)))
    assert pos.std[0].item() == pytest.approx(0.0, abs=1e-6)
    y = (3.5 + 3.5 + 19.5) / 3
    torch.testing.assert_close(pos.mean[1], torch.tensor([3.5, y]))
    spread1 = math.sqrt((2 * (16 / 3) ** 2 + (32 / 3) ** 2) / 3)
    assert pos.std[1].item() == pytest.approx(spread1, rel=1e-5)
    torch.testing.assert_close(neg.mean[0], torch.tensor([11.5, 3.5]))
    assert neg.std[0].item() == pytest.approx(8.0, rel=1e-6)
    # filter 1's only negative peak is face 3's all-negative map (argmin of equal values: the first cell)
    torch.testing.assert_close(neg.mean[1], torch.tensor(_centre(0, 0)))
    assert neg.std[1].item() == 0.0
    for stats in (pos, neg):
        assert math.isnan(stats.std[2].item()) and bool(torch.isnan(stats.mean[2]).all())

    s = rep.summary()
    # averages leave out filters without peaks
    assert s["peak_pos_std_mean"] == pytest.approx(spread1 / 2, rel=1e-5)
    assert s["peak_neg_std_mean"] == pytest.approx(4.0, rel=1e-6)
    assert (s["peak_pos_filters_with_peaks"], s["peak_neg_filters_with_peaks"], s["peak_faces"]) == (2, 2, 4)
    # d: mean distance of the filters' mean locations from their centroid (two filters: half their distance)
    half = float(torch.tensor(_centre(1, 1)).sub(torch.tensor([3.5, y])).norm()) / 2
    assert s["peak_pos_location_spread"] == pytest.approx(half, rel=1e-5)


def test_location_spread_of_known_points() -> None:
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0]])
    assert location_spread(square) == pytest.approx(math.sqrt(2))
    assert location_spread(square[:1]) == 0.0
    assert math.isnan(location_spread(torch.zeros(0, 2)))


def _grid_mesh(landmarks: torch.Tensor) -> FaceMesh:
    return FaceMesh.from_template(landmarks, S, landmark_index=range(landmarks.shape[0]))


def test_peaks_are_warped_to_the_template_through_the_landmarks() -> None:
    """Faces shifted by a known offset: their peaks, mapped through the landmark mesh, land on the
    template's cell, so a filter that follows one face part has no spread although the raw peaks move."""
    # six template landmarks around the frame's centre, padded to the 68 the mesh indexes
    tmpl6 = torch.tensor([[8.0, 8.0], [24.0, 8.0], [24.0, 24.0], [8.0, 24.0], [16.0, 6.0], [16.0, 26.0]])
    mesh = _grid_mesh(tmpl6)
    shift = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])  # face i's landmarks = template + shift[i]
    lm = torch.zeros(3, 68, 2)
    lm[:, :6] = tmpl6[None] + shift[:, None]
    # the filter fires on the template point (11.5, 11.5) = cell (1, 1), carried along with each face
    cells = [(1, 1), (1, 2), (2, 1)]
    maps = _maps([[(c, None)] for c in cells])
    raw = peak_location_stats(maps, S)
    assert raw.positive.std[0].item() > 5  # without the warp the peak moves with the face
    rep = peak_location_stats(maps, S, landmarks68=lm, mesh=mesh)
    torch.testing.assert_close(rep.positive.mean[0], torch.tensor(_centre(1, 1)), atol=1e-3, rtol=0)
    assert rep.positive.std[0].item() == pytest.approx(0.0, abs=1e-3)
    assert rep.positive.count.tolist() == [3] and rep.negative.count.tolist() == [0]
    with pytest.raises(ValueError, match="both"):
        peak_location_stats(maps, S, landmarks68=lm)
