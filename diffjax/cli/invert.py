"""Inverts images to the noise that regenerates them (DDIM / DPM-Solver++(2M) inversion).

    python launch/invert.py --workdir=DIR --images=IMGS.npz [--labels=3,7 | --prompt="..."] \
        [--method=ddim --steps=50 --guidance=1.0] --out=NOISE.npy
    python launch/sample.py --workdir=DIR --noise=NOISE.npy --method=ddim --steps=50 \
        --guidance=1.0 [--labels=3,7 | --prompt="..."] --num_samples=N --out=/tmp/back.npz

`--export_dir` and `--pretrained` (a diffusers pipeline) work the same way. `IMGS.npz`
holds `images` uint8 [N, H, W, C] (as sample.py writes them; or one PNG) at the model's
output size. NOISE.npy is float32 [N, h, w, c] (NHWC; the latent shape for latent
models): what `sample.py --noise` starts from. Sampling it back with the same method,
steps, guidance and condition regenerates the images up to the solver's error (first
order in the steps for DDIM, second for dpmpp_2m). Edit by sampling it back with another
label or prompt. Guidance above 1 makes the inversion less exact (Mokady et al. 2023).
"""

import os

import numpy as np
from absl import flags

from diffjax.cli.common import parse_labels, read_images, run, setup_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (EMA params).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Export directory.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "A diffusers pipeline directory.")
_IMAGES = flags.DEFINE_string(
    "images", None, "A .npz with uint8 `images` [N, H, W, C] or one PNG.", required=True
)
_OUT = flags.DEFINE_string("out", None, "Output .npy path (float32 noise).", required=True)
_LABELS = flags.DEFINE_list(
    "labels", None, "Class label of each image (cycled); `none` = the null class."
)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt(s) of the images (cycled).")
_NEGATIVE = flags.DEFINE_string(
    "negative_prompt", "", "With --pretrained: guidance's unconditional prompt."
)
_METHOD = flags.DEFINE_enum("method", "ddim", ["ddim", "dpmpp_2m"], "Inversion method.")
_STEPS = flags.DEFINE_integer("steps", None, "Solver steps (default: the run's sample.num_steps).")
_GUIDANCE = flags.DEFINE_float(
    "guidance", 1.0, "CFG scale used in the inversion (1.0: the conditional model alone)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest good one).")
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "Images per device call (default 256; 16 with --pretrained)."
)


def main(argv):
    del argv
    setup_logging()
    sources = [v for v in (_WORKDIR.value, _EXPORT_DIR.value, _PRETRAINED.value) if v]
    if len(sources) != 1:
        raise ValueError("Pass exactly one of --workdir, --export_dir or --pretrained.")
    if not _OUT.value.endswith(".npy"):
        raise ValueError(f"--out must end in .npy, got {_OUT.value!r}.")
    if _PROMPT.value and _LABELS.value:
        raise ValueError("Pass --prompt or --labels, not both.")
    if _NEGATIVE.value and not _PRETRAINED.value:
        raise ValueError("--negative_prompt applies to --pretrained only.")
    labels = parse_labels(_LABELS.value)
    images = read_images(_IMAGES.value, "--images")
    options = dict(method=_METHOD.value, num_steps=_STEPS.value, guidance=_GUIDANCE.value)
    if _PRETRAINED.value:
        from diffjax.pretrained import pipeline

        pipe = pipeline.load_pipeline(_PRETRAINED.value, method=_METHOD.value)
        gen = pipeline.PretrainedGenerator(
            pipe,
            num_steps=_STEPS.value or 50,
            guidance=_GUIDANCE.value,
            height=images.shape[1],
            width=images.shape[2],
        )
        kwargs = dict(negative_prompt=_NEGATIVE.value, batch_size=_BATCH.value or 16)
    else:
        from diffjax import experiment, generate

        if _WORKDIR.value:
            from diffjax.rundir import load_workdir_config

            config = load_workdir_config(_WORKDIR.value)
            experiment.require_diffusion(config, _WORKDIR.value, "invert.py")
            if experiment.is_controlnet(config):
                raise ValueError(
                    "invert.py does not take control images; invert with the ControlNet's "
                    "base run (--workdir=BASE) instead."
                )
            gen = generate.Generator.from_workdir(
                _WORKDIR.value, step=_STEP.value, config=config, **options
            )
        else:
            gen = generate.Generator.from_export(_EXPORT_DIR.value, **options)
        kwargs = dict(batch_size=_BATCH.value or 256)
    sc = gen.config.sample
    print(
        f"Inverting {len(images)} images ({_METHOD.value}, {sc.num_steps} steps, guidance "
        f"{sc.guidance})."
    )
    noise = gen.invert(
        images, labels=labels, prompts=_PROMPT.value, method=_METHOD.value, progress=True, **kwargs
    )
    directory = os.path.dirname(os.path.abspath(_OUT.value))
    os.makedirs(directory, exist_ok=True)
    tmp = _OUT.value[: -len(".npy")] + ".tmp.npy"
    np.save(tmp, noise.astype(np.float32))
    os.replace(tmp, _OUT.value)
    src = (
        f"--workdir={_WORKDIR.value}"
        if _WORKDIR.value
        else f"--export_dir={_EXPORT_DIR.value}"
        if _EXPORT_DIR.value
        else f"--pretrained={_PRETRAINED.value}"
    )
    print(f"Wrote noise {list(noise.shape)} to {_OUT.value}. Regenerate with:")
    print(
        f"  python launch/sample.py {src} --noise={_OUT.value} --method={_METHOD.value} "
        f"--steps={sc.num_steps} --guidance={sc.guidance} --num_samples={len(noise)} "
        "[the same --labels/--prompt] --out=OUT.npz"
    )


def entry() -> None:
    """Console-script entry point (`diffjax-invert`)."""
    run(main)
