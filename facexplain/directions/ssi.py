"""Spatially isolated (SSI) directions: principal axes of template changes caused by one facial region.

Plesh et al. ("Discovering Interpretable Feature Directions in the Embedding Space of FR Models")
blend the region R of every *region donor* into every *face donor*
(:mod:`facexplain.faces.blend`), embed the N(N-1) blends, and look at how templates vary **within**
one face donor: everything outside R is that donor's, so the only variation left is what R
contributes. Concretely, with ``t_ij`` the template of face donor i with region donor j:

1. centre by face donor: ``c_ij = t_ij - m_i`` with ``m_i`` the mean over j of ``t_ij``;
2. centre by feature: subtract the mean of all ``c_ij`` (it is exactly zero after step 1, kept for
   the batch reference implementation only);
3. covariance ``C = sum_ij c_ij c_ij^T / (n - G)`` (n blends, G face donors: one degree of freedom
   per donor mean), eigendecomposition, keep the top d' eigenvectors.

Streaming (why and how): N = 160 gives 25,440 blends per region; their templates fit in memory but
the blends do not, and a service must report progress and stop on request, so the covariance is
accumulated in one pass. Per-donor centring needs each donor's mean, which is only known at the end;
the identity ``sum_j (t_ij - m_i)(t_ij - m_i)^T = S2_i - n_i m_i m_i^T`` (``S2_i`` the donor's
second moment) turns it into ``C (n - G) = S2 - sum_i s_i s_i^T / n_i`` with the *total* second moment
``S2`` and per-donor sums ``s_i``: D x D plus G x D numbers, whatever the order the blends arrive in.
To avoid cancellation between ``S2`` and the mean term (templates have norm ~1.5 but vary by a few
hundredths), each template is first shifted by its donor's first template seen; within-donor
centring is invariant to a per-donor shift, so the result is unchanged. Everything is float64.

The covariance is D x D (128 for the default model), so a full ``torch.linalg.eigh`` is cheap;
randomised or incremental PCA would only pay off for D in the tens of thousands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from facexplain.directions.traverse import projected_std
from facexplain.faces.blend import (
    DEFAULT_DILATE,
    DEFAULT_FEATHER,
    MaskMode,
    PointGroups,
    iter_blends,
    n_ordered_pairs,
    region_points,
)

EmbedFn = Callable[[torch.Tensor], torch.Tensor]
ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]


class DiscoveryCancelled(Exception):
    """Raised by :func:`discover_ssi` when ``should_stop()`` returns true; carries how far it got."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"SSI discovery cancelled after {done} of {total} blends")
        self.done = done
        self.total = total


@dataclass(frozen=True)
class Components:
    """Top principal axes of a covariance: unit rows, largest eigenvalue first."""

    directions: torch.Tensor  # (k, D) float64, orthonormal rows
    eigenvalues: torch.Tensor  # (k,) float64, descending
    explained_variance: torch.Tensor  # (k,) float64, eigenvalue / trace of the covariance
    total_variance: float  # trace of the covariance


def top_components(cov: torch.Tensor, n_components: int) -> Components:
    """Eigendecomposition of a symmetric (D, D) covariance -> its ``n_components`` largest axes.

    Eigenvectors have no sign of their own; each is flipped so that its largest-magnitude entry is
    positive, which makes results reproducible across runs and machines (a saved direction set must
    not change sign between two discoveries on the same data).
    """
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"expected a square covariance, got {tuple(cov.shape)}")
    d = cov.shape[0]
    if not 1 <= n_components <= d:
        raise ValueError(f"n_components must be in 1..{d}, got {n_components}")
    c = cov.to(torch.float64)
    c = 0.5 * (c + c.T)
    vals, vecs = torch.linalg.eigh(c)  # ascending
    vals = vals.flip(0)[:n_components]
    vecs = vecs.flip(1)[:, :n_components].T.contiguous()  # (k, D)
    pivot = vecs.abs().argmax(dim=1)
    signs = torch.sign(vecs.gather(1, pivot[:, None])).squeeze(1)
    vecs = vecs * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    total = float(torch.diagonal(c).sum())
    ratio = vals / total if total > 0 else torch.zeros_like(vals)
    return Components(vecs, vals, ratio, total)


