"""DreamBooth on the digits, measured: a mirrored three bound to "sks", with and without
prior preservation.

    python benchmarks/dreambooth_digits.py [--root=runs/dreambooth_digits] [--instances=8]

1. Trains the text-conditioned digits base (`configs/digits_text.py`, 1,500 steps) unless
   ROOT/base has a checkpoint.
2. Writes the instance images: the first `--instances` threes of the digits, mirrored
   left-right (a variant the base never saw: the digits classifier calls only 2 % of
   mirrored threes a three).
3. Fine-tunes the whole base (`configs/digits_dreambooth.py`) twice: with prior
   preservation (the base's own 500 images of its ten class captions, weight 1) and
   without it (weight 0).
4. Judges 500 samples of "a handwritten sks three" (the variant is seen when the
   mirrored-back sample is classified a three and the sample itself is not) and 50
   samples of each class caption (the classifier's accuracy; "others" = the nine classes
   but three), for the base and both runs. Prints and writes ROOT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.digits_dreambooth import get_config as dreambooth_config  # noqa: E402
from configs.digits_text import get_config as text_config  # noqa: E402
from diffjax.data.captions import DIGIT_NAMES  # noqa: E402
from diffjax.data.sources import load_digits_arrays  # noqa: E402
from diffjax.eval.digits import reference  # noqa: E402
from diffjax.generate import Generator  # noqa: E402
from diffjax.train import train_and_evaluate  # noqa: E402

VARIANT_CLASS = 3


def judge(workdir: str, per_class: int, variant_samples: int, prompt: str) -> dict:
    clf = reference()["classifier"]
    gen = Generator.from_workdir(workdir)
    out = {}
    x, _ = gen.generate(variant_samples, prompts=[prompt], seed=1, batch_size=500)
    as_is, mirrored_back = clf.predict(x), clf.predict(x[:, :, ::-1])
    out["variant_rate"] = float(
        np.mean((mirrored_back == VARIANT_CLASS) & (as_is != VARIANT_CLASS))
    )
    captions = [f"a handwritten {n}" for n in DIGIT_NAMES]
    x, idx = gen.generate(per_class * 10, prompts=captions, seed=2, batch_size=500)
    pred = clf.predict(x)
    acc = {DIGIT_NAMES[k]: float(np.mean(pred[idx == k] == k)) for k in range(10)}
    out["class_accuracy"] = acc
    others = [k for k in range(10) if k != VARIANT_CLASS]
    out["others_accuracy"] = float(np.mean([acc[DIGIT_NAMES[k]] for k in others]))
    out["all_accuracy"] = float(np.mean(pred == idx))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/dreambooth_digits")
    p.add_argument("--instances", type=int, default=8)
    p.add_argument("--base_steps", type=int, default=1500)
    args = p.parse_args()
    root = os.path.abspath(args.root)
    timings = {}
    base = os.path.join(root, "base")
    if not os.path.isdir(os.path.join(base, "checkpoints")):
        c = text_config()
        c.train.num_steps = args.base_steps
        c.sample.num_images = 0
        t = time.perf_counter()
        train_and_evaluate(c, base)
        timings["base_s"] = time.perf_counter() - t
    inst = os.path.join(root, "instances")
    os.makedirs(inst, exist_ok=True)
    from PIL import Image

    images, labels = load_digits_arrays()
    for i, img in enumerate(images[labels == VARIANT_CLASS][: args.instances]):
        Image.fromarray(np.ascontiguousarray(img[:, ::-1, 0])).save(os.path.join(inst, f"{i}.png"))
    results = {"base": judge(base, 50, 500, "a handwritten sks three")}
    for name, weight in (("prior", 1.0), ("no_prior", 0.0)):
        c = dreambooth_config()
        c.base_workdir, c.dreambooth.instance_dir = base, inst
        c.dreambooth.prior_loss_weight = weight
        c.dreambooth.class_dir = os.path.join(root, "class_images")
        workdir = os.path.join(root, name)
        t = time.perf_counter()
        train_and_evaluate(c, workdir)
        timings[f"{name}_s"] = time.perf_counter() - t
        results[name] = judge(workdir, 50, 500, c.dreambooth.instance_prompt)
    results["timings_s"] = timings
    results["instances"] = args.instances
    print(json.dumps(results, indent=2))
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
