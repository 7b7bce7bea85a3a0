"""Mirror invariance on constructed templates: the comparison with same- and other-person pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facexplain.metrics.invariance import mirror_cosines, mirror_invariance


def test_mirror_invariance_against_pairs() -> None:
    rng = np.random.default_rng(0)
    people = rng.standard_normal((3, 16))
    ids = ["a", "a", "b", "b", "c"]
    own = np.stack([people["abc".index(i)] + 0.3 * rng.standard_normal(16) for i in ids])
    invariant = own + 0.01 * rng.standard_normal(own.shape)  # the mirror barely moves the template
    m = mirror_invariance(own, invariant, ids)
    assert (m.n_faces, m.same_person_pairs, m.other_person_pairs) == (5, 2, 8)
    assert m.mirror_cosine_min > 0.99 and m.keeps_no_side
    assert m.same_person_cosine_mean > m.other_person_cosine_mean
    np.testing.assert_allclose(mirror_cosines(own, invariant).min(), m.mirror_cosine_min)
    # a model that tells a face from its mirror
    sided = mirror_invariance(own, rng.standard_normal(own.shape), ids)
    assert not sided.keeps_no_side
    # no two photos of one person: the comparison is undefined
    alone = mirror_invariance(own[[0, 2, 4]], invariant[[0, 2, 4]], ["a", "b", "c"])
    assert alone.same_person_pairs == 0 and math.isnan(alone.same_person_cosine_mean)
    with pytest.raises(ValueError, match="identities"):
        mirror_invariance(own, invariant, ids[:3])
    with pytest.raises(ValueError, match="differ"):
        mirror_cosines(own, invariant[:2])
