"""exclude_sealed: the three pipelines' data steps drop the sealed identities before their splits, and
leave the split of every other identity as it was (identity strings and empty tensors, no images)."""

from __future__ import annotations

import dataclasses

import torch

from facexplain.attributes.probe import identity_split
from facexplain.data.faceset import FaceSet, drop_sealed
from facexplain.data.splits import sealed_identities, split_identities
from training.decoder.config import PRESETS, TrainDecoderConfig
from training.decoder.data import face_sides
from training.probes.config import TrainProbesConfig
from training.sadfad.config import TrainSADFADConfig


def _faces(n_identities: int = 120, per_identity: int = 3) -> FaceSet:
    ids = [str(7000 + k // per_identity) for k in range(n_identities * per_identity)]
    n = len(ids)
    return FaceSet(
        paths=[f"{k:06d}.jpg" for k in range(n)],
        identities=ids,
        templates=torch.zeros(n, 4),
        chips=torch.zeros(n, 3, 1, 1, dtype=torch.uint8),
        landmarks=torch.zeros(n, 68, 2),
        failed=[("x.jpg", "no face")],
    )


def test_flag_is_off_by_default_and_on_in_the_ship_preset() -> None:
    for cls in (TrainDecoderConfig, TrainSADFADConfig, TrainProbesConfig):
        assert {f.name: f.default for f in dataclasses.fields(cls)}["exclude_sealed"] is False
    # the shipped decoder: the celeba-cpu recipe, longer, with the seal
    ship = PRESETS["celeba-cpu-ship"]
    assert ship == {**PRESETS["celeba-cpu"], "exclude_sealed": True, "epochs": 12, "lr_decay": 0.5}
    assert "exclude_sealed" not in PRESETS["celeba-cpu"]
    assert PRESETS["sadfad-cpu-ship"]["exclude_sealed"] is True
    from training.probes.config import PRESETS as PROBE_PRESETS
    from training.sadfad.config import PRESETS as SADFAD_PRESETS

    assert SADFAD_PRESETS["cpu-ship"] == {**SADFAD_PRESETS["cpu"], "exclude_sealed": True}
    assert PROBE_PRESETS["celeba-ship"] == {"exclude_sealed": True}


def test_drop_sealed_keeps_order_failures_and_counts_identities() -> None:
    faces = _faces()
    sealed = sealed_identities(faces.identities)
    assert sealed  # the test means something
    kept, dropped = drop_sealed(faces)
    assert dropped == len(sealed)
    assert not sealed & set(kept.identities)
    assert kept.paths == [p for p, i in zip(faces.paths, faces.identities, strict=True) if i not in sealed]
    assert kept.failed == faces.failed


def test_no_sealed_identity_reaches_any_split_and_the_others_do_not_move() -> None:
    faces = _faces()
    sealed = sealed_identities(faces.identities)
    kept, _ = drop_sealed(faces)
    # decoder (and SAD/FAD, which splits with split_identities the same way)
    before = dict(zip(faces.identities, face_sides(faces, test_fraction=0.2, val_fraction=0.1, seed=0), strict=True))
    after = dict(zip(kept.identities, face_sides(kept, test_fraction=0.2, val_fraction=0.1, seed=0), strict=True))
    assert not sealed & set(after)
    assert {side for side in after.values()} == {"train", "val", "test"}
    assert after == {i: s for i, s in before.items() if i not in sealed}
    side = split_identities(kept.identities, test_fraction=0.2, val_fraction=0.1, seed=0)
    assert not sealed & set(side)
    # probes
    train_idx, test_idx = identity_split(kept.identities, 0.2, 1)
    assert not sealed & {kept.identities[k] for k in [*train_idx, *test_idx]}
    assert len(train_idx) + len(test_idx) == len(kept)
