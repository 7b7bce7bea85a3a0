"""How interpretable a filter-bank representation is, measured as Yin et al. do (Fig. 5, 6 and 9).

* **Peak locations** (Fig. 5 / 9). For each filter, where on the face its response peaks: the
  positive peak (argmax of the response map) and the negative peak (argmin) of every face, mapped
  to a common frontal template frame, then their mean location and spread over the faces. A filter
  that always fires on the same face part has a small spread; filters that cover different parts
  have mean locations spread over the face.

  Mapping to the template. The response maps are ``m x m`` (24 x 24 for a 96-px input): cell
  (r, c) covers input pixels around ``((c + 0.5) · S/m - 0.5, (r + 0.5) · S/m - 0.5)``. With
  landmarks of each face in the input frame, that point is moved to the frontal template through
  the landmark mesh (``facexplain.faces.occlusion.warp_points``: the piecewise-affine map that takes
  the face's triangles onto the template's), which undoes pose and expression; without landmarks
  the aligned-input coordinates are used as they are (faces already aligned to one template).

  Spread of a filter (``std``): the root mean squared distance of its peaks to their mean, in
  template pixels (a 2-D standard deviation). Faces whose map has no positive value give no positive
  peak (after Large Magnitude Filtering a map can be all zero or all negative), and likewise for
  negative peaks; a filter with no peak at all has NaN statistics, left out of the averages.
  ``location_spread`` (the paper's d, defined here as the mean distance of the filters' mean
  locations from their centroid) measures how much of the face the filters cover together.

* **Feature difference under occlusion** (Fig. 6): per filter, the mean absolute difference between
  the (L2-normalised, as the authors' evaluation does) representations of clean and occluded faces.
  With one physical occlusion for all faces, the filters looking at the occluded part should stand
  out and the rest stay near zero.

All functions are plain tensor code (no model, no I/O); the results hold statistics, never images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from facexplain.faces.occlusion import FaceMesh, warp_points


@dataclass
class PeakStats:
    """Per filter: mean peak location (template pixels), spread and how many faces had a peak."""

    mean: torch.Tensor  # (N_f, 2) x, y; NaN where no face had a peak
    std: torch.Tensor  # (N_f,)
    count: torch.Tensor  # (N_f,) long

    def summary(self, prefix: str = "") -> dict[str, float]:
        ok = self.count > 0
        out = {
            f"{prefix}std_mean": float(self.std[ok].mean()) if bool(ok.any()) else float("nan"),
            f"{prefix}location_spread": location_spread(self.mean[ok]) if bool(ok.any()) else float("nan"),
            f"{prefix}filters_with_peaks": float(ok.sum()),
        }
        return out


@dataclass
class PeakLocationReport:
    """Positive and negative peak statistics over a set of faces."""

    positive: PeakStats
    negative: PeakStats
    faces: int
    map_size: int
    input_size: int

    def summary(self) -> dict[str, float]:
        return {**self.positive.summary("peak_pos_"), **self.negative.summary("peak_neg_"), "peak_faces": self.faces}


def cell_centres(flat_index: torch.Tensor, map_size: int, input_size: int) -> torch.Tensor:
    """Flat indices into ``map_size``² maps -> (..., 2) x, y of the cell centres in input pixels."""
    r = torch.div(flat_index, map_size, rounding_mode="floor").float()
    c = (flat_index % map_size).float()
    scale = input_size / map_size
    return torch.stack([(c + 0.5) * scale - 0.5, (r + 0.5) * scale - 0.5], dim=-1)


def peak_locations(
    maps: torch.Tensor, input_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, m, m) response maps -> positive/negative peak points (B, N, 2) in input pixels and their
    validity (B, N) bools (a positive peak needs a value > 0, a negative one a value < 0)."""
    b, n, m, _ = maps.shape
    flat = maps.detach().reshape(b, n, m * m)
    vmax, imax = flat.max(dim=-1)
    vmin, imin = flat.min(dim=-1)
    return cell_centres(imax, m, input_size), vmax > 0, cell_centres(imin, m, input_size), vmin < 0


def _stats(points: torch.Tensor, valid: torch.Tensor) -> PeakStats:
    """(F, N, 2) points over F faces, (F, N) validity -> per-filter mean, RMS spread, count."""
    w = valid.to(points.dtype)
    count = valid.sum(dim=0)
    denom = count.clamp_min(1).to(points.dtype)
    mean = (points * w[..., None]).sum(dim=0) / denom[:, None]
    sq = ((points - mean[None]) ** 2).sum(dim=-1)
    std = ((sq * w).sum(dim=0) / denom).sqrt()
    none = count == 0
    mean[none] = float("nan")
    std[none] = float("nan")
    return PeakStats(mean=mean, std=std, count=count)


def location_spread(means: torch.Tensor) -> float:
    """The paper's d, as defined here: mean distance of (N, 2) filter mean locations from their centroid."""
    if means.shape[0] == 0:
        return float("nan")
    return float((means - means.mean(dim=0, keepdim=True)).norm(dim=-1).mean())


def peak_location_stats(
    maps: torch.Tensor,
    input_size: int,
    landmarks68: torch.Tensor | None = None,
    mesh: FaceMesh | None = None,
) -> PeakLocationReport:
    """Peak-location statistics of (F, N, m, m) response maps of F faces (see the module docstring).

    With ``landmarks68`` (F, 68, 2) in the input frame and the template ``mesh`` (same frame), peaks
    are warped to the template; otherwise the aligned-input coordinates are used.
    """
    pos, pos_ok, neg, neg_ok = peak_locations(maps, input_size)
    if (landmarks68 is None) != (mesh is None):
        raise ValueError("pass both landmarks68 and mesh (warp to the template) or neither")
    if landmarks68 is not None and mesh is not None:
        face = mesh.face_points(landmarks68.to(maps.device))
        both = torch.cat([pos, neg], dim=1)
        warped, found = warp_points(both, face, mesh.points.to(maps.device), mesh.triangles)
        n = pos.shape[1]
        pos, neg = warped[:, :n], warped[:, n:]
        pos_ok, neg_ok = pos_ok & found[:, :n], neg_ok & found[:, n:]
    return PeakLocationReport(
        positive=_stats(pos.cpu(), pos_ok.cpu()),
        negative=_stats(neg.cpu(), neg_ok.cpu()),
        faces=int(maps.shape[0]),
        map_size=int(maps.shape[-1]),
        input_size=input_size,
    )


def feature_difference(clean: torch.Tensor, occluded: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    """(F, N) clean and occluded representations -> (N,) mean |f - f̂| per filter (Fig. 6).

    ``normalise`` L2-normalises each representation first, as the authors' evaluation does, so the
    figure compares directions, not magnitudes.
    """
    if clean.shape != occluded.shape or clean.dim() != 2:
        raise ValueError(f"expected two (F, N) feature sets, got {tuple(clean.shape)}, {tuple(occluded.shape)}")
    a, b = clean.detach().float(), occluded.detach().float()
    if normalise:
        a = torch.nn.functional.normalize(a, dim=1)
        b = torch.nn.functional.normalize(b, dim=1)
    return (a - b).abs().mean(dim=0)
