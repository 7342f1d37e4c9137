"""The grain pipeline: seeded shuffle, per-process slice, augment, batch, state.

One interface for every source: `make_iterator(source, ...)` returns a grain dataset
iterator whose `get_state()` / `set_state()` resume at exactly the next batch, and
which Orbax saves beside the train state.

The global stream of examples is defined once, independent of the process count: a
seeded permutation of the records, reshuffled every epoch, cut into global batches.
Process p of P loads only its 1/P slice of each global batch. So the global batch at
step n holds the same examples whether 1 or 8 hosts train, and a run resumed on
another number of hosts sees the same data (with the iterator position carried over).
"""

from __future__ import annotations

import sys
from typing import Any

import grain
import numpy as np

from diffjax.data.masks import MaskSource


class RandomFlip(grain.transforms.RandomMap):
    """Horizontal flip of `image` with probability 1/2 (seeded per example by grain).

    A ControlNet record's `control` is flipped with it (one coin), so they stay aligned.
    """

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if rng.random() < 0.5:
            element = dict(element)
            for key in ("image", "control"):
                if key in element:
                    element[key] = np.ascontiguousarray(element[key][:, ::-1])
        return element


class _AddMask(grain.transforms.MapWithIndex):
    """An inpainting record's `mask`: mask n of the `MaskSource`'s generator for the n-th
    example of the global stream (new masks every epoch, the same on a resume)."""

    def __init__(self, source: MaskSource):
        self._source = source

    def map_with_index(self, index: int, element: dict[str, Any]) -> dict[str, Any]:
        return self._source.add_mask(element, index)


class _ProcessSlice(grain.MapDataset):
    """Local example i of process p = global example (i // L) * G + p * L + i % L."""

    def __init__(
        self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int
    ):
        super().__init__(parent)
        self._global = global_batch
        self._local = global_batch // process_count
        self._offset = process_index * self._local

    def __len__(self) -> int:
        n = len(self._parents[0])
        return n if n >= sys.maxsize // 2 else n // self._global * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, k = divmod(index, self._local)
        return self._parents[0][batch * self._global + self._offset + k]

    def __str__(self) -> str:
        return f"ProcessSlice(global={self._global}, local={self._local}, offset={self._offset})"


def make_dataset(
    source,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
    random_flip: bool = False,
    worker_count: int = 0,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """A grain dataset of per-process batches.

    Args:
      source: a random-access source (see `diffjax.data.sources`). A `MaskSource`
        (inpainting) is unwrapped: example n of the global stream gets mask n of its
        generator, so masks change every epoch (`diffjax.data.masks`).
      batch_size: examples per batch on this process (the global batch divided by the
        process count).
      seed: shuffle and augmentation seed.
      process_index, process_count: which slice of each global batch this process loads.
      shuffle: a seeded permutation, new every epoch.
      num_epochs: None repeats forever.
      random_flip: horizontal flip augmentation.
      worker_count: grain worker processes (0 = in this process).
      drop_remainder: drop the last partial batch (training), or keep it (evaluation).
    """
    global_batch = batch_size * process_count
    if len(source) < global_batch and drop_remainder:
        raise ValueError(
            f"The data source {source!r} has {len(source)} records, fewer than one global "
            f"batch ({batch_size} per process x {process_count} processes); lower train.batch_size."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count}).")
    masks = source if isinstance(source, MaskSource) else None
    ds = grain.MapDataset.source(source if masks is None else masks.source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if masks is not None:
        # By position in the global stream, before slicing: independent of the process count.
        ds = ds.map_with_index(_AddMask(masks))
    if random_flip:
        # Before slicing, so an example's flip depends on its global position only.
        ds = ds.random_map(RandomFlip(), seed=seed + 1)
    if process_count > 1:
        ds = _ProcessSlice(ds, global_batch, process_index, process_count)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    it = ds.to_iter_dataset()
    if worker_count > 0:
        it = it.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=worker_count))
    return it


def make_iterator(source, **kwargs):
    """`iter(make_dataset(source, **kwargs))`: a checkpointable batch iterator."""
    return iter(make_dataset(source, **kwargs))
