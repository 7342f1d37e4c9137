"""Inception Score (Salimans et al. 2016) from the FID Inception's 1008-way head.

    IS = exp(E_x KL(p(y|x) || p(y)))

computed over `num_splits` consecutive splits, returning the mean and standard
deviation over splits, as the original TF code does. That code applies the softmax to
`pool3 @ W` of the 2015-12-05 graph's `softmax/logits/MatMul`, i.e. without the bias;
`InceptionV3(with_logits=True)` exposes that as `logits_unbiased`, which is what
`inception_score_from_images` uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import log_softmax


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """Inception Score from classifier logits.

    Args:
      logits: [N, K] unnormalized log-probabilities (any classifier).
      num_splits: split i is rows [i*N//s, (i+1)*N//s), as in the reference code.

    Returns:
      (mean, std) of exp(mean KL) over the splits.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, K], got {logits.shape}.")
    n = logits.shape[0]
    if not 1 <= num_splits <= n:
        raise ValueError(f"num_splits must be in [1, N={n}], got {num_splits}.")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or Inf.")
    log_p = log_softmax(logits, axis=1)
    scores = []
    for i in range(num_splits):
        part = log_p[i * n // num_splits : (i + 1) * n // num_splits]
        # log of the marginal p(y) = mean_x p(y|x), computed stably in log space.
        log_py = np.logaddexp.reduce(part, axis=0) - np.log(len(part))
        kl = np.sum(np.exp(part) * (part - log_py), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_from_images(
    images: Any,
    variables: Mapping[str, Any],
    batch_size: int = 200,
    num_splits: int = 10,
    *,
    devices: Sequence[Any] | None = None,
) -> tuple[float, float]:
    """Inception Score of images with the FID Inception (needs its `fc` weights).

    Args:
      images: uint8 [N, H, W, C] / float [0, 1], or an iterable of batches.
      variables: `inception.load_params(...)` of a file that includes `fc`.
      batch_size: images per device call.
      num_splits: splits (10 in the literature, with 50k images).

    Returns:
      (mean, std) over splits.
    """
    from diffjax.eval.fid import extract_features

    out = extract_features(images, variables, batch_size, with_logits=True, devices=devices)
    return inception_score(out["logits_unbiased"], num_splits)
