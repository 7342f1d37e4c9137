"""Data sources and the grain pipeline.

Modules, lowest first (each imports only modules above it in this list, plus
`diffjax.images` and `diffjax.text`; nothing here imports `diffjax.models`):

  * `tokens`: the data room's caption tokenizer (ids for `context`).
  * `sources` (arrays, digits), `latents`, `tfds_source`, `folder`: the sources.
  * `captions`: caption conditioning over those sources (`digits_text`, captions of
    classes at sampling time); `dreambooth`: instance + class images.
  * `control`: ControlNet control images (edges, sobel, tile, mask) computed per record.
  * `masks`: random inpainting masks (box, brush, outpaint, full) added per record.
  * `pipeline`: shuffle, per-process slice, augment, batch, checkpointable state.
  * this package: `make_source`, the one entry that picks a source by name.

Records are dicts of numpy arrays: `image`, and where the source has them `labels`,
`context`, `context_mask`, for a ControlNet run `control` float32 [H, W, Cc] in [0, 1], and
for an inpainting run `mask` float32 [H, W, 1] (1 = regenerate) (docs/architecture.md).
"""

from diffjax.data.captions import make_digits_text_source
from diffjax.data.control import CONTROLS, ControlSource, make_control
from diffjax.data.dreambooth import make_dreambooth_source
from diffjax.data.folder import make_folder_source
from diffjax.data.latents import make_latent_source
from diffjax.data.masks import MASK_KINDS, MaskGenerator, MaskSource
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


def make_source(
    source: str,
    *,
    split: str = "train",
    image_size: int,
    channels: int,
    control: str = "",
    control_options: dict | None = None,
    masks: dict | None = None,
    **kwargs,
):
    """Builds the source named by `config.data.source`, checking its shape.

    Args:
      source: one of `SOURCES`.
      split: the split to read.
      image_size, channels: the shape the model expects; a source whose records have
        another shape fails here, naming both shapes.
      control: `config.controlnet.control`: "" (no control images), a transform in
        `diffjax.data.control.TRANSFORMS` (the source is wrapped in a `ControlSource`),
        or "given" (the folder source's `ROOT/control` images).
      control_options: `channels` (of the control image; 0 or missing = `channels`),
        `canny_low`, `canny_high`, `tile_factor`, `mask_threshold`.
      masks: an inpainting run's `MaskGenerator` fields (`masks`, `seed`, `min_size`,
        `max_size`, `max_strokes`, `brush_width`): the source is wrapped in a
        `MaskSource` that adds a random `mask` to every record; None = no masks.
      **kwargs: source-specific options (`name`, `data_dir`, ...).
    """
    options = dict(control_options or {})
    control_channels = int(options.pop("channels", 0) or 0) or channels
    if control and control not in CONTROLS:
        raise ValueError(f"Unknown controlnet.control {control!r}; choose one of {CONTROLS}.")
    if control == "given":
        if source != "folder":
            raise ValueError(
                f"controlnet.control='given' reads control images from an image folder "
                f"(data.source='folder', ROOT/images/NAME.png + ROOT/control/NAME.png), not "
                f"data.source={source!r}; use a control transform of the images "
                "('edges', 'sobel', 'tile', 'mask') instead."
            )
        kwargs["control_channels"] = control_channels
    elif control and source == "latents":
        raise ValueError(
            f"controlnet.control={control!r} computes control images from the pixels of each "
            "record, but data.source='latents' holds latents; train from the images "
            "(data.source='folder' or 'tfds' with the VAE in the train step)."
        )
    if masks is not None and source == "latents":
        raise ValueError(
            "inpainting.enabled: an inpainting latent model sees the latents of the masked "
            "image, which must be encoded from pixels in the train step, but "
            "data.source='latents' holds latents of whole images; train from the images "
            "(data.source='folder', 'tfds' or 'digits' with latent.vae: they are encoded in "
            "the step)."
        )
    generator = None if masks is None else MaskGenerator(**masks)  # bad options fail first
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
    if control and control != "given":
        src = ControlSource(src, control, channels=control_channels, **options)
    if generator is not None:
        src = MaskSource(src, generator)
    return src


__all__ = [
    "CONTROLS",
    "MASK_KINDS",
    "SOURCES",
    "ArraySource",
    "ControlSource",
    "MaskGenerator",
    "MaskSource",
    "make_control",
    "digits_source",
    "load_digits_arrays",
    "make_iterator",
    "make_dataset",
    "make_source",
]
