"""Synthetic data and memorization on the digits, measured (issue 17's acceptance runs).

    python benchmarks/synthetic_digits.py [--root=runs/synthetic_digits]

1. The demo model (`configs/digits.py`: all 1,797 digits, 1,300 steps) unless ROOT/demo
   has a checkpoint; evaluated as `launch/evaluate.py` does (1,000 samples): memorization
   (copy fraction, nearest distances), class balance, classification accuracy score.
2. A memorizing model: the same config on `data.num_examples=10` digits for 3,000 steps
   (batch 10), evaluated the same way.
3. `launch/make_dataset.py` of 1,000 demo digits as an image folder; the classification
   accuracy score of that folder on real held-out digits (`--cas_dataset`'s code), beside
   the same classifier fit on as many real digits.
4. A run that mixes the synthetic folder with the real digits (`data.mix`, half each)
   trains 300 steps; its evaluation is reported.

Prints and writes ROOT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT_DIR)

from configs.digits import get_config  # noqa: E402
from diffjax.eval.digits import classification_accuracy_score, load_labelled_digits  # noqa: E402
from diffjax.eval.evaluate import evaluate_generator  # noqa: E402
from diffjax.generate import Generator  # noqa: E402
from diffjax.train import train_and_evaluate  # noqa: E402


def _train(workdir: str, config, timings: dict, name: str) -> None:
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    t = time.perf_counter()
    train_and_evaluate(config, workdir)
    timings[f"train_{name}_s"] = time.perf_counter() - t


def _evaluate(workdir: str, num_samples: int) -> dict:
    gen = Generator.from_workdir(workdir)
    m = evaluate_generator(gen, num_samples=num_samples, batch_size=500)
    keep = ("conditional_accuracy", "frechet_distance", "memorization", "class_balance")
    out = {k: m[k] for k in keep if k in m}
    out.update({k: v for k, v in m.items() if k.startswith("cas")})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/synthetic_digits")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--memorize_steps", type=int, default=3000)
    p.add_argument("--mix_steps", type=int, default=300)
    args = p.parse_args()
    root = os.path.abspath(args.root)
    timings: dict[str, float] = {}
    results: dict = {"samples": args.samples}

    demo = os.path.join(root, "demo")
    c = get_config()
    c.eval.every_steps = 0
    _train(demo, c, timings, "demo")
    results["demo"] = _evaluate(demo, args.samples)

    small = os.path.join(root, "ten_images")
    c = get_config()
    c.data.num_examples = 10
    c.train.batch_size = 10
    c.train.num_steps = args.memorize_steps
    c.eval.every_steps = 0
    c.sample.num_images = 0
    _train(small, c, timings, "ten_images")
    results["ten_images"] = _evaluate(small, args.samples)

    synth = os.path.join(root, "synthetic")
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT_DIR, "launch", "make_dataset.py"),
            f"--workdir={demo}",
            f"--num_samples={args.samples}",
            f"--out={synth}",
            "--format=folder",
        ],
        check=True,
    )
    timings["make_dataset_s"] = time.perf_counter() - t
    images, labels = load_labelled_digits(synth)
    results["make_dataset"] = {
        "num_images": int(len(images)),
        "per_class": [int((labels == k).sum()) for k in range(10)],
        **classification_accuracy_score(images, labels),
    }

    mixed = os.path.join(root, "mixed")
    c = get_config()
    c.data.mix = f"folder:{synth}:0.5"
    c.train.num_steps = args.mix_steps
    c.eval.every_steps = 0
    c.sample.num_images = 0
    _train(mixed, c, timings, "mixed")
    results["mixed"] = _evaluate(mixed, args.samples)

    results["timings_s"] = timings
    print(json.dumps(results, indent=2))
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
