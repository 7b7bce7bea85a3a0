"""Removing a label direction from templates, and what the privacy validation reads from it."""

from __future__ import annotations

import math

import pytest
import torch

from facexplain.directions.suppress import remove_direction
from facexplain.metrics.privacy import attribute_auc, identity_halves, privacy_validation, verification
from facexplain.metrics.verification import VerificationRule

COSINE = VerificationRule("cosine", 0.5, False, "test")


def test_removed_direction_is_gone_and_norms_are_kept() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(20, 16, generator=g) * 1.5
    d = torch.randn(16, generator=g)
    out = remove_direction(t, d)
    u = d / d.norm()
    assert float((out @ u).abs().max()) < 1e-5
    assert torch.allclose(out.norm(dim=1), t.norm(dim=1), atol=1e-5)
    # without renormalisation it is the plain projection
    plain = remove_direction(t, d, renormalize=False)
    assert torch.allclose(plain, t - (t @ u)[:, None] * u, atol=1e-5)
    # one template in, one out; a template along the direction has nothing left
    assert remove_direction(t[0], d).shape == (16,)
    assert float(remove_direction(u[None] * 3, d).abs().max()) == 0.0


def test_bad_directions_are_refused() -> None:
    t = torch.ones(3, 4)
    with pytest.raises(ValueError):
        remove_direction(t, torch.zeros(4))
    with pytest.raises(ValueError):
        remove_direction(t, torch.ones(5))
    with pytest.raises(ValueError):
        remove_direction(t, torch.tensor([1.0, float("nan"), 0.0, 0.0]))


def _faces(seed: int = 0) -> tuple[torch.Tensor, list[str], list[float], torch.Tensor]:
    """Identities in 32-d, a binary attribute written only along axis 0 (plus identity noise)."""
    g = torch.Generator().manual_seed(seed)
    ids, per = 16, 4
    centres = torch.nn.functional.normalize(torch.randn(ids, 32, generator=g), dim=1) * 2
    x = centres.repeat_interleave(per, 0) + 0.2 * torch.randn(ids * per, 32, generator=g)
    y = (torch.rand(ids * per, generator=g) > 0.5).float()
    x[:, 0] += 1.5 * (y - 0.5)
    names = [f"id{i}" for i in range(ids) for _ in range(per)]
    axis = torch.zeros(32)
    axis[0] = 1.0
    return x, names, y.tolist(), axis


def test_removing_the_attribute_axis_suppresses_it_and_keeps_verification() -> None:
    x, names, y, axis = _faces()
    after = remove_direction(x, axis)
    r = privacy_validation(x, after, y, names, COSINE, seed=3)
    assert r.probe_r2_before > 0.5  # the attribute was linearly readable
    assert r.probe_r2_refit < 0.1 and r.probe_r2_fixed < 0.1  # and is not after
    assert r.verification_after.auc > 0.95 and r.verification_before.auc > 0.95
    assert 0.5 < r.cosine_to_original_mean < 1.0
    assert r.faces == 64 and r.identities == 16
    # removing an unrelated axis leaves the attribute readable
    other = torch.zeros(32)
    other[5] = 1.0
    assert privacy_validation(x, remove_direction(x, other), y, names, COSINE, seed=3).probe_r2_refit > 0.5


def test_verification_and_helpers() -> None:
    x, names, _, _ = _faces()
    v = verification(x, names, COSINE)
    assert v.genuine_pairs == 16 * 6 and v.impostor_pairs == 64 * 63 // 2 - 96
    with pytest.raises(ValueError):
        verification(x[:4], names[:4], COSINE)  # one identity: no impostor pair
    a, b = identity_halves(names, seed=1)
    assert len(a) + len(b) == 64 and not {names[i] for i in a} & {names[i] for i in b}
    assert attribute_auc([0.9, 0.8, 0.1, float("nan")], [1, 1, 0, 1]) == 1.0
    assert math.isnan(attribute_auc([0.1, 0.2], [1, 1]))


def test_probe_auc_reads_a_binary_attribute_and_loses_it_with_its_axis() -> None:
    x, names, y, axis = _faces()
    r = privacy_validation(x, remove_direction(x, axis), y, names, COSINE, seed=3)
    assert r.probe_auc_before > 0.9
    assert r.probe_auc_fixed < 0.7 and r.probe_auc_refit < 0.7
    # a numeric (non-binary) attribute has R² but no AUC
    numeric = [v * 2.5 for v in y]
    assert math.isnan(privacy_validation(x, x, numeric, names, COSINE, seed=3).probe_auc_before)
