"""SAD/FAD losses on constructed inputs whose answer is known (Yin et al., eq. 1, 2, 4, 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facexplain.losses.sadfad import (
    VARIANTS,
    SADFADLossWeights,
    fad_loss,
    fad_selection,
    filter_orthogonality_loss,
    gaussian_kernel,
    masked_identity_loss,
    response_diversity_loss,
    sadfad_objective,
)


def _orthogonal_filters(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = int(torch.tensor(shape).prod())
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    scales = torch.rand(n, generator=g, dtype=torch.float64) * 5 + 0.1  # eq. 1 normalises each filter
    return (q.T * scales[:, None]).reshape(n, *shape).float()


def test_orthogonal_filters_give_zero_filter_loss() -> None:
    w = _orthogonal_filters(8, (4, 3, 3))
    assert float(filter_orthogonality_loss(w)) == pytest.approx(0.0, abs=1e-5)
    assert float(filter_orthogonality_loss(w, "mean")) == pytest.approx(0.0, abs=1e-6)


def test_identical_filters_give_maximal_filter_loss() -> None:
    n = 6
    w = torch.randn(1, 4, 3, 3).repeat(n, 1, 1, 1) * torch.arange(1, n + 1).view(n, 1, 1, 1)
    assert float(filter_orthogonality_loss(w)) == pytest.approx(n * (n - 1), rel=1e-5)  # ||11^T - I||_F^2
    assert float(filter_orthogonality_loss(w, "mean")) == pytest.approx(1.0, rel=1e-5)
    rnd = torch.randn(n, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    assert 0 < float(filter_orthogonality_loss(rnd)) < n * (n - 1)


def test_filter_loss_is_the_frobenius_norm_of_the_normalised_gram() -> None:
    w = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k = F.normalize(w.reshape(5, -1), dim=1).T  # columns k_i = vec(psi_i) / ||vec(psi_i)||
    expected = torch.linalg.matrix_norm(k.T @ k - torch.eye(5, dtype=torch.float64)) ** 2
    assert float(filter_orthogonality_loss(w)) == pytest.approx(float(expected), rel=1e-9)


def test_response_loss_identical_maps_are_maximal_disjoint_maps_are_zero() -> None:
    n, b = 5, 3
    one = torch.rand(b, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    same = one.repeat(1, n, 1, 1)
    assert float(response_diversity_loss(same)) == pytest.approx(n * (n - 1), rel=1e-5)
    assert float(response_diversity_loss(same, "mean")) == pytest.approx(1.0, rel=1e-5)
    # one peak per filter, 3 px apart: disjoint even after the 3x3 smoothing
    disjoint = torch.zeros(b, n, 12, 12)
    for i in range(n):
        disjoint[:, i, 1 + (i % 3) * 4, 1 + (i // 3) * 4] = 1.0 + i
    assert float(response_diversity_loss(disjoint)) == pytest.approx(0.0, abs=1e-7)
    # adjacent peaks overlap once smoothed: the smoothing is what makes near misses count
    near = torch.zeros(1, 2, 8, 8)
    near[0, 0, 4, 4], near[0, 1, 4, 5] = 1.0, 1.0
    assert float(response_diversity_loss(near)) > 0.1
    assert float(response_diversity_loss(near, sigma=0.0)) == pytest.approx(0.0, abs=1e-7)


def test_gaussian_kernel_matches_the_authors_smoothing() -> None:
    k = gaussian_kernel(3, 1.5)
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(k[1, 1]) == pytest.approx(0.147761, abs=1e-5)
    assert float(k[0, 1]) == pytest.approx(0.118318, abs=1e-5)
    assert float(k[0, 0]) == pytest.approx(0.0947416, abs=1e-5)


def test_identical_clean_and_occluded_features_give_zero_fad() -> None:
    f = torch.randn(4, 10, generator=torch.Generator().manual_seed(4))
    loss, tau = fad_loss(f, f.clone(), keep=8)
    assert float(loss) == 0.0
    assert int(tau.sum()) == 8


def test_fad_keeps_the_t_smallest_mean_differences() -> None:
    clean = torch.zeros(3, 6)
    occluded = clean.clone()
    shift = torch.tensor([0.5, 0.0, 0.3, 0.1, 0.9, 0.2])
    occluded += shift  # mean |f - f^| per element = shift
    occluded[0, 4] -= 1.8  # |0.9 - 1.8| = 0.9 still: element 4 stays the largest
    tau = fad_selection(clean, occluded, keep=4)
    assert tau.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    loss, _ = fad_loss(clean, occluded, keep=4)
    assert float(loss) == pytest.approx(0.0 + 0.3 + 0.1 + 0.2)  # eq. 4: sum over the kept elements
    mean, _ = fad_loss(clean, occluded, keep=4, reduction="mean")
    assert float(mean) == pytest.approx(0.6 / 4)
    with pytest.raises(ValueError, match="t"):
        fad_selection(clean, occluded, keep=7)


def test_fad_gradient_reaches_both_branches_and_tau_is_a_selection() -> None:
    clean = torch.randn(4, 6, requires_grad=True)
    occluded = (clean.detach() + torch.randn(4, 6) * 0.1).requires_grad_(True)
    loss, tau = fad_loss(clean, occluded, keep=3)
    loss.backward()
    assert not tau.requires_grad
    assert clean.grad is not None and occluded.grad is not None
    dropped = tau == 0
    assert float(clean.grad[:, dropped].abs().sum()) == 0.0  # elements outside tau get no FAD gradient
    assert float(clean.grad[:, ~dropped].abs().sum()) > 0.0


@torch.no_grad()
def test_masked_softmax_sees_only_the_kept_elements() -> None:
    head = torch.nn.Linear(6, 3)
    f = torch.randn(4, 6)
    labels = torch.tensor([0, 1, 2, 0])
    tau = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    expected = F.cross_entropy(head(f * tau), labels)
    assert float(masked_identity_loss(head, f, tau, labels)) == pytest.approx(float(expected))
    changed = f.clone()
    changed[:, [1, 3]] = 100.0  # masked-out elements cannot move the loss
    assert float(masked_identity_loss(head, changed, tau, labels)) == pytest.approx(float(expected))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_objective_terms_per_variant(variant: str) -> None:
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(8, 3)
    filters = torch.randn(8, 4, 3, 3, generator=g, requires_grad=True)
    f, fo = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    m, mo = torch.rand(4, 8, 6, 6, generator=g), torch.rand(4, 8, 6, 6, generator=g)
    y = torch.tensor([0, 1, 2, 1])
    total, terms, tau = sadfad_objective(
        variant,
        filters=filters,
        classify=head,
        clean_features=f,
        clean_maps=m,
        labels=y,
        weights=SADFADLossWeights(fad_keep=6),
        occluded_features=fo,
        occluded_maps=mo,
    )
    sad, fad, occ = VARIANTS[variant]
    expected = {"identity", "total"} | ({"filter", "response"} if sad else set())
    expected |= {"occluded_identity"} if occ else set()
    expected |= {"fad"} if fad else set()
    assert set(terms) == expected
    assert (tau is not None) == fad and (tau is None or int(tau.sum()) == 6)
    assert torch.isfinite(total) and terms["total"] == pytest.approx(sum(v for k, v in terms.items() if k != "total"))
    total.backward()
    assert (filters.grad is not None) == sad


def test_objective_needs_the_occluded_branch() -> None:
    with pytest.raises(ValueError, match="occluded"):
        sadfad_objective(
            "fad",
            filters=torch.randn(4, 2, 3, 3),
            classify=torch.nn.Linear(4, 2),
            clean_features=torch.randn(2, 4),
            clean_maps=torch.rand(2, 4, 6, 6),
            labels=torch.tensor([0, 1]),
            weights=SADFADLossWeights(),
        )
    with pytest.raises(ValueError, match="unknown variant"):
        sadfad_objective(
            "nope",
            filters=torch.randn(4, 2, 3, 3),
            classify=torch.nn.Linear(4, 2),
            clean_features=torch.randn(2, 4),
            clean_maps=torch.rand(2, 4, 6, 6),
            labels=torch.tensor([0, 1]),
            weights=SADFADLossWeights(),
        )


def test_fad_keep_defaults_to_the_authors_ratio() -> None:
    assert SADFADLossWeights().keep_for(320) == 260
    assert SADFADLossWeights().keep_for(16) == 13
    assert SADFADLossWeights(fad_keep=5).keep_for(16) == 5
