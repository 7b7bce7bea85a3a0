"""dataset_importance on a toy decoder and catalogue: labels override a(x), stages report, seeds repeat."""

from __future__ import annotations

import numpy as np
import torch

from facexplain.attributes.catalog import AttributeSpec
from facexplain.attributes.dataset_importance import dataset_importance, recover_values

SPECS = [AttributeSpec(name=c, group="colour", unit="", components=(c,), description="") for c in "rgb"]  # type: ignore[arg-type]
_W = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))


def _decode(t: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(t @ _W)[:, :, None, None].expand(-1, 3, 8, 8)


class _MeanColour:
    def estimate(self, images: torch.Tensor, names: list[str] = ()) -> dict[str, np.ndarray]:  # type: ignore[assignment]
        return {c: images[:, i].mean(dim=(1, 2)).numpy() for i, c in enumerate("rgb")}


def test_dataset_importance_repeats_and_reports_stages() -> None:
    gen = torch.Generator().manual_seed(1)
    templates = torch.randn(30, 4, generator=gen)
    chips = (_decode(templates) * 255).round().to(torch.uint8)
    labels = [{"r": float(i % 2)} for i in range(30)]
    stages: list[str] = []

    def run() -> list[tuple[str, float]]:
        rows = dataset_importance(
            chips,
            templates,
            labels,
            _decode,
            _MeanColour(),
            SPECS,
            estimator="knn",
            k=3,
            n_bootstrap=5,
            ci_level=0.9,
            seed=7,
            shuffled_control=True,
            n_permutations=5,
            batch_size=8,
            progress=lambda stage, done, total: stages.append(stage),
        )
        return [(r.attribute, r.mi) for r in rows]

    first = run()
    assert first == run()
    assert sorted(a for a, _ in first) == ["b", "g", "r"]
    assert {"recovery", "importance"} <= set(stages)


def test_recover_values_batches_like_one_pass() -> None:
    templates = torch.randn(7, 4, generator=torch.Generator().manual_seed(3))
    a = recover_values(_decode, _MeanColour(), templates, [], batch_size=3)
    b = recover_values(_decode, _MeanColour(), templates, [], batch_size=7)
    assert set(a) == {"r", "g", "b"} and all(np.allclose(a[k], b[k]) for k in a)
    assert recover_values(_decode, _MeanColour(), templates[:0], [], batch_size=3) == {}
