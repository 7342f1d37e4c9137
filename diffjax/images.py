"""Image files and pixel conversions, in one place: decoding, model space, PNG grids.

* Reading: `IMAGE_EXTENSIONS` (the image files diffjax reads, for image-folder data
  sources and FID on a directory), `is_image_file`, `DECODE_ERRORS` (what Pillow
  raises for damaged files), `PIL_MODES`.
* Into model space: `to_mode` (L / RGB, transparency onto white), `resize_center_crop`
  (shorter side, bicubic, centre square), `uint8_to_float` (-> float32 [-1, 1]),
  `prepare_image` (all three).
* Out of model space: `to_uint8`, and `make_grid` / `save_grid` for PNG sample grids.

This module depends only on NumPy and Pillow, so data sources, evaluation and
sampling all share it without importing one another.
"""

from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np
from PIL import Image

# One list for every reader of image files (image-folder sources, FID on a directory):
# pytorch-fid's list, so reference statistics of a directory see the same files as
# pytorch-fid, and a superset of what the folder source used to read (png, jpg, jpeg,
# bmp, webp). Pillow decodes all of them (pgm/ppm are netpbm, tif/tiff TIFF).
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")

# What Pillow raises for unreadable or damaged files: bad headers and truncated data
# raise OSError (UnidentifiedImageError is one), broken PNG chunks SyntaxError, some
# decoders ValueError / EOFError / struct.error / zlib.error, huge images
# DecompressionBombError.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

# Channels -> Pillow mode of the images the data sources produce.
PIL_MODES = {1: "L", 3: "RGB"}


def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive); hidden files do not count."""
    name = os.path.basename(name)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Converts a Pillow image to `L` (channels=1) or `RGB` (channels=3).

    Transparent pixels are composited onto white (their stored colour is often
    arbitrary), and 16-bit grayscale is scaled to 8 bits rather than clipped.
    """
    if channels not in PIL_MODES:
        raise ValueError(
            f"Image sources produce 1 (grayscale) or 3 (RGB) channels, got channels={channels}."
        )
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    mode = PIL_MODES[channels]
    return img if img.mode == mode else img.convert(mode)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resizes so the shorter side is `size` (bicubic), then crops the centre square.

    An image whose shorter side already equals `size` is only cropped, so its pixels
    are kept exactly. The crop offset is `(long - size) // 2`.
    """
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        img = img.resize(new, resample=Image.Resampling.BICUBIC)
        w, h = img.size
    if (w, h) != (size, size):
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def uint8_to_float(arr: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [..., H, W, C] -> float32 [..., H, W, C] in [-1, 1] (v / 127.5 - 1).

    A grayscale [H, W] gets a trailing channel axis: [H, W, 1].
    """
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def uint8_to_unit(arr: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 in [0, 1] (v / 255): a ControlNet's control image."""
    return np.asarray(arr).astype(np.float32) / np.float32(255.0)


def prepare_image(img: Image.Image, *, image_size: int, channels: int) -> np.ndarray:
    """Pillow image -> float32 [image_size, image_size, channels] in [-1, 1]."""
    img = resize_center_crop(to_mode(img, channels), image_size)
    return uint8_to_float(np.asarray(img, dtype=np.uint8))


def to_uint8(images) -> np.ndarray:
    """Model-space images in [-1, 1] -> uint8 [0, 255] (rounded, clipped)."""
    x = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(
    images: np.ndarray, ncols: int | None = None, min_tile: int = 32, pad: int = 1
) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one [rows*H', cols*W', C] image.

    Tiles smaller than `min_tile` pixels are enlarged by an integer factor (nearest
    neighbour), so 8x8 digits stay legible.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"make_grid expects uint8 [N, H, W, C], got {images.dtype} {images.shape}."
        )
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str, ncols: int | None = None) -> str:
    """Writes `make_grid(images)` as a PNG (atomically) and returns the path."""
    grid = make_grid(images, ncols)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
    return path
