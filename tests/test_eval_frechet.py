"""Fréchet distance against closed forms and an independent eigendecomposition reference."""

import numpy as np
import pytest

from diffjax.eval import frechet
from diffjax.eval.frechet import frechet_distance


def reference_fd(mu1, s1, mu2, s2):
    """|dmu|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2, via symmetric eigh only."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_covmean


def sample_stats(rng, n, dim, scale=1.0, shift=0.0):
    x = rng.standard_normal((n, dim)) @ (scale * rng.standard_normal((dim, dim))) + shift
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


@pytest.mark.parametrize("dim", [1, 8, 64])
def test_full_rank_matches_eigh_reference(dim):
    rng = np.random.default_rng(dim)
    mu1, s1 = sample_stats(rng, 4 * dim + 10, dim)
    mu2, s2 = sample_stats(rng, 4 * dim + 10, dim, scale=1.5, shift=0.3)
    ref = reference_fd(mu1, s1, mu2, s2)
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
@pytest.mark.parametrize(("n1", "n2"), [(10, 200), (12, 20), (20, 12)])
def test_singular_covariances_match_eigh_reference(n1, n2, method):
    # Fewer samples than dimensions: rank-deficient covariances, as FID on < 2048 images.
    rng = np.random.default_rng(n1 * 100 + n2)
    dim = 64
    mu1, s1 = sample_stats(rng, n1, dim)
    mu2, s2 = sample_stats(rng, n2, dim, shift=0.5)
    assert np.linalg.matrix_rank(s1) < dim or np.linalg.matrix_rank(s2) < dim
    ref = reference_fd(mu1, s1, mu2, s2)
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2, method=method), ref, rtol=1e-6)


def test_eigh_method_equals_sqrtm_on_full_rank():
    rng = np.random.default_rng(7)
    mu1, s1 = sample_stats(rng, 300, 48)
    mu2, s2 = sample_stats(rng, 300, 48, scale=0.7, shift=1.0)
    np.testing.assert_allclose(
        frechet_distance(mu1, s1, mu2, s2, method="eigh"),
        frechet_distance(mu1, s1, mu2, s2),
        rtol=1e-9,
    )


def test_diagonal_and_commuting_closed_form():
    rng = np.random.default_rng(0)
    dim = 32
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    a[:5] = 0.0  # Singular on both a shared and a private subspace.
    b[3:8] = 0.0
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method in ("sqrtm", "eigh"):
        got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
        np.testing.assert_allclose(got, expected, rtol=1e-9)
    # The same spectra in a shared random eigenbasis: the distance is basis-invariant.
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    np.testing.assert_allclose(
        frechet_distance(q @ mu1, s1, q @ mu2, s2), expected, rtol=1e-6, atol=1e-9
    )


def test_one_dimensional_is_wasserstein_of_gaussians():
    # W2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2.
    got = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert got == pytest.approx(9.0 + 1.0, rel=1e-12)


@pytest.mark.parametrize("n", [10, 500])
def test_distance_to_itself_is_zero(n):
    rng = np.random.default_rng(n)
    mu, s = sample_stats(rng, n, 64)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6 * np.trace(s)


def test_nonfinite_sqrtm_retries_with_eps_offset(monkeypatch):
    # pytorch-fid: if sqrtm(S1 S2) is not finite, use sqrtm((S1 + eps I)(S2 + eps I)).
    rng = np.random.default_rng(1)
    mu1, s1 = sample_stats(rng, 50, 6)
    mu2, s2 = sample_stats(rng, 50, 6)
    real_sqrtm, seen = frechet._sqrtm, []

    def flaky(a):
        seen.append(a)
        return np.full_like(a, np.nan) if len(seen) == 1 else real_sqrtm(a)

    monkeypatch.setattr(frechet, "_sqrtm", flaky)
    eps = 1e-2
    got = frechet_distance(mu1, s1, mu2, s2, eps=eps)
    off = np.eye(6) * eps
    np.testing.assert_allclose(seen[1], (s1 + off) @ (s2 + off))
    d = mu1 - mu2
    tr = np.trace(real_sqrtm((s1 + off) @ (s2 + off)).real)
    expected = d @ d + np.trace(s1) + np.trace(s2) - 2 * tr
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_bad_inputs_raise():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="Means"):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="Covariances"):
        frechet_distance(mu, s, mu, np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, s, mu, np.full((3, 3), np.nan))
    # Not PSD: sqrt of a negative eigenvalue is imaginary.
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(mu, np.diag([1.0, -1.0, 1.0]), mu, s)
    with pytest.raises(ValueError, match="negative eigenvalue"):
        frechet_distance(mu, np.diag([1.0, -1.0, 1.0]), mu, s, method="eigh")
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu, s, mu, s, method="svd")
