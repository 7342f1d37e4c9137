"""Shared pieces of the digits experiments (controlnet_digits, editing_digits): the
class-conditional base trained on the `half0` digits and the held-out `half1` digits."""

from __future__ import annotations

import os
import time

import numpy as np

from configs.digits import get_config
from diffjax.data.sources import digits_source
from diffjax.images import to_uint8
from diffjax.train import train_and_evaluate


def train_half0_base(workdir: str, steps: int | None, timings: dict[str, float]) -> None:
    """Trains `configs/digits.py` on the `half0` digits into `workdir` unless it has a
    checkpoint (`half1` is never trained on); its time goes to `timings["base_s"]`."""
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    c = get_config()
    c.data.split = "half0"
    c.eval.every_steps = 0
    if steps:
        c.train.num_steps = steps
    t = time.perf_counter()
    train_and_evaluate(c, workdir)
    timings["base_s"] = time.perf_counter() - t


def held_out(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` `half1` digits: uint8 [n, 8, 8, 1] and their labels."""
    src = digits_source("half1")
    n = min(n, len(src))
    images = np.stack([to_uint8(src[i]["image"]) for i in range(n)])
    return images, np.asarray([src[i]["labels"] for i in range(n)], np.int32)
