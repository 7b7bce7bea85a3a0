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
