"""Data sources and the grain pipeline."""

from diffjax.data.pipeline import make_iterator, make_loader
from diffjax.data.sources import ArraySource, digits_source, load_digits_arrays

SOURCES = ("digits", "arrays")


def make_source(source: str, *, split: str = "train", image_size: int, channels: int, **kwargs):
    """Builds the source named by `config.data.source`, checking its shape.

    Args:
      source: one of `SOURCES`.
      split: the split to read.
      image_size, channels: the shape the model expects; a source whose records have
        another shape fails here, naming both shapes.
      **kwargs: source-specific options (`name`, `data_dir`, ...).
    """
    if source == "digits":
        src = digits_source(split)
    else:
        raise ValueError(f"Unknown data.source {source!r}; choose one of {SOURCES}.")
    shape = src[0]["image"].shape
    if shape != (image_size, image_size, channels):
        raise ValueError(
            f"data.source={source!r} gives images of shape {shape}, but the config expects "
            f"({image_size}, {image_size}, {channels}); set data.image_size/data.channels to match."
        )
    return src


__all__ = [
    "SOURCES",
    "ArraySource",
    "digits_source",
    "load_digits_arrays",
    "make_iterator",
    "make_loader",
    "make_source",
]
