"""Data sources and the grain pipeline.

Modules, lowest first (each imports only modules above it in this list, plus
`diffjax.images` and `diffjax.text`; nothing here imports `diffjax.models`):

  * `tokens`: the data room's caption tokenizer (ids for `context`).
  * `sources` (arrays, digits), `latents`, `tfds_source`, `folder`: the sources.
  * `captions`: caption conditioning over those sources (`digits_text`, captions of
    classes at sampling time); `dreambooth`: instance + class images.
  * `pipeline`: shuffle, per-process slice, augment, batch, checkpointable state.
  * this package: `make_source`, the one entry that picks a source by name.

Records are dicts of numpy arrays: `image`, and where the source has them `labels`,
`context`, `context_mask` (docs/architecture.md).
"""

from diffjax.data.captions import make_digits_text_source
from diffjax.data.dreambooth import make_dreambooth_source
from diffjax.data.folder import make_folder_source
from diffjax.data.latents import make_latent_source
from diffjax.data.pipeline import make_dataset, make_iterator
from diffjax.data.sources import ArraySource, digits_source, load_digits_arrays
from diffjax.data.tfds_source import make_tfds_source

SOURCES = ("digits", "digits_text", "tfds", "folder", "latents", "dreambooth")

# Sources built from `config.data` fields (digits takes only the split).
_MAKERS = {
    "digits_text": make_digits_text_source,
    "tfds": make_tfds_source,
    "folder": make_folder_source,
    "latents": make_latent_source,
    "dreambooth": make_dreambooth_source,
}


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
    elif source in _MAKERS:
        src = _MAKERS[source](split=split, image_size=image_size, channels=channels, **kwargs)
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
    "make_dataset",
    "make_source",
]
