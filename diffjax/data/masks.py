"""Random training masks of inpainting models (`config.inpainting`).

An inpainting model sees `[x_t, mask, masked image]` and learns to fill the region where
`mask` is 1 (Stable Diffusion inpainting's 9-channel layout for latent models, the same
idea in pixels). Its training records carry a `mask`, float32 [H, W, 1] with 1 = regenerate,
0 = keep, at the size of the record's image (the pixels, also for latent models: the
mask is downsampled to the latent grid in the train step).

Kinds (`MASK_KINDS`, mixed by `config.inpainting.masks`, e.g. "box:0.3,brush:0.4,..."):

* `box`: one axis-aligned rectangle, each side a uniform fraction in
  [min_size, max_size] of the image side (at least 1 pixel), placed uniformly.
* `brush`: 1 to `max_strokes` free-form strokes (LaMa's and SD-inpainting's irregular
  masks): a random walk of 1-4 segments, each `min_size`-`max_size` of the side long in
  a uniform direction, drawn `brush_width` thick at most (every pixel whose centre lies
  within half the width of the polyline); it starts inside the image, so it is never
  empty.
* `outpaint`: keep a central region, regenerate 1-4 borders (a uniform non-empty subset of
  top, bottom, left, right); the borders of one axis together span `min_size`-`max_size`
  of the side (split uniformly between two), and at least one row and column are kept.
* `full`: everything regenerated, so the model also learns plain generation (SD
  inpainting trained on a share of fully masked examples; sampling without a mask uses it).

Determinism: mask `n` of a `MaskGenerator` depends only on its seed and `n` (a NumPy
generator seeded with both), never on the process, worker or device count.
`MaskSource[i]` is mask `i` of its generator; the training pipeline
(`diffjax.data.pipeline.make_dataset`) instead draws mask `n` for the n-th example of
the global stream, so every epoch sees new masks and a resumed run the same ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from diffjax.data.sources import SourceWrapper

MASK_KINDS = ("box", "brush", "outpaint", "full")
DEFAULT_MASKS = "box:0.3,brush:0.4,outpaint:0.15,full:0.15"
# Mixed into every mask's seed, so masks do not share a stream with other seeded draws.
_SALT = 0x6D61736B  # "mask"


def parse_masks(spec: str) -> dict[str, float]:
    """`"box:0.3,brush,full:0.1"` -> {kind: probability}, weights normalised to sum 1.

    A kind without `:weight` weighs 1. Raises ValueError naming the problem (an unknown
    or repeated kind, a weight that is not a positive number, an empty spec).
    """
    out: dict[str, float] = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        kind, _, weight = part.partition(":")
        kind = kind.strip()
        if kind not in MASK_KINDS:
            raise ValueError(
                f"inpainting.masks: unknown mask kind {kind!r} in {spec!r}; the kinds are "
                f"{MASK_KINDS} (e.g. {DEFAULT_MASKS!r})."
            )
        if kind in out:
            raise ValueError(f"inpainting.masks: {kind!r} appears twice in {spec!r}.")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(
                f"inpainting.masks: the weight of {kind!r} in {spec!r} is not a number."
            ) from None
        if not w > 0 or not np.isfinite(w):
            raise ValueError(
                f"inpainting.masks: the weight of {kind!r} must be > 0, got {weight!r}; leave "
                "a kind out instead of weighting it 0."
            )
        out[kind] = w
    if not out:
        raise ValueError(
            f"inpainting.masks is empty; name kinds from {MASK_KINDS}, e.g. {DEFAULT_MASKS!r}."
        )
    total = sum(out.values())
    return {k: w / total for k, w in out.items()}


@dataclasses.dataclass(frozen=True)
class MaskGenerator:
    """Draws mask `n` of a seeded stream of random masks (module docstring).

    Attributes:
      masks: the kinds and their weights (`parse_masks`' spec).
      seed: the stream's seed (`config.seed`).
      min_size, max_size: box sides, border widths and stroke segment lengths, as a
        fraction of the image side; 0 < min_size <= max_size <= 1.
      max_strokes: brush: at most this many strokes per mask (at least 1).
      brush_width: brush: the thickest stroke, as a fraction of the image side (the
        width is uniform in [1/4, 1] of it, at least 1 pixel).
    """

    masks: str = DEFAULT_MASKS
    seed: int = 0
    min_size: float = 0.1
    max_size: float = 0.5
    max_strokes: int = 4
    brush_width: float = 0.2

    def __post_init__(self):
        self.probabilities  # noqa: B018 - parses (and checks) the spec
        if not 0.0 < self.min_size <= self.max_size <= 1.0:
            raise ValueError(
                f"inpainting.min_size={self.min_size} and max_size={self.max_size} must "
                "satisfy 0 < min_size <= max_size <= 1 (fractions of the image side)."
            )
        if int(self.max_strokes) != self.max_strokes or self.max_strokes < 1:
            raise ValueError(f"inpainting.max_strokes must be >= 1, got {self.max_strokes}.")
        if not 0.0 < self.brush_width <= 1.0:
            raise ValueError(
                f"inpainting.brush_width must lie in (0, 1] (a fraction of the image side), "
                f"got {self.brush_width}."
            )

    @property
    def probabilities(self) -> dict[str, float]:
        """{kind: probability} of the spec."""
        return parse_masks(self.masks)

    def rng(self, index: int) -> np.random.Generator:
        """The NumPy generator of mask `index` (a function of the seed and index only)."""
        return np.random.default_rng([_SALT, int(self.seed) % 2**32, int(index)])

    def draw(self, index: int, height: int, width: int) -> tuple[str, np.ndarray]:
        """Mask `index` of the stream: (its kind, float32 [height, width, 1], 1 = regenerate)."""
        probs = self.probabilities
        kinds = list(probs)
        rng = self.rng(index)
        kind = kinds[int(rng.choice(len(kinds), p=np.asarray(list(probs.values()))))]
        mask = _DRAW[kind](self, rng, int(height), int(width))
        return kind, mask.astype(np.float32)[..., None]

    def __call__(self, index: int, height: int, width: int) -> np.ndarray:
        """Mask `index`, float32 [height, width, 1] (`draw` without the kind)."""
        return self.draw(index, height, width)[1]

    def _length(self, rng: np.random.Generator, side: int) -> int:
        """A uniform length in [min_size, max_size] of `side`, at least 1 pixel."""
        return max(1, int(round(rng.uniform(self.min_size, self.max_size) * side)))


def _box(gen: MaskGenerator, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    bh, bw = gen._length(rng, h), gen._length(rng, w)
    top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    mask = np.zeros((h, w), bool)
    mask[top : top + bh, left : left + bw] = True
    return mask


def _outpaint(gen: MaskGenerator, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # A uniform non-empty subset of the four borders: one of the 15 non-zero bit patterns.
    sides = int(rng.integers(1, 16))
    top, bottom = _borders(gen, rng, h, bool(sides & 1), bool(sides & 2))
    left, right = _borders(gen, rng, w, bool(sides & 4), bool(sides & 8))
    mask = np.zeros((h, w), bool)
    mask[:top] = True
    mask[h - bottom :] = True
    mask[:, :left] = True
    mask[:, w - right :] = True
    return mask


def _borders(
    gen: MaskGenerator, rng: np.random.Generator, side: int, first: bool, second: bool
) -> tuple[int, int]:
    """Widths of the two borders of one axis: together `min_size`-`max_size` of the side
    (split uniformly when both are regenerated), leaving at least one row or column."""
    if not (first or second):
        return 0, 0
    total = min(gen._length(rng, side), side - 1)
    if not (first and second):
        return (total, 0) if first else (0, total)
    a = int(round(rng.uniform() * total))
    return a, total - a


def _brush(gen: MaskGenerator, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    side = min(h, w)
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    mask = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, int(gen.max_strokes) + 1))):
        width = max(1.0, rng.uniform(0.25, 1.0) * gen.brush_width * side)
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        # A 1-pixel stroke may pass between pixel centres: the pixel under its start is
        # painted too, so no stroke is empty.
        mask[min(int(y), h - 1), min(int(x), w - 1)] = True
        for _ in range(int(rng.integers(1, 5))):
            angle = rng.uniform(0.0, 2.0 * np.pi)
            length = rng.uniform(gen.min_size, gen.max_size) * side
            y2 = float(np.clip(y + length * np.sin(angle), 0.0, h))
            x2 = float(np.clip(x + length * np.cos(angle), 0.0, w))
            mask |= _segment_distance(ys, xs, y, x, y2, x2) <= width / 2.0
            y, x = y2, x2
    return mask


def _segment_distance(ys, xs, y1, x1, y2, x2) -> np.ndarray:
    """Distance of each (ys, xs) point to the segment (y1, x1)-(y2, x2)."""
    dy, dx = y2 - y1, x2 - x1
    norm = dy * dy + dx * dx
    s = 0.0 if norm == 0 else np.clip(((ys - y1) * dy + (xs - x1) * dx) / norm, 0.0, 1.0)
    return np.hypot(ys - (y1 + s * dy), xs - (x1 + s * dx))


def _full(gen: MaskGenerator, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    del gen, rng
    return np.ones((h, w), bool)


_DRAW = {"box": _box, "brush": _brush, "outpaint": _outpaint, "full": _full}


class MaskSource(SourceWrapper):
    """Any random-access source with `"mask"` (float32 [H, W, 1], 1 = regenerate) added to
    each record: record `i` gets mask `i` of `generator`, at its image's size.

    Other attributes (`labels`, `class_names`, ...) are the wrapped source's. The training
    pipeline unwraps it and draws masks by stream position instead (module docstring).

    Args:
      source: the wrapped source (records with `image` [H, W, C]).
      generator: the `MaskGenerator`.
    """

    def __init__(self, source, generator: MaskGenerator):
        self._source = source
        self._generator = generator
        shape = source[0]["image"].shape if len(source) else (1, 1, 1)
        self._size = (int(shape[0]), int(shape[1]))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.add_mask(self._source[index], index)

    def add_mask(self, record: dict[str, Any], index: int) -> dict[str, Any]:
        """`record` with mask `index` of the generator."""
        record = dict(record)
        record["mask"] = self._generator(index, *self._size)
        return record

    def __repr__(self) -> str:
        return f"MaskSource({self._source!r}, {self._generator!r})"

    @property
    def generator(self) -> MaskGenerator:
        return self._generator

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the masks (the images')."""
        return self._size
