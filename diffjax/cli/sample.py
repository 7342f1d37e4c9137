"""Draws samples from a trained run (EMA params), an export, or a diffusers pipeline.

    python launch/sample.py --workdir=runs/digits --num_samples=100 --out=/tmp/s.npz \
        [--method=dpmpp_2m --steps=20 --guidance=3.0 --seed=0 --labels=3,3,7]
    python launch/sample.py --pretrained=SD_DIR --prompt="a photo of a cat" \
        [--negative_prompt=""] --num_samples=4 --out=/tmp/cat.npz \
        [--method=ddim --steps=20 --guidance=7.5 --seed=0 --height=512 --width=512]
    python launch/sample.py --pretrained=DIT_DIR --labels=207,360 --num_samples=2 ...
    python launch/sample.py --workdir=runs/sd_ft --prompt="a photo of ..." --num_samples=4 ...
    python launch/sample.py --pretrained=SD_DIR --lora=style.safetensors [--lora=DIR2] \
        [--lora_scale=0.8 [--lora_scale=0.5]] --prompt="..." --num_samples=4 --out=/tmp/s.npz

Writes FILE.npz with `images` (uint8 [N, H, W, C]) and `labels` (int [N]; class-
conditional models cycle 0..K-1 unless --labels is given) and a PNG grid beside it.
`--noise=NOISE.npy` (float32 [N, h, w, c], NHWC standard normal; the latent shape for
latent models, before any init_noise_sigma scaling) replaces the draw from --seed, so
a run of another framework can be reproduced.

`--lora` (with --pretrained, a Stable Diffusion pipeline) merges LoRA files into the
U-Net and text encoder before sampling: diffusers/peft (`pytorch_lora_weights.safetensors`
or its directory) and kohya-ss files; repeated files add. `--lora_scale` is one scale for
all files or one per file (default 1.0), on top of each file's own alpha / rank.
"""

import numpy as np
from absl import flags

from diffjax.cli.common import run, setup_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to sample from (EMA params).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Export directory to sample from.")
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "A diffusers pipeline directory (model_index.json) to sample from."
)
_PROMPT = flags.DEFINE_multi_string(
    "prompt",
    None,
    "Text prompt(s) for a text-to-image pipeline or run (repeat for several; cycled).",
)
_NEGATIVE = flags.DEFINE_string(
    "negative_prompt", "", "Prompt of guidance's unconditional branch (default: empty)."
)
_NOISE = flags.DEFINE_string(
    "noise", None, "A .npy of float32 [N, h, w, c] initial noise replacing the --seed draw."
)
_HEIGHT = flags.DEFINE_integer("height", None, "Output height in pixels (--pretrained).")
_WIDTH = flags.DEFINE_integer("width", None, "Output width in pixels (--pretrained).")
_LORA = flags.DEFINE_multi_string(
    "lora",
    None,
    "With --pretrained: a LoRA .safetensors file (or the directory holding "
    "pytorch_lora_weights.safetensors) to merge; repeat for several.",
)
_LORA_SCALE = flags.DEFINE_multi_float(
    "lora_scale", None, "Scale of the --lora files: one for all, or one per file (default 1.0)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest good one).")
