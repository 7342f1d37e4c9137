"""Editing on the digits, measured: inpainting, inversion and img2img with a trained model.

    python benchmarks/editing_digits.py [--root=runs/editing_digits] [--samples=500]

1. Trains the class-conditional digits model (`configs/digits.py`) on the `half0`
   digits unless ROOT/base has a checkpoint (`half1` is never trained on).
2. Inpainting: the bottom half of the first `--samples` held-out `half1` digits is
   regenerated, asking for each digit's own class (blend, and RePaint), with the run's
   sampler; checks that every kept pixel comes back exactly and reports the digits
   classifier's accuracy on the requested class.
3. Inversion: DDIM (and DPM-Solver++(2M)) inversion of the held-out digits with 50 steps
   and guidance 1, then sampling back with the same method: PSNR to the originals (of the
   pooled MSE, and the median per image).
4. img2img: strength 1 against plain sampling from the same seed (bit for bit), and the
   classifier accuracy and PSNR to the source at lower strengths.

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
from diffjax.eval.digits import reference  # noqa: E402
from diffjax.generate import Generator  # noqa: E402
from diffjax.sample_fn import Edit  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def median_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.median([psnr(x, y) for x, y in zip(a, b, strict=True)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/editing_digits")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--base_steps", type=int, default=None)
    p.add_argument("--inversion_steps", type=int, default=50)
    args = p.parse_args()
    root = os.path.abspath(args.root)
    base = os.path.join(root, "base")
    timings: dict[str, float] = {}
    train_half0_base(base, args.base_steps, timings)

    images, labels = held_out(args.samples)
    n = len(images)
    clf = reference()["classifier"]
    gen = Generator.from_workdir(base)
    sc = gen.config.sample
    results: dict = {
        "samples": n,
        "sampler": {"method": sc.method, "steps": int(sc.num_steps), "guidance": sc.guidance},
        "base_steps": int(gen.config.train.num_steps),
    }

    # Inpainting: the bottom half regenerated, the digit's own class requested.
    masks = np.zeros(images.shape[:3], np.uint8)
    masks[:, 4:] = 255
    inpaint = {}
    for name, edit in {
        "blend": Edit(images, masks),
        "repaint_j5_r5": Edit(images, masks, inpaint="repaint", jump_length=5, jump_n_sample=5),
    }.items():
        t = time.perf_counter()
        x, _ = gen.generate(n, labels=labels, seed=1, batch_size=500, edit=edit)
        timings[f"inpaint_{name}_s"] = time.perf_counter() - t
        inpaint[name] = {
            "kept_pixels_exact": bool(np.array_equal(x[:, :4], images[:, :4])),
            "accuracy_requested_class": float(np.mean(clf.predict(x) == labels)),
            "psnr_regenerated_half": psnr(x[:, 4:], images[:, 4:]),
        }
    # Reference points: the classifier on the real digits and on the masked ones.
    half = images.copy()
    half[:, 4:] = 0
    inpaint["real_digits_accuracy"] = float(np.mean(clf.predict(images) == labels))
    inpaint["bottom_half_zeroed_accuracy"] = float(np.mean(clf.predict(half) == labels))
    results["inpaint_bottom_half"] = inpaint

    # Inversion at guidance 1, then sampling back with the same method and steps.
    k = args.inversion_steps
    inversion = {"steps": k}
    for method in ("ddim", "dpmpp_2m"):
        inv = Generator.from_workdir(base, method=method, num_steps=k, guidance=1.0)
        t = time.perf_counter()
        noise = inv.invert(images, labels=labels, method=method, batch_size=500)
        back, _ = inv.generate(n, labels=labels, noise=noise, batch_size=500)
        timings[f"invert_{method}_s"] = time.perf_counter() - t
        inversion[method] = {
            "psnr": psnr(back, images),
            "median_psnr": median_psnr(back, images),
            "noise_std": float(noise.std()),
        }
    results["inversion"] = inversion

    # img2img.
    plain, _ = gen.generate(n, labels=labels, seed=2, batch_size=500)
    same, _ = gen.generate(n, labels=labels, seed=2, batch_size=500, edit=Edit(images))
    img2img = {"strength_1_equals_plain_sampling": bool(np.array_equal(plain, same))}
    for strength in (0.3, 0.6):
        x, _ = gen.generate(
            n, labels=labels, seed=2, batch_size=500, edit=Edit(images, strength=strength)
        )
        img2img[f"strength_{strength}"] = {
            "psnr_to_source": psnr(x, images),
            "accuracy_source_class": float(np.mean(clf.predict(x) == labels)),
        }
    img2img["plain_sampling_psnr_to_source"] = psnr(plain, images)
    results["img2img"] = img2img
    results["timings_s"] = timings
    print(json.dumps(results, indent=2))
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
