"""I(a; â) over a whole embedded dataset: recover every attribute, let labels stand in as ground truth, rank.

The attributes service runs this as a streaming job, and so may a script: the faces (aligned chips and
their templates) come in already embedded, the decoder and the catalogue as plain callables, and the
result is the ranked :class:`~facexplain.attributes.importance.ImportanceRow` list. Cancellation raises
:class:`~facexplain.attributes.importance.Cancelled`, as the two steps do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from facexplain.attributes import importance as imp
from facexplain.attributes.catalog import AttributeSpec
from facexplain.attributes.recovery import DecodeFn, EstimatesAttributes, recover_dataset

# (stage, done, total): "recovery" counts faces, "importance" counts attributes
StageProgress = Callable[[str, int, int], None]


def recover_values(
    decode: DecodeFn, catalog: EstimatesAttributes, templates: torch.Tensor, names: Sequence[str], batch_size: int
) -> dict[str, np.ndarray]:
    """Attributes measured on the faces decoded from ``templates``, in batches: {name: (N, dim)}."""
    parts: list[dict[str, np.ndarray]] = []
    for s in range(0, templates.shape[0], batch_size):
        parts.append(catalog.estimate(decode(templates[s : s + batch_size]), names))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def dataset_importance(
    chips: torch.Tensor,
    templates: torch.Tensor,
    labels: Sequence[Mapping[str, float]],
    decode: DecodeFn,
    catalog: EstimatesAttributes,
    specs: Sequence[AttributeSpec],
    *,
    estimator: str,
    k: int,
    n_bootstrap: int,
    ci_level: float,
    seed: int,
    shuffled_control: bool,
    n_permutations: int,
    batch_size: int,
    progress: StageProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[imp.ImportanceRow]:
    """Recover each spec's attribute on the original chips and on the decoded templates, then rank by MI.

    A caller's label named like a scalar attribute replaces the measured a(x) of that face: it is the
    ground truth the recovered value is compared with.
    """

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else lambda done, total: progress(name, done, total)

    original, recovered = recover_dataset(
        chips,
        templates,
        decode,
        catalog,
        [s.name for s in specs],
        batch_size=batch_size,
        progress=stage("recovery"),
        should_stop=should_stop,
    )
    for s in specs:
        if s.dim != 1:
            continue
        for i, face_labels in enumerate(labels):
            if s.name in face_labels:
                original[s.name][i, 0] = float(face_labels[s.name])
    return imp.importance_table(
        original,
        recovered,
        specs,
        estimator=estimator,
        k=k,
        n_bootstrap=n_bootstrap,
        ci_level=ci_level,
        seed=seed,
        shuffled_control=shuffled_control,
        n_permutations=n_permutations,
        progress=stage("importance"),
        should_stop=should_stop,
    )
