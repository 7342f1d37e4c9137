"""ControlNet control images: deterministic transforms of a record's image.

`make_control(images, kind, channels=...)` turns uint8 images [..., H, W, C] (C = 1 or
3) into float32 control images [..., H, W, channels] in [0, 1] (diffusers' convention:
not normalised to [-1, 1]); `ControlSource` adds them to every record of a source as
`"control"`. Nothing here is random: the same image always gives the same control, so
a control can be recomputed at sampling time (`--control_source`) exactly as the
training run saw it.

Kinds (`CONTROLS`, `config.controlnet.control`):

* `edges`: Canny edges, `cv2.Canny(image, canny_low, canny_high)` (L2gradient off) on
  the uint8 image as it is: what Stable Diffusion's Canny ControlNet users run
  (diffusers' docs, lllyasviel's annotator) on the RGB image, where OpenCV takes
  per pixel the channel with the largest gradient. 0/1, replicated to `channels`.
* `sobel`: the 3x3 Sobel gradient magnitude of the luminance, divided by its maximum
  per image (an image without any gradient gives zeros).
* `tile`: area-downsampled by `tile_factor` (`cv2.INTER_AREA`), upsampled back to
  H x W (`cv2.INTER_CUBIC`), clipped to [0, 1]; one channel becomes three by
  replication, three become one by luminance.
* `mask`: luminance in [0, 1] above `mask_threshold` -> 1, else 0.
* `given`: not a transform; the dataset supplies the control images
  (`ROOT/control/NAME.png` beside `ROOT/images/NAME.png`, `diffjax.data.folder`).

Luminance is ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B (a 1-channel image is its own).
OpenCV is imported only when a transform runs (`pip install opencv-python-headless`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffjax.data.sources import SourceWrapper
from diffjax.images import to_uint8

CONTROLS = ("edges", "sobel", "tile", "mask", "given")
# The kinds computed from the image (all but "given").
TRANSFORMS = ("edges", "sobel", "tile", "mask")
# The options of the transforms, with their defaults (config.controlnet's names).
DEFAULT_OPTIONS = {"canny_low": 100, "canny_high": 200, "tile_factor": 8, "mask_threshold": 0.5}

_LUMA = np.asarray([0.299, 0.587, 0.114], np.float64)

GIVEN_LAYOUT = (
    "control='given' reads the control images the dataset supplies: data.source='folder' "
    "with data.data_dir=ROOT holding ROOT/images/NAME.png and ROOT/control/NAME.png (same "
    "relative path and file stem; class sub-folders inside images/ are mirrored in control/)"
)


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "ControlNet control transforms (edges, sobel, tile) need OpenCV; install it with "
            "`pip install opencv-python-headless`."
        ) from e
    return cv2


def luminance(image: np.ndarray) -> np.ndarray:
    """uint8 or float [H, W, C] (C = 1 or 3) -> float64 [H, W] in the input's units (BT.601)."""
    x = np.asarray(image, np.float64)
    return x[..., 0] if x.shape[-1] == 1 else x @ _LUMA


def _check_kind(kind: str) -> None:
    if kind == "given":
        raise ValueError(f"{GIVEN_LAYOUT}; it is not a transform of the image.")
    if kind not in TRANSFORMS:
        raise ValueError(f"Unknown control {kind!r}; choose one of {CONTROLS}.")


def _check_options(channels: int, tile_factor: int, mask_threshold: float) -> None:
    if channels not in (1, 3):
        raise ValueError(
            f"Control images have 1 or 3 channels, got channels={channels}; set "
            "controlnet.conditioning_channels to 1, 3 or 0 (= data.channels)."
        )
    if int(tile_factor) != tile_factor or tile_factor < 1:
        raise ValueError(f"controlnet.tile_factor must be a positive integer, got {tile_factor}.")
    if not 0.0 <= mask_threshold < 1.0:
        raise ValueError(
            f"controlnet.mask_threshold={mask_threshold} lies outside [0, 1): the mask "
            "compares luminance in [0, 1] with it."
        )