def within_donor_covariance(templates: torch.Tensor, face_donor_ids: torch.Tensor) -> torch.Tensor:
    """Reference (all in memory) computation: centre by donor, centre by feature, covariance / (n - G).

    Kept deliberately literal to the paper's steps, so it can check :class:`SSIAccumulator`.
    """
    x = templates.detach().to("cpu", torch.float64)
    ids = torch.as_tensor(face_donor_ids).to("cpu", torch.int64)
    if x.dim() != 2 or ids.shape != (x.shape[0],):
        raise ValueError(f"templates (n, D) and face_donor_ids (n,) expected, got {tuple(x.shape)}, {tuple(ids.shape)}")
    groups = torch.unique(ids)
    centred = torch.empty_like(x)
    for g in groups.tolist():
        sel = ids == g
        centred[sel] = x[sel] - x[sel].mean(dim=0, keepdim=True)
    centred = centred - centred.mean(dim=0, keepdim=True)
    dof = x.shape[0] - len(groups)
    if dof < 1:
        raise ValueError("need more templates than face donors (at least one donor with two blends)")
    return centred.T @ centred / dof


def ssi_components(templates: torch.Tensor, face_donor_ids: torch.Tensor, n_components: int) -> Components:
    """SSI axes from all templates at once (small data, tests); :class:`SSIAccumulator` streams the same."""
    return top_components(within_donor_covariance(templates, face_donor_ids), n_components)


