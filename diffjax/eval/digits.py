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


# The classification accuracy score's test set: the odd half of the real digits (the
# `half1` split); the real baseline trains on the even half (`half0`).
CAS_TEST = "digits half1 (899 real digits)"


def _cas_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    images, labels = load_digits_arrays()
    return images[0::2], labels[0::2], images[1::2], labels[1::2]


@functools.lru_cache(maxsize=8)
def _real_baseline(n: int, seed: int) -> tuple[float, int]:
    train_x, train_y, test_x, test_y = _cas_split()
    n = min(n, len(train_y))
    pick = np.sort(np.random.default_rng(seed).permutation(len(train_y))[:n])
    clf = DigitsClassifier(train_x[pick], train_y[pick], seed=seed)
    return float(np.mean(clf.predict(test_x) == test_y)), n


def classification_accuracy_score(
    images_uint8: np.ndarray, labels: np.ndarray, *, seed: int = 0, baseline: bool = True
) -> dict[str, float | int | str]:
    """Classification accuracy score (Ravuri & Vinyals 2019) of labelled digits.

    Fits the digits classifier (`DigitsClassifier`'s MLP recipe) on the given images and
    their labels only, and reports its accuracy on real digits it never saw. Beside it,
    `cas_real_baseline` is the same recipe fit on as many real digits (a random subset of
    the even half, at most its 899) and tested on the same real digits.

    Args:
      images_uint8: [N, 8, 8, 1] images (generated, or any labelled set).
      labels: [N] their classes 0..9 (for samples: the requested classes).
      seed: the classifier's initialization and the baseline's subset.
      baseline: also fit the real baseline (cached per size and seed).

    Returns:
      {'cas', 'cas_num_train', 'cas_test'} (+ 'cas_real_baseline',
      'cas_real_baseline_num_train').

    Note: the real test digits are the odd half (`half1`) of the 1,797 digits; a model
    trained on `data.split='half0'` never saw them, one trained on all digits (the
    default) did, which favours its samples.
    """
    images_uint8 = np.asarray(images_uint8)
    labels = np.asarray(labels).astype(np.int64)
    if images_uint8.shape[1:] != (8, 8, 1) or images_uint8.dtype != np.uint8:
        raise ValueError(
            f"the classification accuracy score needs uint8 [N, 8, 8, 1] digits, got "
            f"{images_uint8.dtype} {images_uint8.shape}."
        )
    if labels.shape != (len(images_uint8),):
        raise ValueError(f"labels must have shape [{len(images_uint8)}], got {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"digit labels must lie in 0..9, got {sorted(set(labels.tolist()))}.")
    if len(np.unique(labels)) < 2:
        raise ValueError("the classification accuracy score needs images of at least 2 classes.")
    _, _, test_x, test_y = _cas_split()
    clf = DigitsClassifier(images_uint8, labels, seed=seed)
    out: dict[str, float | int | str] = {
        "cas": float(np.mean(clf.predict(test_x) == test_y)),
        "cas_num_train": int(len(labels)),
        "cas_test": CAS_TEST,
    }
    if baseline:
        acc, n = _real_baseline(len(labels), seed)
        out["cas_real_baseline"] = acc
        out["cas_real_baseline_num_train"] = n
    return out


def _folder_digit(name: str) -> int | None:
    """The digit a class folder names: `7`, `seven` or `7_seven`; None otherwise."""
    from diffjax.data.sources import DIGIT_NAMES

    if name in DIGIT_NAMES:
        return DIGIT_NAMES.index(name)
    head, _, tail = name.partition("_")
    if head.isdigit() and 0 <= int(head) <= 9 and tail in ("", DIGIT_NAMES[int(head)]):
        return int(head)
    return None


def load_labelled_digits(root: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 8, 8, 1] images and digit labels of a folder of class sub-folders.

    The layout `launch/make_dataset.py --format=folder` writes (`ROOT/<class>/<i>.png`,
    read with `data.source='folder'`); the class folders must be named by digit (`0`..`9`),
    digit name (`zero`..`nine`) or both (`0_zero`..`9_nine`, make_dataset's names), so
    that labels are digits whatever their sort order.
    Images of another size are resized as the folder source does.
    """
    from diffjax.data.folder import FolderSource
    from diffjax.data.sources import DIGIT_NAMES
    from diffjax.images import to_uint8

    src = FolderSource(root, image_size=8, channels=1)
    names = list(src.class_names)
    if not names:
        raise ValueError(f"{root} has no class sub-folders; the score needs labelled digits.")
    digit = [_folder_digit(n) for n in names]
    if None in digit:
        raise ValueError(
            f"{root}'s class folders {names[:10]} are not digits; name them 0..9, "
            f"{DIGIT_NAMES[0]}..{DIGIT_NAMES[-1]} or 0_{DIGIT_NAMES[0]}..9_{DIGIT_NAMES[-1]} "
            "(what launch/make_dataset.py writes)."
        )
    images = np.stack([to_uint8(src[i]["image"]) for i in range(len(src))])
    labels = np.asarray(digit, np.int64)[np.asarray(src.labels)]
    return images, labels
