"""Two-stage attribute recovery over a data set, and attribute differences between two faces.

Ren et al. recover attributes in two stages: template -> decoded face (the FR model's registered
decoder) -> the same image-based estimators that measure the original face. This module is the loop
only, generic over callables, so the service, the CLI and the tests adapt it rather than repeat it:
whatever decodes templates and whatever catalogue estimates attributes are passed in.

What stands in for Ren et al.'s generator. The paper decodes through a pretrained image generator:
a latent-space transformer maps the template into the generator's latent space (its eq. 5-11) and the
generator renders the face. This project has no such generator (no package registry ships one whose
weights we may install), so the FR model's Deep Face Decoder (:mod:`facexplain.models.decoder`,
trained per FR model on the CelebA subset, 64 px) takes its place. The inequality the importance table
rests on is unchanged, because any decoder is a function of z: I(a; â) <= I(a; z) (data processing).
What changes is how tight it is. A generator's face prior renders fine texture, hair and high-frequency
detail at full resolution where the 64-px decoder blurs them, so the bound is looser here for texture
and fine geometry, and no better for attributes the template does not carry (a prior can add detail,
not information about a). ``bench/bench_attributes.py`` measures that slack per attribute: a second
lower bound, I(a; ridge(z)) on held-out identities with the same estimator, exceeds I(a; â) by at
least the information the decoder path leaves out (README, "Attributes").

Both sides are measured the same way on purpose: the landmark net is run by the catalogue on the
original chips *and* on the decoded faces (rather than reusing the chips' stored landmarks for the
originals), so that a and â come from one procedure and differences between them reflect the
template, not a change of landmark source.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from numpy.typing import ArrayLike

from facexplain.attributes.catalog import AttributeSpec
from facexplain.attributes.importance import Cancelled, ProgressFn, StopFn

DecodeFn = Callable[[torch.Tensor], torch.Tensor]


class EstimatesAttributes(Protocol):
    """What the loop needs of an :class:`~facexplain.attributes.catalog.AttributeCatalog`."""

    def estimate(
        self, images: torch.Tensor, names: Sequence[str] = (), landmarks: torch.Tensor | None = None
    ) -> dict[str, np.ndarray]: ...


def _chips_to_unit(chips: torch.Tensor, chip_max: float) -> torch.Tensor:
    """Chips (uint8, or float in [0, chip_max]) -> float32 in [0, 1], as every estimator reads them."""
    if chips.dtype == torch.uint8:
        return chips.float() / 255.0
    x = chips.float() / chip_max
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(
            f"float chips must be in [0, {chip_max:g}] (chip_max), got values in [{lo * chip_max:g}, {hi * chip_max:g}]"
        )
    return x.clamp(0.0, 1.0)


def recover_dataset(
    chips: torch.Tensor,
    templates: torch.Tensor,
    decode: DecodeFn,
    catalog: EstimatesAttributes,
    names: Sequence[str] = (),
    batch_size: int = 64,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    *,
    chip_max: float = 255.0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Attributes of every face on its original chip and on the face decoded from its template.

    ``chips`` (N, 3, S, S) aligned chips: uint8, or float in [0, ``chip_max``] (255 like
    ``FaceSet.chips``; pass 1 for [0, 1] images); ``templates`` (N, D), row i of chip i. ``decode``
    maps a (B, D) batch of templates to (B, 3, S', S') faces in [0, 1] (any S'; out-of-range values
    are clamped); it runs under ``torch.no_grad``. ``catalog.estimate(images, names)`` measures both.
    Returns ``(original, recovered)``, each {name: (N, dim) float64}, in the catalogue's name order.

    ``progress(done, total)`` counts faces after each batch; ``should_stop()`` is polled before each
    batch and raises :class:`~facexplain.attributes.importance.Cancelled`.
    """
    if chips.dim() != 4 or chips.shape[1] != 3 or chips.shape[2] != chips.shape[3]:
        raise ValueError(f"expected (N, 3, S, S) chips, got {tuple(chips.shape)}")
    if templates.dim() != 2:
        raise ValueError(f"expected (N, D) templates, got {tuple(templates.shape)}")
    n = chips.shape[0]
    if templates.shape[0] != n:
        raise ValueError(f"{n} chips but {templates.shape[0]} templates: they must be the same faces")
    if n == 0:
        raise ValueError("empty data set: no faces to recover attributes from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not chip_max > 0:
        raise ValueError(f"chip_max must be positive, got {chip_max}")

    stop = should_stop or (lambda: False)
    parts_a: dict[str, list[np.ndarray]] = {}
    parts_b: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        if stop():
            raise Cancelled(start, n, "faces")
        stop_at = min(start + batch_size, n)
        images = _chips_to_unit(chips[start:stop_at], chip_max)
        with torch.no_grad():
            decoded = decode(templates[start:stop_at])
        b = stop_at - start
        if decoded.dim() != 4 or decoded.shape[0] != b or decoded.shape[1] != 3 or decoded.shape[2] != decoded.shape[3]:
            raise ValueError(f"decode returned {tuple(decoded.shape)} for {b} templates; expected ({b}, 3, S, S)")
        decoded = decoded.detach().float().clamp(0.0, 1.0)
        for parts, values in ((parts_a, catalog.estimate(images, names)), (parts_b, catalog.estimate(decoded, names))):
            for name, v in values.items():
                parts.setdefault(name, []).append(np.asarray(v, dtype=np.float64).reshape(b, -1))
        if progress is not None:
            progress(stop_at, n)
    original = {name: np.concatenate(p) for name, p in parts_a.items()}
    recovered = {name: np.concatenate(p) for name, p in parts_b.items()}
    return original, recovered


# --------------------------------------------------------------------------------------------------
# DiffAttributes


@dataclass(frozen=True)
class AttributeDelta:
    """How one attribute differs between faces a and b (the API's ``AttributeDiff``).

    ``delta`` is b − a per component; ``magnitude`` its Euclidean norm in ``unit``; ``standardized``
    the magnitude over the attribute's reference scale (0 when none is known, as in the API; NaN
    when a or b could not be estimated).
    """

    attribute: str
    group: str
    unit: str
    a: tuple[float, ...]
    b: tuple[float, ...]
    delta: tuple[float, ...]
    magnitude: float
    standardized: float


def reference_scales(values: Mapping[str, ArrayLike]) -> dict[str, float]:
    """{name: (N, d) values over reference faces} -> the scale that ``standardized`` divides by.

    sqrt of the summed per-component variances (NaN rows ignored): for a scalar it is the standard
    deviation; for a vector it is the RMS distance of a face from the mean, so a magnitude of 1
    scale is "as different as a typical face is from the average" whatever the dimension.
    """
    out: dict[str, float] = {}
    for name, v in values.items():
        arr = np.asarray(v, dtype=np.float64)
        arr = arr.reshape(arr.shape[0], -1)
        arr = arr[~np.isnan(arr).any(axis=1)]
        out[name] = float(np.sqrt(arr.var(axis=0, ddof=1).sum())) if arr.shape[0] > 1 else math.nan
    return out


def _one_face(values: Mapping[str, ArrayLike], name: str, label: str, dim: int) -> np.ndarray:
    if name not in values:
        raise ValueError(f"attribute {name!r} is missing from the values of face {label}")
    v = np.asarray(values[name], dtype=np.float64)
    if v.size != dim or (v.ndim == 2 and v.shape[0] != 1) or v.ndim > 2:
        raise ValueError(f"face {label}: {name!r} must be ({dim},) or (1, {dim}) values, got shape {v.shape}")
    return v.reshape(dim)


def attribute_deltas(
    a_values: Mapping[str, ArrayLike],
    b_values: Mapping[str, ArrayLike],
    specs: Sequence[AttributeSpec],
    reference_std: Mapping[str, float] | None = None,
) -> list[AttributeDelta]:
    """Per-attribute difference b − a for one pair of faces, largest first.

    Attributes have different units, so raw magnitudes only rank within one attribute; rows are
    sorted by ``standardized`` (unit-free; ``reference_std`` as from :func:`reference_scales` over the
    server's reference faces) and then by magnitude, which is the only order left when no reference
    scale is known. Rows that could not be estimated (NaN) go last.
    """
    ref = reference_std or {}
    rows: list[AttributeDelta] = []
    for spec in specs:
        a = _one_face(a_values, spec.name, "a", spec.dim)
        b = _one_face(b_values, spec.name, "b", spec.dim)
        delta = b - a
        mag = float(np.linalg.norm(delta))
        scale = ref.get(spec.name, math.nan)
        if math.isnan(mag):
            std = math.nan
        elif scale > 0 and math.isfinite(scale):
            std = mag / scale
        else:
            std = 0.0
        rows.append(
            AttributeDelta(
                attribute=spec.name,
                group=spec.group,
                unit=spec.unit,
                a=tuple(float(x) for x in a),
                b=tuple(float(x) for x in b),
                delta=tuple(float(x) for x in delta),
                magnitude=mag,
                standardized=std,
            )
        )

    def key(r: AttributeDelta) -> tuple[bool, float, float]:
        if math.isnan(r.magnitude):
            return (True, 0.0, 0.0)
        return (False, -r.standardized, -r.magnitude)

    return sorted(rows, key=key)
