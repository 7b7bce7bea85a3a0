"""Adversarial counterfactuals read as attribute changes: significance s_a (Ren et al. §III-D).

For a probe x, its reference x_ref and an adversarial x_adv (a counterfactual: the smallest change
that flips the FR decision), the templates z, z_ref, z_adv are decoded (the FR model's registered
decoder) and the same attribute catalogue measures the three decoded faces: â, â_ref, â_adv. Then per
attribute

    s_a = ||â − â_adv|| / ||â − â_ref||

is how far the attack moved the attribute, in units of how different the pair's two faces are on it.
s_a > 1 ("significant") means the perturbation, which the FR model reads as "not the same person"
(or "the same person"), changed the attribute more than the whole difference between the two faces.

Zero denominators: when â == â_ref exactly (the pair does not differ on the attribute, e.g. a
discrete attribute both faces share), s_a is ``inf`` if the attack moved it (significant) and ``NaN``
for 0/0 (nothing moved; not significant). An attribute that could not be estimated on one of the
faces (NaN values) gives ``NaN``. Ranking puts ``inf`` first, then finite values descending, ``NaN``
last; ties are broken by the numerator (larger first), then by catalogue order, so a table is a pure
function of the values.

The LBP map is s_a over the 7 x 7 ``lbp_r{r}_c{c}`` texture patches (:mod:`facexplain.attributes.texture`),
laid out as the face: where on the face the attack changed local texture most, relative to the pair.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from PIL import Image

from facexplain.attributes.texture import GRID, lbp_grid_histograms, patch_name

DecodeFn = Callable[[torch.Tensor], torch.Tensor]


def significance_ratio(delta: float, delta_reference: float) -> float:
    """s_a from its numerator and denominator: inf for x/0 with x > 0, NaN for 0/0 or a NaN input."""
    if math.isnan(delta) or math.isnan(delta_reference):
        return math.nan
    if delta_reference == 0.0:
        return math.inf if delta > 0.0 else math.nan
    return delta / delta_reference


@dataclass(frozen=True)
class Significance:
    """One attribute's row of an s_a table (the API's ``AttributeSignificance``)."""

    attribute: str
    group: str
    s_a: float
    delta: float  # ||â − â_adv||, in the attribute's unit
    delta_reference: float  # ||â − â_ref||
    delta_control: float = math.nan  # mean ||â − â_rand|| over random perturbations of the same norm

    @property
    def significant(self) -> bool:
        """s_a > 1 (inf counts; NaN does not)."""
        return not math.isnan(self.s_a) and self.s_a > 1.0


def _vector(values: Mapping[str, ArrayLike], name: str, which: str) -> np.ndarray:
    if name not in values:
        raise ValueError(f"attribute {name!r} is missing from the {which} values")
    v = np.asarray(values[name], dtype=np.float64)
    if v.ndim == 2 and v.shape[0] != 1:
        raise ValueError(f"{which}: {name!r} must be one face's values ((dim,) or (1, dim)), got {v.shape}")
    return v.reshape(-1)


def _norm(v: np.ndarray) -> float:
    return float(np.linalg.norm(v)) if not np.isnan(v).any() else math.nan


def rank_significance(rows: Sequence[Significance]) -> list[Significance]:
    """Rows by s_a descending (inf first, NaN last); ties by numerator, then input order (stable)."""

    def key(item: tuple[int, Significance]) -> tuple[int, float, float, int]:
        k, r = item
        if math.isnan(r.s_a):
            return (2, 0.0, -r.delta if not math.isnan(r.delta) else 0.0, k)
        if math.isinf(r.s_a):
            return (0, 0.0, -r.delta, k)
        return (1, -r.s_a, -r.delta, k)

    return [r for _, r in sorted(enumerate(rows), key=key)]


def attribute_significance(
    probe: Mapping[str, ArrayLike],
    reference: Mapping[str, ArrayLike],
    adversarial: Mapping[str, ArrayLike],
    names: Sequence[str] | None = None,
    *,
    groups: Mapping[str, str] | None = None,
    control: Mapping[str, ArrayLike] | None = None,
) -> list[Significance]:
    """The ranked s_a table from attributes recovered on the three decoded faces.

    ``probe``, ``reference``, ``adversarial``: {name: (dim,) or (1, dim)} (â, â_ref, â_adv);
    ``names`` the attributes to score (default: all of ``probe``'s, in its order); ``groups`` their
    groups (for the table); ``control``: {name: (K, dim)} attributes recovered from K random
    perturbations of the same norm, whose mean distance to â is reported beside s_a (NaN rows
    ignored; NaN when none).
    """
    names = list(probe) if names is None else list(names)
    groups = groups or {}
    rows: list[Significance] = []
    for name in names:
        a = _vector(probe, name, "probe")
        a_ref = _vector(reference, name, "reference")
        a_adv = _vector(adversarial, name, "adversarial")
        if not a.shape == a_ref.shape == a_adv.shape:
            raise ValueError(f"{name!r}: probe, reference and adversarial have different dimensions")
        delta, delta_ref = _norm(a - a_adv), _norm(a - a_ref)
        ctrl = math.nan
        if control is not None and name in control:
            c = np.asarray(control[name], dtype=np.float64).reshape(-1, a.size)
            c = c[~np.isnan(c).any(axis=1)]
            if c.shape[0] and not np.isnan(a).any():
                ctrl = float(np.linalg.norm(c - a[None], axis=1).mean())
        rows.append(
            Significance(
                attribute=name,
                group=groups.get(name, ""),
                s_a=significance_ratio(delta, delta_ref),
                delta=delta,
                delta_reference=delta_ref,
                delta_control=ctrl,
            )
        )
    return rank_significance(rows)


# -- LBP patch significance -----------------------------------------------------------------------------


def lbp_significance_map(probe: torch.Tensor, reference: torch.Tensor, adversarial: torch.Tensor) -> np.ndarray:
    """(7, 7) s_a of the ``lbp_r{r}_c{c}`` patches from three decoded faces, each (3, S, S) or (1, 3, S, S) in [0, 1].

    Cell [r, c] is ||h − h_adv|| / ||h − h_ref|| of the patch's 10-bin LBP histograms (zero
    denominators as :func:`significance_ratio`), the same value the s_a table holds for that patch.
    """
    faces = torch.cat([t.reshape(1, *t.shape[-3:]).detach().float().cpu() for t in (probe, reference, adversarial)])
    h = lbp_grid_histograms(faces.clamp(0.0, 1.0))  # (3, 7, 7, 10)
    num = np.linalg.norm(h[0] - h[2], axis=-1)
    den = np.linalg.norm(h[0] - h[1], axis=-1)
    return np.vectorize(significance_ratio, otypes=[np.float64])(num, den)


def lbp_map_from_rows(rows: Sequence[Significance], grid: int = GRID) -> np.ndarray:
    """The (grid, grid) LBP map from an s_a table's ``lbp_r*_c*`` rows (NaN where a patch is missing)."""
    by_name = {r.attribute: r.s_a for r in rows}
    out = np.full((grid, grid), np.nan)
    for r in range(grid):
        for c in range(grid):
            out[r, c] = by_name.get(patch_name(r, c), math.nan)
    return out


