"""Label-guided directions in template space: class centroids, linear regression, and MDS of centroids.

Where SSI finds directions from pixels alone, these use a label per face (a CelebA attribute, an
estimated yaw bin, an expression class) to say *which* change a direction should capture (Plesh et al.):

* **centroid** direction of class k: ``d_k = mean(t | label k) - mean(t | reference label)``, so
  ``t + 1 * d_k`` moves a reference-class face by exactly the average class difference (eq. 9);
* **regression** direction: fit ``y = w . t + b`` (ordinary or ridge least squares with an intercept);
  ``w`` points where the label grows fastest, and because the model is linear the step that reaches a
  target value is known in closed form (:func:`alpha_to_target`, eq. 12-13);
* **MDS** of the class centroids: a 2-D map of how far apart the classes are in template space, for plots.

Labels with value NaN (a face set's marker for "no label") are left out everywhere, never imputed.
All arithmetic is float64 on the CPU: the matrices are (n, D) with D ~ 128 and the results are small.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

LabelValue = Hashable

# A centroid from fewer templates is dominated by who those faces are, not by the label.
DEFAULT_MIN_COUNT = 5


def _templates64(templates: torch.Tensor) -> torch.Tensor:
    x = templates.detach().to("cpu", torch.float64)
    if x.dim() != 2:
        raise ValueError(f"expected (n, D) templates, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("templates contain NaN or infinite values")
    return x


def _is_missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _label_list(labels: Sequence[LabelValue] | torch.Tensor, n: int) -> list[LabelValue]:
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1:
            raise ValueError(f"expected (n,) labels, got {tuple(labels.shape)}")
        values: list[LabelValue] = labels.tolist()
    else:
        values = list(labels)
    if len(values) != n:
        raise ValueError(f"{n} templates but {len(values)} labels")
    return values


def _sorted_classes(values: list[LabelValue]) -> list[LabelValue]:
    uniq = list(dict.fromkeys(values))
    try:
        return sorted(uniq)  # type: ignore[type-var]
    except TypeError:  # mixed types: a stable, deterministic order anyway
        return sorted(uniq, key=repr)


@dataclass(frozen=True)
class CentroidDirections:
    """Class means and their differences from the reference class."""

    classes: list[LabelValue]  # every class, reference first, then the others in sorted order
    reference: LabelValue
    centroids: torch.Tensor  # (C, D) float64, mean template per class, in ``classes`` order
    counts: list[int]  # templates per class, in ``classes`` order
    directions: torch.Tensor  # (C - 1, D) float64: centroid of classes[k + 1] minus the reference centroid

    def direction(self, label: LabelValue) -> torch.Tensor:
        """The (D,) direction from the reference class to ``label``."""
        if label == self.reference:
            raise ValueError(f"{label!r} is the reference class: its direction is zero")
        try:
            k = self.classes.index(label)
        except ValueError:
            raise ValueError(f"unknown class {label!r}; classes: {self.classes}") from None
        return self.directions[k - 1]


def centroid_directions(
    templates: torch.Tensor,
    labels: Sequence[LabelValue] | torch.Tensor,
    reference: LabelValue | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
) -> CentroidDirections:
    """``d_k = mean(t | k) - mean(t | reference)`` for every class k other than the reference.

    ``labels`` is one value per template (numbers, strings, ...); NaN/None labels are skipped.
    ``reference`` defaults to the smallest class (0 or -1 for a binary CelebA attribute, i.e.
    "attribute absent"). Every class needs ``min_count`` templates, else ValueError naming the
    classes that fall short: a direction from a handful of faces mostly encodes those identities.
    """
    x = _templates64(templates)
    values = _label_list(labels, x.shape[0])
    keep = [i for i, v in enumerate(values) if not _is_missing(v)]
    values = [values[i] for i in keep]
    x = x[keep]
    classes = _sorted_classes(values)
    if len(classes) < 2:
        raise ValueError(f"need at least two classes, got {classes}")
    if reference is None:
        reference = classes[0]
    if reference not in classes:
        raise ValueError(f"reference class {reference!r} does not occur; classes: {classes}")
    classes = [reference] + [c for c in classes if c != reference]
    counts = [sum(1 for v in values if v == c) for c in classes]
    short = {c: k for c, k in zip(classes, counts, strict=True) if k < min_count}
    if short:
        raise ValueError(f"every class needs at least {min_count} templates; too few in {short}")
    centroids = torch.stack([x[torch.tensor([v == c for v in values], dtype=torch.bool)].mean(dim=0) for c in classes])
    return CentroidDirections(classes, reference, centroids, counts, centroids[1:] - centroids[0])


def bin_values(values: torch.Tensor, edges: Sequence[float]) -> torch.Tensor:
    """Continuous labels -> bin numbers 0..len(edges) (bin k is ``edges[k-1] <= v < edges[k]``), NaN kept NaN.

    For centroid directions over a continuous quantity such as estimated yaw in degrees.
    """
    e = torch.as_tensor(list(edges), dtype=torch.float64)
    if e.numel() == 0 or bool((e[1:] <= e[:-1]).any()):
        raise ValueError(f"bin edges must be non-empty and strictly increasing, got {list(edges)}")
    v = values.detach().to("cpu", torch.float64)
    bins = torch.bucketize(v, e, right=True).to(torch.float64)
    return torch.where(torch.isnan(v), v, bins)


@dataclass(frozen=True)
class RegressionDirection:
    """``y ~ coef . t + intercept`` fitted by (ridge) least squares, and its unit direction."""

    coef: torch.Tensor  # (D,) float64, the raw regression coefficients w
    intercept: float
    direction: torch.Tensor  # (D,) float64, w / |w|
    ridge: float
    n: int  # templates used (NaN labels excluded)
    r2: float  # coefficient of determination on the fitting data

    def predict(self, templates: torch.Tensor) -> torch.Tensor:
        """(n, D) or (D,) templates -> predicted label values (float64)."""
        return templates.detach().to("cpu", torch.float64) @ self.coef + self.intercept


def regression_direction(
    templates: torch.Tensor, values: Sequence[float] | torch.Tensor, ridge: float = 0.0
) -> RegressionDirection:
    """Least-squares fit of ``y = w . t + b`` (intercept not penalised); the direction is ``w``.

    ``ridge`` > 0 minimises ``|y - Xw - b|^2 + ridge |w|^2``: needed when there are fewer labelled
    templates than dimensions, and it stabilises ``w`` when templates are nearly collinear. With
    ``ridge = 0`` and an under-determined system the minimum-norm solution is returned (it fits the
    data exactly; prefer a ridge). NaN labels are skipped.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    x = _templates64(templates)
    y = torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu()
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} templates but {y.shape[0]} label values")
    ok = ~torch.isnan(y)
    x, y = x[ok], y[ok]
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 labelled templates, got {x.shape[0]}")
    if float(y.max() - y.min()) == 0.0:
        raise ValueError("all label values are equal: there is nothing to regress")
    x_mean, y_mean = x.mean(dim=0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    if ridge > 0:
        gram = xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=torch.float64)
        w = torch.linalg.solve(gram, xc.T @ yc)
    else:
        w = torch.linalg.lstsq(xc, yc[:, None], driver="gelsd").solution[:, 0]
    b = float(y_mean - x_mean @ w)
    norm = float(w.norm())
    if norm == 0.0:
        raise ValueError("the fitted coefficients are all zero: the label is not linearly related to templates")
    resid = y - (x @ w + b)
    r2 = 1.0 - float(resid @ resid) / float(yc @ yc)
    return RegressionDirection(w, b, w / norm, float(ridge), x.shape[0], r2)


