"""Effective ranks, null spaces, stacked spectra, principal angles and the orthogonal-null fraction,
against NumPy / SciPy float64 and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from steerjax import spectrum


def test_effective_ranks_hand_cases():
    s = np.array([4.0, 2.0, 1.0, 1e-3, 0.0])
    ranks = spectrum.effective_ranks(s)
    assert ranks["numerical"] == {"1e-02": 3, "1e-03": 3, "1e-04": 4, "1e-06": 4}
    p = s[:4] / s.sum()
    assert ranks["entropy"] == pytest.approx(np.exp(-np.sum(p * np.log(p))))
    assert ranks["stable"] == pytest.approx((16 + 4 + 1 + 1e-6) / 16)
    assert ranks["participation_ratio"] == pytest.approx((16 + 4 + 1 + 1e-6) ** 2 / (256 + 16 + 1 + 1e-12))
    # d = 8 inputs, 5 singular values given: the 3 missing are exact zeros
    assert spectrum.null_dims(s, 8) == {"1e-02": 5, "1e-03": 5, "1e-04": 4, "1e-06": 4}
    # flat spectrum: every effective rank equals the dimension
    flat = np.ones(7)
    r = spectrum.effective_ranks(flat)
    assert r["entropy"] == pytest.approx(7) and r["stable"] == pytest.approx(7)
    assert r["participation_ratio"] == pytest.approx(7)


def test_null_space_basis_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 12))  # rank 5 in d = 12: exact null space of dimension 7
    basis = spectrum.null_space_basis(a, 1e-6)
    assert basis.shape == (12, 7)
    np.testing.assert_allclose(a @ basis, 0, atol=1e-12)
    assert np.all(spectrum.principal_angles(basis, scipy.linalg.null_space(a)) < 1e-7)


def test_stacked_spectra_equal_svd_of_explicit_stack():
    rng = np.random.default_rng(1)
    # each factor has a null direction of its own; the stack's null space is their intersection
    factors = [rng.normal(size=(6, 10)) * np.geomspace(1, 1e-6, 10) for _ in range(4)]
    out = spectrum.stacked_spectra(factors, [1, 2, 4])
    assert [n for n, _, _ in out] == [1, 2, 4]
    for n, s, r in out:
        np.testing.assert_allclose(s, spectrum.padded_singular_values(
            np.linalg.svd(np.vstack(factors[:n]), compute_uv=False), 10), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(r.T @ r, sum(f.T @ f for f in factors[:n]), rtol=1e-10, atol=1e-12)
    # kernel of the stack = intersection of kernels: with one shared exact null vector
    shared = rng.normal(size=10)
    shared /= np.linalg.norm(shared)
    proj = np.eye(10) - np.outer(shared, shared)
    _, s, r = spectrum.stacked_spectra([rng.normal(size=(6, 10)) @ proj for _ in range(3)], [3])[0]
    assert spectrum.null_dims(s, 10)["1e-06"] == 1
    basis = spectrum.null_space_basis(r, 1e-6)
    assert abs(abs(basis[:, 0] @ shared) - 1) < 1e-10


def test_principal_angles_match_scipy():
    rng = np.random.default_rng(2)
    a, _ = np.linalg.qr(rng.normal(size=(20, 4)))
    b, _ = np.linalg.qr(rng.normal(size=(20, 6)))
    np.testing.assert_allclose(spectrum.principal_angles(a, b), np.sort(scipy.linalg.subspace_angles(a, b)),
                               atol=1e-10)
    assert spectrum.principal_angles(a, np.zeros((20, 0))).size == 0


def test_orthogonal_null_fraction_exact_vs_monte_carlo():
    rng = np.random.default_rng(3)
    d = 30
    basis, _ = np.linalg.qr(rng.normal(size=(d, 9)))
    v = rng.normal(size=d)
    exact = spectrum.orthogonal_null_fraction(basis, v)
    samples = spectrum.sampled_orthogonal_null_fractions(basis, v, 20000, seed=4)
    assert abs(samples.mean() - exact) < 4 * samples.std() / np.sqrt(samples.size)
    # hand cases: v inside the null space -> (k - 1)/(d - 1); v orthogonal to it -> k/(d - 1)
    assert spectrum.orthogonal_null_fraction(basis, basis[:, 0]) == pytest.approx(8 / 29)
    e = np.eye(d)
    assert spectrum.orthogonal_null_fraction(e[:, :9], e[:, 20]) == pytest.approx(9 / 29)


def test_kl_null_dims_are_absolute_and_stacking_invariant():
    """KL counts in nats: #{k : 0.5 s^2 sigma_k^2 / n <= tau}, recounted here from a dense eigendecomposition of
    the mean Gram matrix; a prompt set stacked twice gives the same counts (a sum instead of the mean would
    halve every threshold's reach)."""
    rng = np.random.default_rng(11)
    d, steer_norm = 40, 2.0
    factors = [rng.normal(size=(d, d)) * np.geomspace(1.0, 1e-4, d) for _ in range(3)]
    stacked = list(spectrum.stack_factors(factors))[-1]
    s = np.linalg.svd(stacked, compute_uv=False)
    counts = spectrum.kl_null_dims(s, d, 3, steer_norm)
    mean_gram = sum(f.T @ f for f in factors) / 3
    kl = 0.5 * steer_norm**2 * np.linalg.eigvalsh(mean_gram)
    for tau in spectrum.KL_TAUS:
        assert counts[spectrum.eps_key(tau)] == int(np.sum(kl <= tau))
    assert 0 < counts["1e-04"] < counts["1e-03"] < counts["1e-02"] < d      # the thresholds bite in this example
    twice = list(spectrum.stack_factors(factors + factors))[-1]
    assert spectrum.kl_null_dims(np.linalg.svd(twice, compute_uv=False), d, 6, steer_norm) == counts
    # a unit direction inside the counted subspace moves the mean KL by at most tau (Courant-Fischer)
    w, vecs = np.linalg.eigh(mean_gram)
    inside = vecs[:, : counts["1e-03"]] @ rng.normal(size=counts["1e-03"])
    inside /= np.linalg.norm(inside)
    assert 0.5 * steer_norm**2 * inside @ mean_gram @ inside <= 1e-3
    summed = spectrum.kl_null_dims(np.linalg.svd(twice, compute_uv=False), d, 1, steer_norm)   # no averaging
    assert summed["1e-03"] < counts["1e-03"]
    assert spectrum.second_order_kl([2.0], 1, 3.0)[0] == pytest.approx(0.5 * 9.0 * 4.0)
