"""The sealed identities: the rule, its committed list for the CelebA subset, and the training-side filter."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from facexplain.data.splits import (
    read_identity_list,
    recipe_evaluation_identities,
    sealed_fraction,
    sealed_identities,
    split_identities,
    without_sealed,
)
from tests.conftest import REPO

SEALED_LIST = REPO / "data" / "splits" / "celeba-sealed.txt"


def _celeba_identities(celeba_dir: Path) -> list[str]:
    with (celeba_dir / "labels.csv").open(newline="") as f:
        return [row["identity"] for row in csv.DictReader(f)]


def test_committed_list_is_the_rule_on_the_celeba_labels(celeba_dir: Path) -> None:
    identities = _celeba_identities(celeba_dir)
    sealed = sealed_identities(identities)
    assert len(set(identities)) == 251 and len(sealed) == 28
    assert sorted(read_identity_list(SEALED_LIST)) == sorted(sealed)


def test_rule_is_deterministic_and_order_free() -> None:
    ids = [f"id{k}" for k in range(200)]
    assert sealed_identities(ids) == sealed_identities(reversed(ids + ids))
    assert 10 <= len(sealed_identities(ids)) <= 30
    # per identity: a subset of the identities has the subset of the sealed set
    assert sealed_identities(ids[:50]) == sealed_identities(ids) & set(ids[:50])
    assert sealed_identities(ids, salt="other") != sealed_identities(ids)
    assert sealed_identities(ids, fraction=0.0) == set()
    with pytest.raises(ValueError):
        sealed_identities(ids, fraction=1.0)
    assert all(0 <= sealed_fraction(i) < 1 for i in ids)


def test_sealed_set_is_not_a_split_side() -> None:
    """A different hash from split_identities': the sealed identities fall on every side of a split."""
    ids = [str(k) for k in range(1000)]
    sealed = sealed_identities(ids)
    side = split_identities(ids, test_fraction=0.2, val_fraction=0.1, seed=0)
    sides = {side[i] for i in sealed}
    assert sides == {"train", "val", "test"}


def test_without_sealed_keeps_order_and_drops_every_face_of_a_sealed_identity() -> None:
    faces = [f"p{k % 60}" for k in range(300)]  # 60 identities, 5 faces each
    sealed = sealed_identities(faces)
    keep = without_sealed(faces)
    assert keep == sorted(keep)
    assert {faces[k] for k in keep} == set(faces) - sealed
    assert len(keep) == len(faces) - 5 * len(sealed)
    assert without_sealed(faces, sealed=[]) == list(range(len(faces)))


def test_read_identity_list_skips_comments(tmp_path: Path) -> None:
    p = tmp_path / "ids.txt"
    p.write_text("# header\n\n12\n34  # note\n")
    assert read_identity_list(p) == ["12", "34"]


def test_strict_held_out_identities_leave_out_those_that_judged_recipes(celeba_dir: Path) -> None:
    """5 of the 28 sealed identities sat on the test / validation side of the seed-0 split that chose the
    recipes before the seal: the strict held-out figures use the other 23."""
    identities = _celeba_identities(celeba_dir)
    chose = recipe_evaluation_identities(identities)
    side = split_identities(identities, test_fraction=0.2, val_fraction=0.1, seed=0)
    assert chose == {i for i, s in side.items() if s in ("test", "val")}
    sealed = set(read_identity_list(SEALED_LIST))
    assert sorted(chose & sealed) == ["7307", "7339", "7393", "7412", "7465"]


def test_fitting_sample_is_disjoint_from_every_evaluation_identity(celeba_dir: Path) -> None:
    """Front-end constants are fitted on training-side, unsealed identities: none of the held-apart sample's
    (the pair-AUC gate), of the recipe-evaluation sides or of the sealed set, and none excluded by name."""
    from facexplain.data.faces import celeba_records
    from facexplain.data.splits import fitting_sample, held_apart_sample

    records = celeba_records(celeba_dir)
    identities = [r.identity for r in records]
    excluded = {identities[0], identities[1]}
    paths, labels = fitting_sample(records, n_identities=60, per_identity=6, exclude=excluded)
    _, held = held_apart_sample(records, n_identities=40, per_identity=6)
    chosen = set(labels)
    assert len(chosen) == 60 and len(paths) == len(labels) and labels == sorted(labels)
    evaluation = set(held) | recipe_evaluation_identities(identities) | sealed_identities(identities)
    assert not chosen & (evaluation | excluded)
    by_id = {i: sorted(r.path for r in records if r.identity == i) for i in chosen}
    assert all(ps == by_id[i][:6] for i, ps in _group(paths, labels).items())
    # the rule is the same on every run, and a larger sample extends a smaller one
    more, more_labels = fitting_sample(records, n_identities=70, per_identity=6, exclude=excluded)
    assert more[: len(paths)] == paths and set(more_labels) > chosen


def _group(paths: list[Path], labels: list[str]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p, i in zip(paths, labels, strict=True):
        out.setdefault(i, []).append(p)
    return out
