"""Identity-disjoint splits that are the same on every machine.

An identity's side is decided by a hash of (seed, identity), not by a shuffle of the current list,
so adding images or identities never moves an existing identity from test to train.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


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
