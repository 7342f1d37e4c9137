"""Fréchet distance between two Gaussians (FID when the features are Inception pool3).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

By default computed as pytorch-fid does, so numbers agree with published pytorch-fid
FIDs: `scipy.linalg.sqrtm` of the product in float64; if that is not finite (singular
product), retry with `eps * I` added to both covariances; drop a negligible imaginary
part and refuse a large one. `method='eigh'` instead uses
tr((S1 S2)^{1/2}) = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})) with symmetric
eigendecompositions only: the same value for PSD inputs (to ~1e-6 relative on
singular ones), several times faster at D=2048, where sqrtm's complex Schur
decomposition takes tens of seconds on a small CPU. Works in any dimension
(Inception's 2048, a digits classifier's feature space, ...).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
      mu1, mu2: means, [D].
      sigma1, sigma2: covariances, [D, D] (symmetric PSD; may be singular, e.g. from
        fewer samples than dimensions).
      eps: diagonal offset used only when the matrix square root is not finite
        (pytorch-fid's value).
      method: 'sqrtm' (pytorch-fid's algorithm) or 'eigh' (faster, see module doc).

    Returns:
      The distance as a Python float (FID when the inputs are Inception statistics).

    Raises:
      ValueError: mismatched shapes, non-finite inputs, or a square root with a large
        imaginary component (the covariances are not PSD).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"Means must both be [D], got {mu1.shape} and {mu2.shape}.")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"Covariances must be [{d}, {d}] to match the means, got {sigma1.shape} and "
            f"{sigma2.shape}."
        )
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or Inf.")

    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}.")

    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product: nudge both covariances away from singularity, as pytorch-fid.
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary component of {worst:.3g}; the "
                "covariances are probably not positive semi-definite."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # S1 S2 is similar to S1^1/2 S2 S1^1/2 (symmetric PSD), so their eigenvalues agree.
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    if w.min() < -1e-6 * max(w.max(), 1e-30):
        raise ValueError(
            f"sigma1 has a negative eigenvalue ({w.min():.3g}); it is not a covariance matrix."
        )
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    e = np.linalg.eigvalsh((inner + inner.T) / 2)
    if e.min() < -1e-6 * max(e.max(), 1e-30):
        raise ValueError(
            f"sigma1^1/2 sigma2 sigma1^1/2 has a negative eigenvalue ({e.min():.3g}); sigma2 "
            "is not a covariance matrix."
        )
    return float(np.sqrt(np.clip(e, 0.0, None)).sum())


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # A singular product makes scipy warn; the finiteness check above handles it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return scipy.linalg.sqrtm(a)
