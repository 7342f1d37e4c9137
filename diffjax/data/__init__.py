"""Data sources and the grain pipeline."""

from diffjax.data.pipeline import make_dataset, make_iterator
from diffjax.data.sources import ArraySource, digits_source, load_digits_arrays

SOURCES = ("digits", "digits_text", "tfds", "folder", "latents")


def _make_registered(source: str, split: str, image_size: int, channels: int, kwargs: dict):
    # Imported on demand: tfds and the text tokenizer are slow to import and only the
    # chosen source needs them.
    if source == "tfds":
        from diffjax.data.tfds_source import make_tfds_source as make
    elif source == "folder":
        from diffjax.data.folder import make_folder_source as make
    elif source == "latents":
        from diffjax.data.latents import make_latent_source as make
    elif source == "digits_text":
        from diffjax.data.captions import make_digits_text_source as make
    else:
        raise ValueError(f"Unknown data.source {source!r}; choose one of {SOURCES}.")
    return make(split=split, image_size=image_size, channels=channels, **kwargs)


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
        src = _make_registered(source, split, image_size, channels, kwargs)
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
    "make_dataset",
    "make_source",
]
