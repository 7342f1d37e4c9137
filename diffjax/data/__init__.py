"""Data sources and the grain pipeline.

Modules, lowest first (each imports only modules above it in this list, plus
`diffjax.images` and `diffjax.text`; nothing here imports `diffjax.models`):

  * `tokens`: the data room's caption tokenizer (ids for `context`).
  * `sources` (arrays, digits), `latents`, `tfds_source`, `folder`: the sources.
  * `captions`: caption conditioning over those sources (`digits_text`, captions of
    classes at sampling time); `dreambooth`: instance + class images.
  * `control`: ControlNet control images (edges, sobel, tile, mask) computed per record.
  * `masks`: random inpainting masks (box, brush, outpaint, full) added per record.
  * `mix`: `data.mix` (other sources interleaved with fixed fractions) and
    `data.num_examples` (the first N records).
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
from diffjax.data.mix import LimitSource, MixSource, parse_mix
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
    mix: str = "",
    num_examples: int = 0,
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
      mix: `config.data.mix`: other sources interleaved with `source` with fixed
        fractions of the stream (`diffjax.data.mix`; '' = none). Each is built with
        these same options, checked for the same shape and class count.
      num_examples: `config.data.num_examples`: only the first N records of `source`
        (before any mix); 0 = all. N larger than the source is an error naming both.
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
    entries = parse_mix(mix)  # a malformed mix fails before any source is read
    if int(num_examples) < 0:
        raise ValueError(f"data.num_examples must be >= 0 (0 = all records), got {num_examples}.")
    src = _base_source(source, split, image_size, channels, kwargs)
    if num_examples:
        src = LimitSource(src, int(num_examples))
    if entries:
        parts, names = [src], [f"data.source={source!r}"]
        for e in entries:
            fields = {**kwargs, "split": split, **e.fields()}
            where = e.split if e.source == "digits" else e.data_dir
            names.append(f"the mix entry {e.source}:{where}")
            try:
                if (e.source == "latents") != (source == "latents"):
                    raise ValueError(
                        "latents mix only with latents (their records hold latents, not "
                        "pixels); encode the other set with launch/encode_latents.py"
                    )
                parts.append(
                    _base_source(
                        e.source, fields.pop("split"), image_size, channels, fields, names[-1]
                    )
                )
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(f"data.mix entry {e.source}:{where}: {err}") from err
        rest = 1.0 - sum(e.fraction for e in entries)
        src = MixSource(parts, [rest] + [e.fraction for e in entries], names)
    if control and control != "given":
        src = ControlSource(src, control, channels=control_channels, **options)
    if generator is not None:
        src = MaskSource(src, generator)
    return src


def _base_source(source, split, image_size, channels, kwargs, what=None):
    """The source named `source` built from `kwargs`, its image shape checked."""
    if source == "digits":
        src = digits_source(split)
    elif source in _MAKERS:
        src = _MAKERS[source](split=split, image_size=image_size, channels=channels, **kwargs)
    else:
        raise ValueError(f"Unknown data.source {source!r}; choose one of {SOURCES}.")
    shape = src[0]["image"].shape
    if shape != (image_size, image_size, channels):
        raise ValueError(
            f"{what or f'data.source={source!r}'} gives images of shape {shape}, but the "
            f"config expects ({image_size}, {image_size}, {channels}); set "
            "data.image_size/data.channels to match."
        )
    return src


__all__ = [
    "CONTROLS",
    "MASK_KINDS",
    "LimitSource",
    "MixSource",
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
    "parse_mix",
]
