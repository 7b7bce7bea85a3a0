"""Everything a probe training run depends on, in one flat dataclass that MLflow logs as parameters.

Defaults are the full recipe (every default label on the CelebA subset); ``--preset small`` caps the
images for a quick run. Lists (labels, feature blocks, the L2 grid) are comma-separated strings so
they stay one flag and one MLflow parameter each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from facexplain.artifacts.probes import DEFAULT_PROBES_MODEL

# Kept literal here (not imported from facexplain.attributes.accessory) so the CLI parser is built
# without importing torch; tests/unit/test_accessory_probes.py checks they agree.
DEFAULT_LABELS = (
    "Eyeglasses,Wearing_Hat,Smiling,Mouth_Slightly_Open,Mustache,No_Beard,Bangs,Wearing_Lipstick,Heavy_Makeup"
)
DEFAULT_BLOCKS = "expression:face,expression:eyes,landmarks:face"
DEFAULT_C_GRID = "0.0003,0.001,0.003,0.01,0.03"


def _split(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


@dataclass(frozen=True)
class TrainProbesConfig:
    data: str = "../shared/data/celeba_subset"
    labels: str = DEFAULT_LABELS  # CelebA label names, comma-separated
    max_images: int = 0  # 0 = all; else a label-stratified, hash-ordered sample of this many
    faceset: str = ""  # a cached face set .npz of `data` (e.g. the one decoder training built) instead of building
    features: str = DEFAULT_BLOCKS  # feature blocks <net>:<crop>, comma-separated
    # degraded copies of every training chip (64 px, random blur), to read decoded faces too
    degraded_copies: int = 1
    degrade_size: int = 64
    blur_sigma_max: float = 1.5
    eval_sigma: float = 1.0  # blur of the degraded test figures
    flip: bool = False  # also train on mirrored chips (one more feature pass)
    # identity-disjoint splits (hash-based): test identities, then validation identities among the rest
    test_fraction: float = 0.2
    val_fraction: float = 0.25
    split_seed: int = 1
    # drop the sealed identities (facexplain.data.splits.sealed_identities) before the split: on for the
    # models the project ships, which must never see the identities of the held-out evaluation
    exclude_sealed: bool = False
    seed: int = 0
    c_grid: str = DEFAULT_C_GRID  # inverse L2 strengths tried per label
    batch_size: int = 64
    device: str = "auto"
    threads: int = 0
    register_as: str = DEFAULT_PROBES_MODEL
    alias: str = "auto"  # champion when the model has none yet, challenger otherwise; "" = none

    def __post_init__(self) -> None:
        if not _split(self.labels):
            raise ValueError("at least one label is needed")
        if self.max_images < 0 or self.degraded_copies < 0 or self.degrade_size < 16:
            raise ValueError("max_images >= 0, degraded_copies >= 0 and degrade_size >= 16 are required")
        if not 0 < self.test_fraction < 1 or not 0 < self.val_fraction < 1:
            raise ValueError("test_fraction and val_fraction must lie in (0, 1)")
        if not self.c_grid_values or any(c <= 0 for c in self.c_grid_values):
            raise ValueError(f"c_grid must list positive numbers, got {self.c_grid!r}")

    @property
    def label_list(self) -> tuple[str, ...]:
        return _split(self.labels)

    @property
    def block_list(self) -> tuple[str, ...]:
        return _split(self.features)

    @property
    def c_grid_values(self) -> tuple[float, ...]:
        try:
            return tuple(float(c) for c in _split(self.c_grid))
        except ValueError:
            raise ValueError(f"c_grid must list numbers, got {self.c_grid!r}") from None

    def to_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainProbesConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {unknown}")
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    "celeba": {},
    "small": {"max_images": 600},
    # the shipped probes (issue 21): every default label, without the sealed identities
    "celeba-ship": {"exclude_sealed": True},
}
