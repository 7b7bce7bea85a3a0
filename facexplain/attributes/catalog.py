"""The attribute catalogue: every attribute facexplain can estimate on a face image, and one call to estimate them.

Attribute recovery (Ren et al.) measures the *same* attributes on an original aligned face and on the
face decoded from its template, so every estimator here reads pixels in the aligned frame (150-px chips
or 64-px decoded faces alike) plus the 68 landmarks found on those pixels, never a template. An
estimator is a small object that names the attributes it produces (:class:`AttributeSpec`) and maps a
:class:`FaceBatch` to one ``(N, k)`` float64 array per attribute; NaN marks a face where an attribute
could not be estimated (e.g. a pose fit that did not converge). The catalogue holds the estimators,
resolves names (with an error that lists the known ones) and computes the landmarks once per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

Group = Literal["geometry", "pose", "colour", "age", "gender", "expression", "accessory", "texture"]
GROUPS: tuple[Group, ...] = ("geometry", "pose", "colour", "age", "gender", "expression", "accessory", "texture")


@dataclass(frozen=True)
class AttributeSpec:
    """What one attribute is: the API's ``AttributeInfo`` without the model reference."""

    name: str
    group: Group
    unit: str
    components: tuple[str, ...]
    description: str
    discrete: bool = False
    # Key of the model that estimates it ("" when computed directly from pixels/landmarks), e.g.
    # "face-api/age_gender_model" or the registered probe bundle's name; the service turns it into a ModelRef.
    estimator: str = ""

    @property
    def dim(self) -> int:
        return len(self.components)


@dataclass(frozen=True)
class FaceBatch:
    """Faces in the aligned frame, as every estimator reads them.

    ``images``: (N, 3, S, S) float32 in [0, 1] (an aligned chip at any S, or a decoded face);
    ``landmarks``: (N, 68, 2) float32 in the images' pixel coordinates, found on these very pixels
    (for a decoded face: by the landmark net on the decoded face, not the original's).
    """

    images: torch.Tensor
    landmarks: torch.Tensor

    def __post_init__(self) -> None:
        x, lm = self.images, self.landmarks
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
            raise ValueError(f"expected (N, 3, S, S) images, got {tuple(x.shape)}")
        if lm.shape != (x.shape[0], 68, 2):
            raise ValueError(f"expected ({x.shape[0]}, 68, 2) landmarks, got {tuple(lm.shape)}")

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])


class Estimator(Protocol):
    """A group of attributes computed together (one net forward, one landmark fit, ...)."""

    @property
    def specs(self) -> tuple[AttributeSpec, ...]: ...

    def estimate(self, faces: FaceBatch, names: Sequence[str]) -> dict[str, np.ndarray]:
        """``names`` (a subset of ``specs``' names) -> {name: (N, dim) float64, NaN where not estimable}."""
        ...


class UnknownAttributeError(ValueError):
    """A requested attribute name is not in the catalogue; the message lists the known ones."""


class AttributeCatalog:
    """The estimators of one service or run, in a fixed order (the order of every table and response)."""

    def __init__(self, estimators: Iterable[Estimator], landmarker: LandmarkFn | None = None) -> None:
        self._estimators = list(estimators)
        self._landmarker = landmarker
        self._owner: dict[str, Estimator] = {}
        self._specs: dict[str, AttributeSpec] = {}
        for est in self._estimators:
            for spec in est.specs:
                if spec.name in self._specs:
                    raise ValueError(f"attribute {spec.name!r} is produced by two estimators")
                self._specs[spec.name] = spec
                self._owner[spec.name] = est

    @property
    def specs(self) -> list[AttributeSpec]:
        return list(self._specs.values())

    def __iter__(self) -> Iterator[AttributeSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def spec(self, name: str) -> AttributeSpec:
        return self.resolve([name])[0]

    def resolve(self, names: Sequence[str] = ()) -> list[AttributeSpec]:
        """Names -> specs in catalogue order (duplicates dropped); empty = all. Unknown names raise."""
        if not names:
            return self.specs
        unknown = [n for n in names if n not in self._specs]
        if unknown:
            known = ", ".join(self._specs)
            raise UnknownAttributeError(f"unknown attribute(s) {', '.join(map(repr, unknown))}; known: {known}")
        wanted = set(names)
        return [s for s in self._specs.values() if s.name in wanted]

    def landmarks(self, images: torch.Tensor) -> torch.Tensor:
        if self._landmarker is None:
            raise ValueError("this catalogue has no landmark net: pass the landmarks")
        return self._landmarker(images)

    def estimate(
        self, images: torch.Tensor, names: Sequence[str] = (), landmarks: torch.Tensor | None = None
    ) -> dict[str, np.ndarray]:
        """(N, 3, S, S) aligned faces in [0, 1] -> {name: (N, dim) float64} for ``names`` (empty = all).

        Landmarks are found on ``images`` unless given; the dict is in catalogue order.
        """
        specs = self.resolve(names)
        faces = FaceBatch(images.float(), self.landmarks(images) if landmarks is None else landmarks.float())
        by_est: dict[int, list[str]] = {}
        for s in specs:
            by_est.setdefault(id(self._owner[s.name]), []).append(s.name)
        values: dict[str, np.ndarray] = {}
        for est in self._estimators:
            wanted = by_est.get(id(est))
            if wanted:
                values.update(est.estimate(faces, wanted))
        out: dict[str, np.ndarray] = {}
        for s in specs:
            v = np.asarray(values[s.name], dtype=np.float64).reshape(len(faces), s.dim)
            out[s.name] = v
        return out


class LandmarkFn(Protocol):
    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...
