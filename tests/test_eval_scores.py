"""Inception Score and improved precision/recall on cases with known answers."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from diffjax.eval.inception_score import inception_score
from diffjax.eval.precision_recall import knn_radii, precision_recall

# ----------------------------------------------------------------------------- IS


def test_inception_score_closed_forms():
    k = 7
    # Confident and uniformly spread over k classes: IS = k.
    confident = 60.0 * np.eye(k)[np.arange(70) % k]
    mean, std = inception_score(confident, num_splits=10)
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    # Identical predictions for every image: KL = 0, IS = 1.
    same = np.tile(np.random.default_rng(0).standard_normal(k), (20, 1))
    assert inception_score(same, num_splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    # Confident but always the same class: IS = 1.
    assert inception_score(confident[::k], num_splits=2)[0] == pytest.approx(1.0, abs=1e-6)


def test_inception_score_matches_direct_formula_per_split():
    rng = np.random.default_rng(1)
    logits = 3 * rng.standard_normal((30, 5))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in (p[:10], p[10:20], p[20:]):
        py = part.mean(0)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
    mean, std = inception_score(logits, num_splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)


def test_inception_score_errors():
    with pytest.raises(ValueError, match="num_splits"):
        inception_score(np.zeros((3, 4)), num_splits=4)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        inception_score(np.zeros(4), num_splits=1)


# ----------------------------------------------------------------------------- P/R


def test_knn_radii_match_brute_force():
    x = np.random.default_rng(2).standard_normal((37, 5)).astype(np.float32)
    d = cdist(x.astype(np.float64), x.astype(np.float64), "sqeuclidean")
    want = np.sort(d, axis=1)[:, 3]  # Index 0 is the point itself.
    np.testing.assert_allclose(knn_radii(x, k=3, block_size=8), want, rtol=1e-4, atol=1e-5)


def brute_force_pr(real, fake, k):
    def radii(x):
        return np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, k]

    prec = np.mean(np.any(cdist(fake, real, "sqeuclidean") <= radii(real)[None], axis=1))
    rec = np.mean(np.any(cdist(real, fake, "sqeuclidean") <= radii(fake)[None], axis=1))
    return prec, rec


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((120, 6))
    fake = 1.3 * rng.standard_normal((90, 6)) + 0.8
    got = precision_recall(real, fake, k=3, block_size=32)
    prec, rec = brute_force_pr(real, fake, 3)
    assert 0.05 < prec < 0.95 and 0.05 < rec < 0.95  # A case where both are informative.
    assert got["precision"] == pytest.approx(prec, abs=1.5 / len(fake))
    assert got["recall"] == pytest.approx(rec, abs=1.5 / len(real))


def test_precision_recall_known_answers():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((40, 4))
    b = rng.standard_normal((40, 4)) + 100.0
    real = np.concatenate([a, b])
    # Identical sets: everything is covered.
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    # Fakes copy one of two far-apart modes: precise, but half the real data is missed.
    assert precision_recall(real, a) == {"precision": 1.0, "recall": 0.5}
    # Fakes nowhere near the data.
    assert precision_recall(real, a - 100.0) == {"precision": 0.0, "recall": 0.0}
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        precision_recall(real, a[:, :3])
