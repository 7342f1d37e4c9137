"""The grain pipeline: seeded shuffle, per-process shard, augment, batch, state.

One interface for every source: `make_iterator(source, ...)` returns a grain
`DataLoader` iterator whose `get_state()` / `set_state()` resume at exactly the next
batch, and which Orbax saves beside the train state.
"""

from __future__ import annotations

from typing import Any

import grain.python as grain
import numpy as np


class RandomFlip(grain.RandomMapTransform):
    """Horizontal flip of `image` with probability 1/2 (seeded per record by grain)."""

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if rng.random() < 0.5:
            element = dict(element)
            element["image"] = np.ascontiguousarray(element["image"][:, ::-1])
        return element


def make_loader(
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
) -> grain.DataLoader:
    """A grain DataLoader yielding per-process batches.

    Args:
      source: a random-access source (see `diffjax.data.sources`).
      batch_size: examples per batch on this process (the global batch divided by the
        process count).
      seed: shuffle and augmentation seed.
      process_index, process_count: which contiguous slice of the records this process
        reads.
      shuffle: reshuffle every epoch.
      num_epochs: None repeats forever.
      random_flip: horizontal flip augmentation.
      worker_count: grain worker processes (0 = in this process).
      drop_remainder: drop the last partial batch (training), or keep it (evaluation).
    """
    if len(source) < process_count * (batch_size if drop_remainder else 1):
        raise ValueError(
            f"The data source {source!r} has {len(source)} records, fewer than one batch "
            f"({batch_size} per process x {process_count} processes); lower train.batch_size."
        )
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(
            shard_index=process_index, shard_count=process_count, drop_remainder=True
        ),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    operations: list[Any] = []
    if random_flip:
        operations.append(RandomFlip())
    operations.append(grain.Batch(batch_size=batch_size, drop_remainder=drop_remainder))
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
    )


def make_iterator(source, **kwargs):
    """`iter(make_loader(source, **kwargs))`: a checkpointable batch iterator."""
    return iter(make_loader(source, **kwargs))