class SSIAccumulator:
    """One-pass accumulation of the within-face-donor covariance of blend templates (see module docstring).

    Keeps the total shifted second moment (D x D) and, per face donor, a count, a sum and a shift
    (the donor's first template): memory O(D^2 + G D), independent of the number of blends. Batches
    may arrive in any order and a donor's blends may be spread over many batches.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"template dimension must be positive, got {dim}")
        self.dim = dim
        self._s2 = torch.zeros(dim, dim, dtype=torch.float64)
        self._sums = torch.zeros(0, dim, dtype=torch.float64)
        self._shift = torch.zeros(0, dim, dtype=torch.float64)
        self._counts = torch.zeros(0, dtype=torch.int64)
        self.n_samples = 0

    @property
    def n_groups(self) -> int:
        """Face donors seen so far."""
        return int((self._counts > 0).sum())

    def _grow(self, size: int) -> None:
        old = self._counts.shape[0]
        if size <= old:
            return
        extra = size - old
        self._sums = torch.cat([self._sums, torch.zeros(extra, self.dim, dtype=torch.float64)])
        self._shift = torch.cat([self._shift, torch.zeros(extra, self.dim, dtype=torch.float64)])
        self._counts = torch.cat([self._counts, torch.zeros(extra, dtype=torch.int64)])

    def update(self, templates: torch.Tensor, face_donor_ids: torch.Tensor | Sequence[int]) -> None:
        """Add (B, D) blend templates whose face donors are ``face_donor_ids`` (B,) non-negative ints."""
        x = templates.detach().to("cpu", torch.float64)
        ids = torch.as_tensor(face_donor_ids).to("cpu", torch.int64).reshape(-1)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}) templates, got {tuple(x.shape)}")
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} templates but {ids.shape[0]} face donor ids")
        if x.shape[0] == 0:
            return
        if int(ids.min()) < 0:
            raise ValueError("face donor ids must be non-negative")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("templates contain NaN or infinite values")
        self._grow(int(ids.max()) + 1)
        new = ids[self._counts[ids] == 0]
        for g in torch.unique(new).tolist():
            first = int((ids == g).nonzero()[0, 0])
            self._shift[g] = x[first]
        xs = x - self._shift[ids]
        self._s2 += xs.T @ xs
        self._sums.index_add_(0, ids, xs)
        self._counts.index_add_(0, ids, torch.ones_like(ids))
        self.n_samples += x.shape[0]

    def covariance(self) -> torch.Tensor:
        """(D, D) float64: ``(S2 - sum_i s_i s_i^T / n_i) / (n - G)`` over the donors seen."""
        active = self._counts > 0
        dof = self.n_samples - int(active.sum())
        if dof < 1:
            raise ValueError("need more templates than face donors (at least one donor with two blends)")
        sums = self._sums[active]
        means = sums / self._counts[active, None].to(torch.float64)
        return (self._s2 - means.T @ sums) / dof

    def components(self, n_components: int) -> Components:
        return top_components(self.covariance(), n_components)


@dataclass(frozen=True)
class SSIResult:
    """A discovered SSI direction set with what is needed to cite and reuse it."""

    region: str  # a REGIONS name, or "custom" for explicit landmark groups
    points: PointGroups  # the landmark groups whose hulls made the masks
    directions: torch.Tensor  # (k, D) float32, orthonormal rows, largest variance first
    eigenvalues: torch.Tensor  # (k,) float64, variance of the within-donor blend templates along each
    explained_variance: torch.Tensor  # (k,) float64, eigenvalue / total within-donor variance; sums <= 1
    stddev: torch.Tensor  # (k,) float64, std of the *original* (unblended) templates along each direction
    total_variance: float
    n_faces: int
    n_blends: int
    dim: int
    dilate: float
    feather: float
    mask_mode: str
    normalized: bool  # templates were L2-normalised before the covariance


def _embed(embed_fn: EmbedFn, batch: torch.Tensor, normalize: bool) -> torch.Tensor:
    with torch.no_grad():
        t = embed_fn(batch)
    t = t.detach().to("cpu", torch.float64)
    if t.dim() != 2 or t.shape[0] != batch.shape[0]:
        raise ValueError(f"embed_fn returned shape {tuple(t.shape)} for a batch of {batch.shape[0]}")
    return torch.nn.functional.normalize(t, dim=1) if normalize else t


def discover_ssi(
    chips: torch.Tensor,
    landmarks: torch.Tensor,
    embed_fn: EmbedFn,
    region: str | Sequence[Sequence[int]] | Sequence[int] = "nose",
    n_components: int = 10,
    batch_size: int = 64,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    *,
    dilate: float = DEFAULT_DILATE,
    feather: float = DEFAULT_FEATHER,
    mask_mode: MaskMode = "union",
    normalize: bool = False,
    original_templates: torch.Tensor | None = None,
    pairs: torch.Tensor | None = None,
) -> SSIResult:
    """Blend, embed and accumulate all N(N-1) ordered blends of one region; return the top SSI directions.

    ``chips`` (N, 3, S, S) aligned chips (uint8 or float in [0, 255], e.g. ``FaceSet.chips``) with
    ``landmarks`` (N, 68, 2) in chip pixels (``FaceSet.landmarks``). ``embed_fn`` maps a float32
    (B, 3, S, S) batch in [0, 255], on the chips' device, to (B, D) templates (e.g.
    ``FacePipeline.embed_chips``); it is called under ``torch.no_grad``. Only one batch of blends
    exists at a time.

    ``progress(done, total)`` is called after each batch (blends done of N(N-1)); ``should_stop()``
    is polled before each batch and ends the run with :class:`DiscoveryCancelled`. ``stddev`` is
    measured on ``original_templates`` (N, D) if given, else on the embedded original chips: it is the
    scale for traversals in standard-deviation units. ``normalize`` L2-normalises every template
    first (decoders normalise their input, so directions on the sphere can be what one wants).
    ``pairs`` (flat pair numbers from :func:`facexplain.faces.blend.sample_pairs`) blends only those
    pairs instead of all N(N-1): the work per region is then bounded whatever N is, and
    ``progress`` counts against ``len(pairs)``.
    """
    points = region_points(region)
    name = region if isinstance(region, str) else "custom"
    n = chips.shape[0]
    if n < 2:
        raise ValueError(f"SSI needs at least 2 faces, got {n}")
    total = n_ordered_pairs(n) if pairs is None else int(torch.as_tensor(pairs).numel())
    stop = should_stop or (lambda: False)

    if original_templates is None:
        parts = []
        for s in range(0, n, batch_size):
            if stop():
                raise DiscoveryCancelled(0, total)
            parts.append(_embed(embed_fn, chips[s : s + batch_size].to(torch.float32), normalize))
        originals = torch.cat(parts)
    else:
        if original_templates.shape[0] != n:
            raise ValueError(f"{n} chips but {original_templates.shape[0]} original templates")
        originals = original_templates.detach().to("cpu", torch.float64)
        if normalize:
            originals = torch.nn.functional.normalize(originals, dim=1)
    dim = originals.shape[1]
    if not 1 <= n_components <= dim:
        raise ValueError(f"n_components must be in 1..{dim}, got {n_components}")

    acc = SSIAccumulator(dim)
    done = 0
    blends = iter_blends(
        chips, landmarks, points, batch_size, dilate=dilate, feather=feather, mask_mode=mask_mode, pairs=pairs
    )
    while True:
        if stop():
            raise DiscoveryCancelled(done, total)
        item = next(blends, None)
        if item is None:
            break
        face_idx, _, batch = item
        acc.update(_embed(embed_fn, batch, normalize), face_idx)
        done += batch.shape[0]
        if progress is not None:
            progress(done, total)

    comp = acc.components(n_components)
    return SSIResult(
        region=name,
        points=points,
        directions=comp.directions.to(torch.float32),
        eigenvalues=comp.eigenvalues,
        explained_variance=comp.explained_variance,
        stddev=projected_std(originals, comp.directions),
        total_variance=comp.total_variance,
        n_faces=n,
        n_blends=acc.n_samples,
        dim=dim,
        dilate=float(dilate),
        feather=float(feather),
        mask_mode=mask_mode,
        normalized=normalize,
    )
