"""Random-access data sources.

Every source is a grain random-access source: `__len__`, `__getitem__` and a stable
`__repr__` (grain compares reprs when it restores an iterator). Records are dicts of
numpy arrays; `image` is float32 [H, W, C] in [-1, 1] and `labels` (the class of
the record, named like the model argument it feeds) is int32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffjax.images import uint8_to_float

# The class names of the digits dataset (label i = DIGIT_NAMES[i]).
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class ArraySource:
    """Records from in-memory arrays: `images` uint8 or float [N, H, W, C]."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray | None = None, *, name: str = "arrays"
    ):
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(
                f"ArraySource expects images of shape [N, H, W, C], got {images.shape}; "
                "add a trailing channel axis for grayscale images."
            )
        if images.dtype == np.uint8:
            images = uint8_to_float(images)
        images = images.astype(np.float32)
        if images.size and (images.min() < -1.0 - 1e-5 or images.max() > 1.0 + 1e-5):
            raise ValueError(
                "ArraySource float images must lie in [-1, 1] "
                f"(got [{images.min():.3g}, {images.max():.3g}]); pass uint8 or rescale."
            )
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int32)
            if labels.shape != (images.shape[0],):
                raise ValueError(f"labels must have shape [{images.shape[0]}], got {labels.shape}.")
        self._images = images
        self._labels = labels
        self._name = name

    def __len__(self) -> int:
        return self._images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = {"image": self._images[index]}
        if self._labels is not None:
            record["labels"] = self._labels[index]
        return record

    def __repr__(self) -> str:
        return f"ArraySource(name={self._name!r}, n={len(self)}, shape={self._images.shape[1:]})"

    @property
    def images(self) -> np.ndarray:
        """All images, float32 [N, H, W, C] in [-1, 1]."""
        return self._images

    @property
    def labels(self) -> np.ndarray | None:
        return self._labels


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits: images uint8 [1797, 8, 8, 1], labels [1797].

    The data ships inside scikit-learn, so nothing is downloaded. Pixel values 0..16
    are mapped to 0..255.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int32)


def digits_source(split: str = "train") -> ArraySource:
    """The embedded digits dataset. `split` is `train` (all 1,797), or `half0`/`half1`."""
    images, labels = load_digits_arrays()
    if split == "half0":
        images, labels = images[0::2], labels[0::2]
    elif split == "half1":
        images, labels = images[1::2], labels[1::2]
    elif split != "train":
        raise ValueError(f"digits has splits 'train', 'half0', 'half1'; got {split!r}.")
    return ArraySource(images, labels, name=f"digits:{split}")


class SourceWrapper:
    """Base of sources that wrap another (`self._source`) and change some records or
    attributes: every other public attribute is the wrapped source's."""

    _source: Any

    def __getattr__(self, name: str):
        # Only public names are forwarded; dunders and privates (looked up while
        # unpickling, before `_source` exists) are not.
        if name.startswith("_") or "_source" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_source"], name)

    @property
    def source(self):
        """The wrapped source."""
        return self._source
