"""Metrics for the embedded digits dataset.

A classifier fit on the real digits labels the generated samples (conditional
accuracy), and its hidden layer is the feature space of a Fréchet distance between
generated and real digits, computed with the same code as FID. For scale the same
distance between the two halves of the real set is reported beside it.
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
from threadpoolctl import threadpool_limits

from diffjax.data.sources import load_digits_arrays
from diffjax.eval.frechet import frechet_distance

log = logging.getLogger(__name__)


def _pixels(images_uint8: np.ndarray) -> np.ndarray:
    # Back to scikit-learn's 0..16 scale, flattened to 64 features.
    x = np.asarray(images_uint8, np.float64).reshape(len(images_uint8), -1)
    return x * (16.0 / 255.0)


class DigitsClassifier:
    """An MLP on 8x8 digits; `features` is its ReLU hidden layer."""

    def __init__(self, images_uint8: np.ndarray, labels: np.ndarray, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self._mlp = MLPClassifier(
            hidden_layer_sizes=(128,), alpha=1e-3, max_iter=600, random_state=seed, tol=1e-5
        )
        log.info("Fitting the digits classifier (an MLP on %d real digits)...", len(labels))
        start = time.perf_counter()
        # One BLAS thread: this small fit is 10x slower when BLAS threads compete with
        # XLA's for the cores of a busy machine (2.3 s vs 35 s measured on 2 cores).
        with threadpool_limits(limits=1, user_api="blas"):
            self._mlp.fit(_pixels(images_uint8), labels)
        log.info("Digits classifier fitted in %.1f s.", time.perf_counter() - start)

    def predict(self, images_uint8: np.ndarray) -> np.ndarray:
        return self._mlp.predict(_pixels(images_uint8))

    def features(self, images_uint8: np.ndarray) -> np.ndarray:
        """Hidden activations [N, 128] (float64)."""
        w, b = self._mlp.coefs_[0], self._mlp.intercepts_[0]
        return np.maximum(_pixels(images_uint8) @ w + b, 0.0)


def _stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


@functools.lru_cache(maxsize=1)
def reference() -> dict:
    """The fitted classifier, real-feature statistics and the real-halves baseline."""
    images, labels = load_digits_arrays()
    held_out = DigitsClassifier(images[0::2], labels[0::2])
    heldout_acc = float(np.mean(held_out.predict(images[1::2]) == labels[1::2]))
    clf = DigitsClassifier(images, labels)
    f_all = clf.features(images)
    f0, f1 = f_all[0::2], f_all[1::2]
    return {
        "classifier": clf,
        "classifier_heldout_accuracy": heldout_acc,
        "real_stats": _stats(f_all),
        "frechet_real_halves": float(frechet_distance(*_stats(f0), *_stats(f1))),
    }


def digits_metrics(images_uint8: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Conditional accuracy and Fréchet distance of generated digits.

    Args:
      images_uint8: [N, 8, 8, 1] generated images.
      labels: [N] requested classes (None for unconditional samples).
    """
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.shape[1:] != (8, 8, 1):
        raise ValueError(f"digits metrics need [N, 8, 8, 1] images, got {images_uint8.shape}.")
    ref = reference()
    clf = ref["classifier"]
    out = {
        "frechet_distance": float(
            frechet_distance(*_stats(clf.features(images_uint8)), *ref["real_stats"])
        ),
        "frechet_real_halves": ref["frechet_real_halves"],
        "classifier_heldout_accuracy": ref["classifier_heldout_accuracy"],
        "num_samples": int(len(images_uint8)),
    }
    predicted = clf.predict(images_uint8)
    if labels is not None:
        out["conditional_accuracy"] = float(np.mean(predicted == np.asarray(labels)))
    out["class_histogram"] = np.bincount(predicted, minlength=10).tolist()
    return out
