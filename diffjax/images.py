"""Image conversions and PNG grids."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


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
