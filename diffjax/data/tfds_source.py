"""TensorFlow Datasets through its ArrayRecord random-access path (no TensorFlow needed).

`data.source='tfds'`, `data.name='cifar10'` (or `mnist`, `imagenet2012`, any builder
name, optionally `name/config:version`), `data.data_dir` (default: `$TFDS_DATA_DIR`
or `~/tensorflow_datasets`), `data.split` (tfds split syntax, e.g. `train[:90%]`).

The dataset must already be prepared in the `array_record` file format:

    tfds build cifar10 --file_format=array_record --data_dir=DIR   # on a machine with network

Nothing is downloaded at run time: a dataset that is not there fails at once with a
message naming it, the directory searched and the command that prepares it.

Records: `image`, decoded by tfds (Pillow) to uint8 and mapped to float32 [-1, 1],
and `labels` int32 when the dataset has a ClassLabel feature. An image of another
size is resized (shorter side, bicubic) and center-cropped to `image_size`, and
grayscale / RGB are converted to `channels` (`diffjax.images.prepare_image`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from diffjax.images import prepare_image, uint8_to_float

_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def default_data_dir() -> str:
    """Where tfds looks when `data.data_dir` is empty."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets"
    )


def _prepare_hint(name: str, data_dir: str) -> str:
    base = name.split(":")[0]
    hint = (
        f"prepare it on a machine with network access with\n"
        f"    tfds build {base} --file_format=array_record --data_dir={data_dir}\n"
        f"or copy an already prepared array_record copy of {name} into {data_dir}"
    )
    if base.startswith("imagenet2012"):
        hint += (
            ". imagenet2012 cannot be downloaded by tfds: put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar in a manual dir and add --manual_dir=<that dir> to the "
            "build command"
        )
    return hint + "."


def load_builder(name: str, data_dir: str):
    """The prepared tfds builder for `name` in `data_dir`, or a clear error.

    Raises:
      FileNotFoundError: the dataset is not prepared in `data_dir`.
      ValueError: it is prepared, but not in a random-access file format.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"tfds dataset {name!r} is neither a registered tfds builder nor prepared in "
            f"data_dir={data_dir!r}; check data.name, or {_prepare_hint(name, data_dir)}"
        ) from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in data_dir={data_dir!r} (looked for "
            f"{builder.data_dir}); {_prepare_hint(name, data_dir)}"
        )
    fmt = builder.info.file_format
    fmt = getattr(fmt, "value", fmt)
    if fmt not in _RANDOM_ACCESS_FORMATS:
        raise ValueError(
            f"tfds dataset {name!r} in {builder.data_dir} is stored as {fmt}, which has no "
            "random access. Rebuild it with --file_format=array_record, or convert it with "
            f"`tfds convert_format --dataset_version_dir={builder.data_dir} "
            "--out_file_format=array_record` (needs TensorFlow to read the tfrecords)."
        )
    return builder


def _feature_keys(builder) -> tuple[str, str | None]:
    """(image key, label key or None) from the dataset's features."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    supervised = builder.info.supervised_keys
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if isinstance(supervised, tuple) and len(supervised) == 2 and supervised[0] in images:
        image_key = supervised[0]
    elif "image" in images:
        image_key = "image"
    elif images:
        image_key = images[0]
    else:
        raise ValueError(
            f"tfds dataset {builder.name!r} has no Image feature (features: "
            f"{list(features.keys())}); data.source='tfds' needs an image dataset."
        )
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if isinstance(supervised, tuple) and len(supervised) == 2 and supervised[1] in labels:
        label_key = supervised[1]
    elif "label" in labels:
        label_key = "label"
    else:
        label_key = labels[0] if labels else None
    return image_key, label_key


class TfdsSource:
    """Random-access records of a prepared tfds dataset (see the module docstring).

    Args:
      name: tfds builder name (`cifar10`, `mnist`, `imagenet2012`, `name/config:1.0.0`).
      split: tfds split string.
      data_dir: the tfds data directory; '' for the tfds default.
      image_size, channels: output shape [image_size, image_size, channels].
    """

    def __init__(
        self, name: str, *, split: str = "train", data_dir: str = "", image_size: int, channels: int
    ):
        if not name:
            raise ValueError("data.source='tfds' needs data.name, e.g. 'cifar10'.")
        if channels not in (1, 3):
            raise ValueError(
                f"data.source='tfds' makes 1- or 3-channel images, got data.channels={channels}."
            )
        self._name = name
        self._split = split
        self._data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
        self._image_size = int(image_size)
        self._channels = int(channels)
        builder = load_builder(name, self._data_dir)
        self._image_key, self._label_key = _feature_keys(builder)
        self._num_classes = (
            builder.info.features[self._label_key].num_classes if self._label_key else 0
        )
        self._class_names = (
            list(builder.info.features[self._label_key].names) if self._label_key else []
        )
        self._version = str(builder.info.version)
        try:
            self._source = builder.as_data_source(split=split)
        except ValueError as e:
            raise ValueError(
                f"tfds dataset {name!r}: cannot read split {split!r} ({e}); set data.split to "
                f"one of {list(builder.info.splits.keys())} (slicing like 'train[:90%]' works)."
            ) from e
        self._len = len(self._source)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._source[index]
        pixels = np.asarray(example[self._image_key])
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        h, w, c = pixels.shape
        if (h, w, c) == (self._image_size, self._image_size, self._channels) and (
            pixels.dtype == np.uint8
        ):
            image = uint8_to_float(pixels)
        else:
            img = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
            image = prepare_image(img, image_size=self._image_size, channels=self._channels)
        record: dict[str, Any] = {"image": image}
        if self._label_key is not None:
            record["labels"] = np.int32(example[self._label_key])
        return record

    def __repr__(self) -> str:
        return (
            f"TfdsSource(name={self._name!r}, version={self._version!r}, split={self._split!r}, "
            f"data_dir={self._data_dir!r}, n={self._len}, image_size={self._image_size}, "
            f"channels={self._channels})"
        )

    @property
    def num_classes(self) -> int:
        """Classes of the dataset's label feature (0 if it has none)."""
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)


def class_names(name: str, data_dir: str = "") -> list[str]:
    """The ClassLabel names of a prepared tfds dataset (for captions of classes)."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    builder = load_builder(name, data_dir)
    _, label_key = _feature_keys(builder)
    if label_key is None:
        raise ValueError(f"tfds dataset {name!r} has no ClassLabel feature.")
    return list(builder.info.features[label_key].names)


def make_tfds_source(
    *,
    name: str,
    split: str = "train",
    data_dir: str = "",
    image_size: int,
    channels: int,
    num_classes: int = 0,
    **unused: Any,
) -> TfdsSource:
    """`data.source='tfds'`: builds a `TfdsSource` from `config.data` fields.

    Raises if the dataset has more classes than `num_classes` (their labels would
    collide with the null class), or no label while `num_classes > 0`.
    """
    del unused
    src = TfdsSource(name, split=split, data_dir=data_dir, image_size=image_size, channels=channels)
    if num_classes > 0 and src.num_classes == 0:
        raise ValueError(
            f"data.num_classes={num_classes} but tfds dataset {name!r} has no ClassLabel "
            "feature; set data.num_classes=0 for an unconditional model."
        )
    if num_classes > 0 and src.num_classes > num_classes:
        raise ValueError(
            f"tfds dataset {name!r} has {src.num_classes} classes but data.num_classes="
            f"{num_classes}; set data.num_classes={src.num_classes} (and the model's)."
        )
    return src
