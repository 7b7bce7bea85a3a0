"""Identity-disjoint splits that are the same on every machine.

An identity's side is decided by a hash of (seed, identity), not by a shuffle of the current list,
so adding images or identities never moves an existing identity from test to train.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol


class _Labelled(Protocol):
    @property
    def path(self) -> Path: ...

    @property
    def identity(self) -> str: ...


def identity_fraction(identity: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for an identity."""
    digest = hashlib.sha256(f"{seed}:{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_identities(
    identities: Iterable[str], test_fraction: float = 0.2, val_fraction: float = 0.0, seed: int = 0
) -> dict[str, str]:
    """Map each identity to ``train``, ``val`` or ``test``."""
    if not 0 <= test_fraction + val_fraction < 1:
        raise ValueError("test_fraction + val_fraction must lie in [0, 1)")
    out: dict[str, str] = {}
    for ident in sorted(set(identities)):
        u = identity_fraction(ident, seed)
        out[ident] = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
    return out


def held_apart_sample(
    records: Iterable[_Labelled],
    n_identities: int = 40,
    per_identity: int = 6,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[Path], list[str]]:
    """Images of identities on the test side of the split: the first ``n_identities`` (sorted), each
    with its first ``per_identity`` images (sorted). Verification figures quoted as "held-apart
    identities" are measured on this sample; -> (paths, identity of each path)."""
    records = list(records)
    split = split_identities((r.identity for r in records), test_fraction=test_fraction, seed=seed)
    by_id: dict[str, list[Path]] = defaultdict(list)
    for r in records:
        if split[r.identity] == "test":
            by_id[r.identity].append(r.path)
    chosen = {i: sorted(by_id[i])[:per_identity] for i in sorted(by_id)[:n_identities]}
    return [p for ps in chosen.values() for p in ps], [i for i, ps in chosen.items() for _ in ps]


# -- the sealed identities -----------------------------------------------------------------------------
# Identities kept out of the whole development of the shipped models: no shipped model trains on,
# validates on or is chosen (epoch, recipe) with them; their only use is the held-out evaluation of a
# shipped model through the running service (bench/bench_decoder.py heldout). The rule hashes each
# identity with its own salt, unrelated to the seeded hash of ``split_identities``, so the sealed set is
# no function of any train/val/test split; changing the salt or the fraction changes the set and voids
# every figure measured on it. The CelebA subset's set is committed in data/splits/celeba-sealed.txt
# (a unit test recomputes it from the labels).
SEALED_SALT = "facexplain-sealed-v1"
SEALED_FRACTION = 0.1


def sealed_fraction(identity: str, salt: str = SEALED_SALT) -> float:
    """A stable pseudo-random number in [0, 1) for an identity, from the sealed set's own salted hash."""
    digest = hashlib.sha256(f"{salt}|{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sealed_identities(
    identities: Iterable[str], fraction: float = SEALED_FRACTION, salt: str = SEALED_SALT
) -> set[str]:
    """The identities whose salted hash (:func:`sealed_fraction`) falls below ``fraction``: about that
    share of any identity list (28 of the CelebA subset's 251).

    A per-identity threshold, not a count: whether an identity is sealed depends on its name alone, never
    on which other identities are present, so the set is the same whether it is computed from the labels,
    from the faces a detector found, or from a sample of them.
    """
    if not 0 <= fraction < 1:
        raise ValueError("fraction must lie in [0, 1)")
    return {i for i in set(identities) if sealed_fraction(i, salt) < fraction}


def without_sealed(identities: Iterable[str], sealed: Iterable[str] | None = None) -> list[int]:
    """Indices of the items of ``identities`` (one identity per face, say) that are not sealed: the faces
    a shipped model may be trained, validated and chosen on. ``sealed`` defaults to the rule
    (:func:`sealed_identities`)."""
    identities = list(identities)
    drop = sealed_identities(identities) if sealed is None else set(sealed)
    return [k for k, ident in enumerate(identities) if ident not in drop]


def recipe_evaluation_identities(identities: Iterable[str]) -> set[str]:
    """The identities on the test or validation side of the seed-0 split (test 0.2, validation 0.1) of
    ``identities``: every recipe, epoch and threshold chosen before the seal was judged on these, so a
    sealed identity among them is held out from the shipped models but not from the choices behind them.
    The strict held-out figures leave them out (bench/bench_decoder.py heldout reports both)."""
    side = split_identities(identities, test_fraction=0.2, val_fraction=0.1, seed=0)
    return {i for i, s in side.items() if s != "train"}


def fitting_sample(
    records: Iterable[_Labelled],
    n_identities: int = 60,
    per_identity: int = 6,
    exclude: Iterable[str] = (),
) -> tuple[list[Path], list[str]]:
    """Images to fit a front-end constant on: identities on the training side of the seed-0 split (neither
    :func:`recipe_evaluation_identities`, so none of :func:`held_apart_sample`'s) and not sealed, less
    ``exclude`` (e.g. the identities of the faces a test checks); the first ``n_identities`` (sorted), each
    with its first ``per_identity`` images (sorted). -> (paths, identity of each path)."""
    records = list(records)
    names = {r.identity for r in records}
    dropped = recipe_evaluation_identities(names) | sealed_identities(names) | set(exclude)
    by_id: dict[str, list[Path]] = defaultdict(list)
    for r in records:
        if r.identity not in dropped:
            by_id[r.identity].append(r.path)
    chosen = {i: sorted(by_id[i])[:per_identity] for i in sorted(by_id)[:n_identities]}
    return [p for ps in chosen.values() for p in ps], [i for i, ps in chosen.items() for _ in ps]


def read_identity_list(path: Path) -> list[str]:
    """An identity list file (data/splits/*.txt): one identity a line, ``#`` comments and blank lines skipped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]
