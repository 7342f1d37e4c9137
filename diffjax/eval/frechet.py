"""Fréchet distance between two Gaussians (FID when the features are Inception pool3).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

Computed as pytorch-fid does, so numbers agree with published pytorch-fid FIDs:
`scipy.linalg.sqrtm` of the product in float64; if that is not finite (singular
product), retry with `eps * I` added to both covariances; drop a negligible imaginary
part and refuse a large one. Works in any dimension (Inception's 2048, a digits
classifier's feature space, ...).
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
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
      mu1, mu2: means, [D].
      sigma1, sigma2: covariances, [D, D] (symmetric PSD; may be singular, e.g. from
        fewer samples than dimensions).
      eps: diagonal offset used only when the matrix square root is not finite
        (pytorch-fid's value).

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

    diff = mu1 - mu2
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


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # A singular product makes scipy warn; the finiteness check above handles it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return scipy.linalg.sqrtm(a)