def _one(
    img: np.ndarray,
    kind: str,
    channels: int,
    canny_low: float,
    canny_high: float,
    tile_factor: int,
    mask_threshold: float,
) -> np.ndarray:
    """One uint8 image [H, W, C] -> float32 [H, W, channels] in [0, 1]."""
    h, w, c = img.shape
    if kind == "mask":
        out = (luminance(img) / 255.0 > mask_threshold).astype(np.float32)[..., None]
    elif kind == "edges":
        cv2 = _cv2()
        src = np.ascontiguousarray(img[..., 0] if c == 1 else img)
        edges = cv2.Canny(src, canny_low, canny_high, L2gradient=False)
        out = (edges > 0).astype(np.float32)[..., None]
    elif kind == "sobel":
        cv2 = _cv2()
        y = luminance(img)
        gx = cv2.Sobel(y, cv2.CV_64F, 1, 0, ksize=3)
        gy = cv2.Sobel(y, cv2.CV_64F, 0, 1, ksize=3)
        mag = np.hypot(gx, gy)
        peak = mag.max()
        mag = mag / peak if peak > 0 else np.zeros_like(mag)
        out = mag.astype(np.float32)[..., None]
    else:  # tile
        cv2 = _cv2()
        f = int(tile_factor)
        x = img.astype(np.float32) / np.float32(255.0)
        if c == 3 and channels == 1:
            x = luminance(x).astype(np.float32)[..., None]
        small = cv2.resize(x, (w // f, h // f), interpolation=cv2.INTER_AREA)
        big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        out = np.clip(big.reshape(h, w, -1), 0.0, 1.0).astype(np.float32)
    if out.shape[-1] != channels:  # 1 -> 3 (replicate)
        out = np.repeat(out, channels, axis=-1)
    return out


def make_control(
    images: np.ndarray,
    kind: str,
    *,
    channels: int,
    canny_low: float = 100,
    canny_high: float = 200,
    tile_factor: int = 8,
    mask_threshold: float = 0.5,
) -> np.ndarray:
    """Control images of `kind` (see the module docstring) from uint8 images.

    Args:
      images: uint8 [..., H, W, C] with C = 1 or 3 (a single [H, W, C] image too).
        Model-space floats in [-1, 1] convert with `diffjax.images.to_uint8` first.
      kind: one of `TRANSFORMS` ("given" is read from files, not computed).
      channels: channels of the control image, 1 or 3.
      canny_low, canny_high: `edges`' hysteresis thresholds on the uint8 gradients.
      tile_factor: `tile`'s downsampling factor; must divide H and W.
      mask_threshold: `mask`'s luminance threshold in [0, 1).

    Returns:
      float32 [..., H, W, channels] in [0, 1].
    """
    _check_kind(kind)
    _check_options(channels, tile_factor, mask_threshold)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"make_control takes uint8 images, got dtype {images.dtype}; convert model-space "
            "images in [-1, 1] with diffjax.images.to_uint8 first."
        )
    if images.ndim < 3 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"make_control takes images [..., H, W, C] with C = 1 or 3, got shape "
            f"{images.shape}; add a trailing channel axis to a grayscale [H, W] image."
        )
    h, w = images.shape[-3:-1]
    if kind == "tile" and (h % int(tile_factor) or w % int(tile_factor)):
        raise ValueError(
            f"controlnet.tile_factor={tile_factor} does not divide the image size {h}x{w}; "
            "choose a factor of both sides."
        )
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    opts = (channels, canny_low, canny_high, tile_factor, mask_threshold)
    out = np.stack([_one(img, kind, *opts) for img in flat]) if len(flat) else None
    if out is None:
        return np.zeros((*lead, h, w, channels), np.float32)
    return out.reshape(*lead, h, w, channels)


class ControlSource(SourceWrapper):
    """Any random-access source with `"control"` added to each record.

    The control is `make_control` of the record's `image` (float32 [-1, 1], turned back
    into the uint8 it came from by `diffjax.images.to_uint8`: exact for images read
    from uint8 pixels). The first record is computed at construction, so bad options
    (a `tile_factor` that does not divide the image size, say) fail at start-up.
    Other attributes (`labels`, `class_names`, `caption`, ...) are the wrapped
    source's.

    Args:
      source: the wrapped source (`__len__`, `__getitem__`, records with `image`).
      kind: one of `TRANSFORMS`.
      channels: channels of the control image (1 or 3).
      **options: `canny_low`, `canny_high`, `tile_factor`, `mask_threshold`.
    """

    def __init__(self, source, kind: str, *, channels: int, **options: Any):
        unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
        if unknown:
            raise TypeError(
                f"Unknown control option(s) {unknown}; the options are {sorted(DEFAULT_OPTIONS)}."
            )
        _check_kind(kind)
        _check_options(
            int(channels), options.get("tile_factor", 8), options.get("mask_threshold", 0.5)
        )
        self._source = source
        self._kind = kind
        self._channels = int(channels)
        self._options = {**DEFAULT_OPTIONS, **options}
        if len(source):
            self[0]

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = dict(self._source[index])
        pixels = to_uint8(record["image"])
        record["control"] = make_control(
            pixels, self._kind, channels=self._channels, **self._options
        )
        return record

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in sorted(self._options.items()))
        return (
            f"ControlSource({self._source!r}, kind={self._kind!r}, "
            f"channels={self._channels}, {opts})"
        )

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def channels(self) -> int:
        """Channels of the control images."""
        return self._channels

    @property
    def options(self) -> dict[str, Any]:
        """The transform's options (defaults filled in)."""
        return dict(self._options)