def heatmap_rgb(
    values: np.ndarray,
    *,
    size: int = 150,
    background: torch.Tensor | None = None,
    vmax: float | None = None,
    alpha: float = 0.7,
    cmap: str = "inferno",
) -> np.ndarray:
    """A (G, G) map as a (size, size, 3) uint8 heat map, optionally blended over a (3, S, S) face in [0, 1].

    Colours run from 0 to ``vmax`` (default: max(2, largest finite value), so 1, the significance
    boundary, is at most mid-scale); inf takes the top colour, NaN is drawn mid-grey. Each cell is a
    flat block (nearest-neighbour upsampling), so the map reads as the patch grid it is.
    """
    import matplotlib  # heavy and optional: only a caller that draws a heatmap pays for it

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {v.shape}")
    finite = v[np.isfinite(v)]
    top = vmax if vmax is not None else max(2.0, float(finite.max()) if finite.size else 2.0)
    scaled = np.where(np.isinf(v), 1.0, np.clip(np.nan_to_num(v, nan=0.0) / top, 0.0, 1.0))
    rgb = matplotlib.colormaps[cmap](scaled)[..., :3]
    rgb[np.isnan(v)] = 0.5
    cells = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    big = torch.nn.functional.interpolate(cells, size=(size, size), mode="nearest")[0]
    if background is not None:
        face = background.detach().float().cpu().reshape(1, *background.shape[-3:])
        face = torch.nn.functional.interpolate(face, size=(size, size), mode="bilinear", align_corners=False)[0]
        grey = face.mean(0, keepdim=True).expand(3, -1, -1)
        big = alpha * big + (1 - alpha) * grey
    return (big.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def heatmap_png(values: np.ndarray, **kwargs: Any) -> bytes:
    """:func:`heatmap_rgb` encoded as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(heatmap_rgb(values, **kwargs)).save(buf, format="PNG")
    return buf.getvalue()


# -- the whole explanation ------------------------------------------------------------------------------------


@dataclass
class Explanation:
    """s_a table, LBP map and the three decoded faces of one counterfactual."""

    rows: list[Significance]
    lbp_map: np.ndarray  # (7, 7) s_a of the LBP patches
    decoded_probe: torch.Tensor  # (3, S, S) in [0, 1]
    decoded_reference: torch.Tensor
    decoded_adversarial: torch.Tensor
    values: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # "probe"/"reference"/"adversarial"

    def significant(self) -> list[Significance]:
        return [r for r in self.rows if r.significant]

    def top(self, k: int = 10) -> list[str]:
        return [r.attribute for r in self.rows if not math.isnan(r.s_a)][:k]


@torch.no_grad()
def explain_counterfactual(
    decode: DecodeFn,
    catalog: Any,
    z: torch.Tensor,
    z_ref: torch.Tensor,
    z_adv: torch.Tensor,
    names: Sequence[str] = (),
    *,
    z_random: torch.Tensor | None = None,
    groups: Mapping[str, str] | None = None,
) -> Explanation:
    """Decode z, z_ref, z_adv (and the optional (K, D) control templates ``z_random``) in one batch, recover
    attributes with ``catalog.estimate`` (an :class:`~facexplain.attributes.catalog.AttributeCatalog`),
    and return the ranked s_a table (``names``: the attributes; empty = the catalogue's all), the LBP map
    and the decoded faces. Deterministic given deterministic ``decode`` and ``catalog``.
    """
    rows3 = [t.reshape(1, -1).float() for t in (z, z_ref, z_adv)]
    templates = torch.cat(rows3 + ([z_random.reshape(-1, rows3[0].shape[1]).float()] if z_random is not None else []))
    decoded = decode(templates).detach().float().clamp(0.0, 1.0).cpu()
    values = catalog.estimate(decoded, list(names))
    probe = {n: v[0] for n, v in values.items()}
    ref = {n: v[1] for n, v in values.items()}
    adv = {n: v[2] for n, v in values.items()}
    control = {n: v[3:] for n, v in values.items()} if z_random is not None else None
    if groups is None and hasattr(catalog, "resolve"):
        groups = {s.name: s.group for s in catalog.resolve(list(names))}
    rows = attribute_significance(probe, ref, adv, list(values), groups=groups, control=control)
    return Explanation(
        rows=rows,
        lbp_map=lbp_significance_map(decoded[0], decoded[1], decoded[2]),
        decoded_probe=decoded[0],
        decoded_reference=decoded[1],
        decoded_adversarial=decoded[2],
        values={"probe": probe, "reference": ref, "adversarial": adv},
    )


# -- agreement of two attack families ------------------------------------------------------------------------


@dataclass(frozen=True)
class TopKOverlap:
    """How many of the top-k attributes two rankings share (Ren et al. compare PGD and CW this way)."""

    k: int
    count: int  # |top_a ∩ top_b|
    jaccard: float  # |∩| / |∪|
    common: tuple[str, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]

    @property
    def fraction(self) -> float:
        """count / k: the share of one top-k list found in the other (equal lengths)."""
        return self.count / self.k if self.k else math.nan


def _ranked_names(rows: Sequence[Significance] | Sequence[str], k: int) -> list[str]:
    names = [r if isinstance(r, str) else r.attribute for r in rows if isinstance(r, str) or not math.isnan(r.s_a)]
    return names[:k]


def topk_overlap(
    a: Sequence[Significance] | Sequence[str], b: Sequence[Significance] | Sequence[str], k: int = 10
) -> TopKOverlap:
    """Overlap of the top ``k`` of two rankings (rows as from :func:`attribute_significance`, or names in
    rank order); rows with NaN s_a are not ranked. Jaccard is NaN when both lists are empty."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ta, tb = _ranked_names(a, k), _ranked_names(b, k)
    sa, sb = set(ta), set(tb)
    union = sa | sb
    return TopKOverlap(
        k=k,
        count=len(sa & sb),
        jaccard=len(sa & sb) / len(union) if union else math.nan,
        common=tuple(n for n in ta if n in sb),
        only_a=tuple(n for n in ta if n not in sb),
        only_b=tuple(n for n in tb if n not in sa),
    )