_NUM = flags.DEFINE_integer("num_samples", 64, "Number of images.")
_OUT = flags.DEFINE_string("out", None, "Output .npz path.", required=True)
_METHOD = flags.DEFINE_string("method", None, "Sampler (default: the run's sample.method).")
_STEPS = flags.DEFINE_integer("steps", None, "Solver steps (default: the run's sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "CFG scale (default: the run's sample.guidance).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_LABELS = flags.DEFINE_list("labels", None, "Class labels to draw (cycled to --num_samples).")
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "Images per device call (default 256; 16 with --pretrained)."
)
_SERIALIZED = flags.DEFINE_bool(
    "serialized",
    False,
    "With --export_dir: run the exported jax.export sampler, not diffjax's code.",
)


def main(argv):
    del argv
    setup_logging()
    sources = [v for v in (_WORKDIR.value, _EXPORT_DIR.value, _PRETRAINED.value) if v]
    if len(sources) != 1:
        raise ValueError("Pass exactly one of --workdir, --export_dir or --pretrained.")
    if not _OUT.value.endswith(".npz"):
        raise ValueError(
            f"--out must end in .npz (a PNG grid is written beside it), got {_OUT.value!r}."
        )
    if _NUM.value < 1:
        raise ValueError(f"--num_samples must be >= 1, got {_NUM.value}.")
    labels = _parse_labels(_LABELS.value)
    noise = _read_noise(_NOISE.value)
    if (_LORA.value or _LORA_SCALE.value) and not _PRETRAINED.value:
        raise ValueError(
            "--lora/--lora_scale apply to --pretrained=SD_DIR only: a LoRA file is merged "
            "into that pipeline, which is then sampled directly. They do not combine with "
            "--workdir or --export_dir; pass the base pipeline as --pretrained instead."
        )
    if _PRETRAINED.value:
        return _sample_pretrained(labels, noise)
    if _HEIGHT.value or _WIDTH.value or _NEGATIVE.value:
        raise ValueError("--height, --width and --negative_prompt apply to --pretrained only.")
    if _PROMPT.value and labels:
        raise ValueError("Pass --prompt or --labels, not both.")
    from diffjax import experiment, generate

    if _WORKDIR.value:
        from diffjax.rundir import load_workdir_config

        config = load_workdir_config(_WORKDIR.value)
        experiment.require_diffusion(config, _WORKDIR.value, "sample.py")
    else:
        _refuse_vae_export(_EXPORT_DIR.value)
    overrides = dict(method=_METHOD.value, num_steps=_STEPS.value, guidance=_GUIDANCE.value)
    if _WORKDIR.value:
        generator = generate.Generator.from_workdir(_WORKDIR.value, step=_STEP.value, **overrides)
    else:
        generator = generate.Generator.from_export(
            _EXPORT_DIR.value, serialized=_SERIALIZED.value, **overrides
        )
    source = _WORKDIR.value or _EXPORT_DIR.value
    sc = generator.config.sample
    print(
        f"Sampling {_NUM.value} images from step {generator.step} of {source} "
        f"({sc.method}, {sc.num_steps} steps, guidance {sc.guidance})."
    )
    npz, png = generate.write_samples(
        _OUT.value,
        generator.batches(
            _NUM.value,
            seed=_SEED.value,
            labels=labels,
            batch_size=_BATCH.value or 256,
            progress=True,
            noise=noise,
            prompts=_PROMPT.value,
        ),
        _NUM.value,
        generator.image_shape,
        ncols=None if _PROMPT.value else (generator.num_classes or None),
    )
    print(f"Wrote {_NUM.value} samples to {npz} and a grid to {png}")


def _sample_pretrained(labels, noise) -> None:
    from diffjax import generate
    from diffjax.pretrained import lora_files, pipeline

    loras = lora_files.pair_scales(_LORA.value, _LORA_SCALE.value)
    for path, _ in loras:
        lora_files.lora_file(path)  # a missing file or a pickle fails before the load
    pipe = pipeline.load_pipeline(_PRETRAINED.value, method=_METHOD.value)
    if loras:
        pipe = lora_files.apply_lora_files(pipe, loras)
        print(f"Merged LoRA {lora_files.describe_files(loras)} (the files are only read).")
    default_guidance = {"text": 7.5, "label": 4.0}.get(pipe.kind, 1.0)
    gen = pipeline.PretrainedGenerator(
        pipe,
        num_steps=_STEPS.value or 50,
        guidance=default_guidance if _GUIDANCE.value is None else _GUIDANCE.value,
        height=_HEIGHT.value,
        width=_WIDTH.value,
    )
    sc = gen.config.sample
    print(
        f"Sampling {_NUM.value} images: {pipeline.describe(pipe)}; {sc.num_steps} steps, "
        f"guidance {sc.guidance}."
    )
    for note in pipe.scheduler.differences + pipe.scheduler.grid_differences(sc.num_steps):
        print(f"  differs from diffusers' scheduler: {note}")
    npz, png = generate.write_samples(
        _OUT.value,
        gen.batches(
            _NUM.value,
            seed=_SEED.value,
            labels=labels,
            prompts=_PROMPT.value,
            negative_prompt=_NEGATIVE.value,
            noise=noise,
            batch_size=_BATCH.value or 16,
            progress=True,
        ),
        _NUM.value,
        gen.image_shape,
    )
    print(f"Wrote {_NUM.value} samples to {npz} and a grid to {png}")


def _refuse_vae_export(path: str) -> None:
    """An autoencoder's export (a diffusers AutoencoderKL directory) cannot sample."""
    import json
    import os

    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return
    try:
        with open(cfg) as f:
            cls = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return
    if cls == "AutoencoderKL":
        raise ValueError(
            f"{path} is an AutoencoderKL (an autoencoder export); sample.py needs a diffusion "
            f"model. Encode a dataset with `python launch/encode_latents.py --vae={path} ...` "
            f"and train a latent model with latent.vae={path}."
        )


def _read_noise(path: str | None):
    if not path:
        return None
    if not path.endswith(".npy"):
        raise ValueError(f"--noise takes a .npy file of float32 [N, h, w, c], got {path!r}.")
    return np.load(path)


def _parse_labels(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    bad = [v for v in values if not v.strip().lstrip("-").isdigit()]
    if bad:
        raise ValueError(f"--labels takes class indices such as --labels=3,3,7; got {bad}.")
    return [int(v) for v in values]


def entry() -> None:
    """Console-script entry point (`diffjax-sample`)."""
    run(main)
