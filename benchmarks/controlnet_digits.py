"""ControlNet on the digits, measured: do samples follow the edges of held-out digits?

    python benchmarks/controlnet_digits.py [--root=runs/controlnet_digits] [--samples=500]

1. Trains the class-conditional digits base (`configs/digits.py`) on the digits of
   `half0` unless ROOT/base has a checkpoint (`half1` is never trained on).
2. Trains a ControlNet on the Canny edges of the `half0` digits beside the frozen base
   (`configs/digits_controlnet.py`) unless ROOT/controlnet has a checkpoint.
3. Samples `--samples` images with `--labels=none` (the null class) from the edges of
   the first held-out `half1` digits (the `--control_source` path: the run's transform on
   ordinary images), and the same from the base alone (no control).
4. Edge agreement: the Pearson correlation between a sample's Canny edges and its own
   control, against the correlation with another digit's control (the controls rolled by
   one); and the digits classifier's accuracy on the class of each control's source digit.
   Prints and writes ROOT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.digits_common import held_out, train_half0_base  # noqa: E402
from configs.digits_controlnet import get_config as controlnet_config  # noqa: E402
from diffjax.data.control import make_control  # noqa: E402
from diffjax.eval.digits import reference  # noqa: E402
from diffjax.generate import Generator  # noqa: E402
from diffjax.train import train_and_evaluate  # noqa: E402


def edge_correlation(samples: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """Per-pair Pearson correlation of the samples' Canny edges with `controls` (0 where
    either map is constant)."""
    edges = make_control(samples, "edges", channels=1).reshape(len(samples), -1)
    ctrl = controls.reshape(len(controls), -1)
    out = np.zeros(len(samples))
    for i, (a, b) in enumerate(zip(edges, ctrl, strict=True)):
        if a.std() > 0 and b.std() > 0:
            out[i] = np.corrcoef(a, b)[0, 1]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/controlnet_digits")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--base_steps", type=int, default=None)
    p.add_argument("--controlnet_steps", type=int, default=None)
    args = p.parse_args()
    root = os.path.abspath(args.root)
    base, cn = os.path.join(root, "base"), os.path.join(root, "controlnet")
    timings = {}
    train_half0_base(base, args.base_steps, timings)
    if not os.path.isdir(os.path.join(cn, "checkpoints")):
        c = controlnet_config()
        c.base_workdir = base
        if args.controlnet_steps:
            c.train.num_steps = args.controlnet_steps
        t = time.perf_counter()
        train_and_evaluate(c, cn)
        timings["controlnet_s"] = time.perf_counter() - t

    images, labels = held_out(args.samples)
    gen = Generator.from_workdir(cn)
    n = gen.config.controlnet
    controls = make_control(
        images,
        n.control,
        channels=n.conditioning_channels,
        canny_low=n.canny_low,
        canny_high=n.canny_high,
    )
    x, _ = gen.generate(len(images), labels="none", control=controls, seed=1, batch_size=500)
    plain, _ = Generator.from_workdir(base).generate(
        len(images), labels="none", seed=1, batch_size=500
    )
    clf = reference()["classifier"]
    shuffled = np.roll(controls, 1, axis=0)
    results = {
        "samples": len(images),
        "controlnet": {
            "edge_corr_own": float(edge_correlation(x, controls).mean()),
            "edge_corr_shuffled": float(edge_correlation(x, shuffled).mean()),
            "accuracy_vs_control_class": float(np.mean(clf.predict(x) == labels)),
        },
        "base_unconditional": {
            "edge_corr_own": float(edge_correlation(plain, controls).mean()),
            "edge_corr_shuffled": float(edge_correlation(plain, shuffled).mean()),
            "accuracy_vs_control_class": float(np.mean(clf.predict(plain) == labels)),
        },
        "timings_s": timings,
        "control": n.control,
        "controlnet_steps": int(gen.config.train.num_steps),
    }
    print(json.dumps(results, indent=2))
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