def alpha_to_target(
    templates: torch.Tensor,
    regression: RegressionDirection,
    target: float | torch.Tensor,
    along: Literal["coef", "unit"] = "coef",
) -> torch.Tensor:
    """The step that moves each probe template to a predicted label value of ``target`` (eq. 12-13).

    With the linear model ``y = w . t + b``, the prediction of ``t + alpha * w`` is
    ``w . t + b + alpha * (w . w)``, so::

        alpha = (y_target - (w . t_probe + b)) / (w . w)        (along="coef": step t + alpha * w)

    reaches the target exactly. ``along="unit"`` gives the same move for the unit direction
    ``v = w / |w|``: ``alpha_v = (y_target - (w . t_probe + b)) / |w|`` (step ``t + alpha_v * v``).
    Templates (n, D) -> (n,) alphas; a single (D,) template -> a 0-d tensor. float64.
    """
    pred = regression.predict(templates)
    tgt = torch.as_tensor(target, dtype=torch.float64)
    ww = float(regression.coef @ regression.coef)
    if along == "coef":
        return (tgt - pred) / ww
    if along == "unit":
        return (tgt - pred) / math.sqrt(ww)
    raise ValueError(f"along must be 'coef' or 'unit', got {along!r}")


def classical_mds(distances: torch.Tensor, n_components: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical (Torgerson) MDS: (K, K) distances -> (K, n_components) coordinates and their eigenvalues.

    Double-centres the squared distances, ``B = -1/2 J D^2 J`` with ``J = I - 11^T / K``, and uses the
    top eigenvectors scaled by the square roots of their eigenvalues. Points that really lie in
    ``n_components`` dimensions are reproduced up to rotation/reflection/translation; otherwise this is
    the best such embedding in the least-squares sense on B. Negative eigenvalues (non-Euclidean input)
    give zero coordinates. Each axis is flipped so its largest-magnitude coordinate is positive
    (deterministic plots).
    """
    d = distances.detach().to("cpu", torch.float64)
    if d.dim() != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"expected a square distance matrix, got {tuple(d.shape)}")
    k = d.shape[0]
    if n_components < 1:
        raise ValueError(f"n_components must be positive, got {n_components}")
    if k < 2:
        raise ValueError("MDS needs at least two points")
    d = 0.5 * (d + d.T)
    j = torch.eye(k, dtype=torch.float64) - 1.0 / k
    b = -0.5 * j @ (d * d) @ j
    vals, vecs = torch.linalg.eigh(0.5 * (b + b.T))
    vals, vecs = vals.flip(0), vecs.flip(1)
    m = min(n_components, k)
    vals, vecs = vals[:m], vecs[:, :m]
    coords = vecs * vals.clamp_min(0.0).sqrt()
    if m < n_components:
        coords = torch.cat([coords, torch.zeros(k, n_components - m, dtype=torch.float64)], dim=1)
        vals = torch.cat([vals, torch.zeros(n_components - m, dtype=torch.float64)])
    pivot = coords.abs().argmax(dim=0)
    signs = torch.sign(coords.gather(0, pivot[None]))[0]
    coords = coords * torch.where(signs == 0, torch.ones_like(signs), signs)
    return coords, vals


def centroid_mds(centroids: torch.Tensor, n_components: int = 2) -> torch.Tensor:
    """(K, D) class centroids -> (K, n_components) MDS coordinates of their Euclidean distances."""
    c = _templates64(centroids)
    return classical_mds(torch.cdist(c, c), n_components)[0]
