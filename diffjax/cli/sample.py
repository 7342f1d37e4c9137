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

Editing (any run, export or pipeline; no special training):

    python launch/sample.py --workdir=DIR --init_images=IMGS.npz --mask=MASKS.npz \
        [--inpaint=blend|repaint --jump_length=10 --jump_n_sample=10] --labels=... --out=OUT.npz
    python launch/sample.py --workdir=DIR --init_images=IMGS.npz --strength=0.6 ... # img2img
    python launch/invert.py --workdir=DIR --images=IMGS.npz --labels=... --steps=50 --out=NOISE.npy
    python launch/sample.py --workdir=DIR --noise=NOISE.npy --method=ddim --steps=50 --guidance=1.0 ...

`IMGS.npz` holds `images` uint8 [N, H, W, C] (as sample.py writes them; or one PNG),
`MASKS.npz` holds `masks` uint8 [N, H, W]: 255 = regenerate, 0 = keep (or one grayscale
PNG). Sample i edits image i % N; --num_samples defaults to N. Inpainting keeps the
unmasked pixels exactly; `--strength` (0, 1] runs the last round(strength * steps) steps
from the image noised to their start, and 1 is plain sampling from the same noise. A
latent model edits the images' VAE latents (the mask downsampled to the latent grid) and
pastes the kept pixels back after decoding. A run trained as an inpainting model
(`inpainting.*`) also sees the mask and the masked image.

ControlNets (spatial control: edges, masks, tiles ...):

    python launch/sample.py --workdir=CN_RUN --control_image=CTRL.npz [--controlnet_scale=1.0] \
        [--labels=none] --num_samples=16 --out=/tmp/cn.npz
    python launch/sample.py --workdir=CN_RUN --control_source=IMGS.npz ...   # the run's transform
    python launch/sample.py --pretrained=SD_DIR --controlnet=CN_DIR --control_image=CTRL.npz \
        --prompt="..." [--controlnet=CN2 --control_image=CTRL2.png] [--controlnet_scale=0.8] \
        [--guess_mode] [--control_guidance_start=0.0 --control_guidance_end=1.0] ...

`CTRL.npz` holds `images` uint8 [N, H, W, C] at the output resolution (or a PNG: one
image); image i draws with control i % N. `--control_source=IMGS.npz` applies the run's own
control transform (`controlnet.control`: edges, sobel, tile, mask) to ordinary images
first. `CN_DIR` is a diffusers `ControlNetModel` directory; several `--controlnet`s take one
`--control_image` each and add their residuals. `--labels=none` samples a class-conditional
model unconditionally (the null class).

`--lora` (with --pretrained, a Stable Diffusion pipeline) merges LoRA files into the
U-Net and text encoder before sampling: diffusers/peft (`pytorch_lora_weights.safetensors`
or its directory) and kohya-ss files; repeated files add. `--lora_scale` is one scale for
all files or one per file (default 1.0), on top of each file's own alpha / rank.
"""

import numpy as np
from absl import flags

from diffjax.cli.common import parse_labels, read_images, read_masks, run, setup_logging

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
_CONTROL_IMAGE = flags.DEFINE_multi_string(
    "control_image",
    None,
    "ControlNet control images: a .npz with uint8 `images` [N, H, W, C] or one PNG; one "
    "per --controlnet.",
)
_CONTROL_SOURCE = flags.DEFINE_string(
    "control_source",
    None,
    "A .npz of ordinary uint8 `images`: the ControlNet run's control transform makes the "
    "control images from them.",
)
_CONTROLNET = flags.DEFINE_multi_string(
    "controlnet", None, "With --pretrained: a diffusers ControlNetModel directory; repeatable."
)
_CONTROLNET_SCALE = flags.DEFINE_multi_float(
    "controlnet_scale", None, "ControlNet conditioning scale: one for all, or one per ControlNet."
)
_GUESS_MODE = flags.DEFINE_bool(
    "guess_mode", None, "ControlNet guess mode (no control on guidance's unconditional branch)."
)
_CONTROL_START = flags.DEFINE_float(
    "control_guidance_start", None, "Fraction of the steps where the ControlNet starts to apply."
)
_CONTROL_END = flags.DEFINE_float(
    "control_guidance_end", None, "Fraction of the steps where the ControlNet stops applying."
)
_INIT_IMAGES = flags.DEFINE_string(
    "init_images",
    None,
    "Images to edit: a .npz with uint8 `images` [N, H, W, C] (as sample.py writes them) or "
    "one PNG; sample i edits image i % N (--num_samples defaults to N). Alone: img2img "
    "with --strength; with --mask: inpainting.",
)
_MASK = flags.DEFINE_string(
    "mask",
    None,
    "Inpainting masks for --init_images: a .npz with uint8 `masks` [N, H, W] or one "
    "grayscale PNG; 255 (>= 128) = regenerate, 0 = keep (Stable Diffusion's convention). "
    "Kept pixels come back exactly.",
)
_STRENGTH = flags.DEFINE_float(
    "strength",
    None,
    "img2img / SDEdit strength in (0, 1] with --init_images: runs the last "
    "round(strength * steps) steps from the image noised to their start (1 = from pure "
    "noise; default 1).",
)
_INPAINT = flags.DEFINE_enum(
    "inpaint",
    "blend",
    ["blend", "repaint"],
    "With --mask: `blend` replaces the kept region by the noised image at every step; "
    "`repaint` adds RePaint's resampling (--jump_length, --jump_n_sample).",
)
_JUMP_LENGTH = flags.DEFINE_integer("jump_length", 10, "RePaint: steps per jump back.")
_JUMP_N_SAMPLE = flags.DEFINE_integer(
    "jump_n_sample", 10, "RePaint: passes over each jump (1 = no resampling)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest good one).")
_NUM = flags.DEFINE_integer("num_samples", 64, "Number of images.")
_OUT = flags.DEFINE_string("out", None, "Output .npz path.", required=True)
_METHOD = flags.DEFINE_string("method", None, "Sampler (default: the run's sample.method).")
_STEPS = flags.DEFINE_integer("steps", None, "Solver steps (default: the run's sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "CFG scale (default: the run's sample.guidance).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_LABELS = flags.DEFINE_list(
    "labels",
    None,
    "Class labels to draw (cycled to --num_samples); `none` = the null class (unconditional).",
)
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
    labels = parse_labels(_LABELS.value)
    noise = _read_noise(_NOISE.value)
    edit = _read_edit()
    num = _NUM.value
    if edit is not None and not flags.FLAGS["num_samples"].present:
        num = len(edit.images)  # one edit per given image
    if (_LORA.value or _LORA_SCALE.value) and not _PRETRAINED.value:
        raise ValueError(
            "--lora/--lora_scale apply to --pretrained=SD_DIR only: a LoRA file is merged "
            "into that pipeline, which is then sampled directly. They do not combine with "
            "--workdir or --export_dir; pass the base pipeline as --pretrained instead."
        )
    if _CONTROLNET.value and not _PRETRAINED.value:
        raise ValueError(
            "--controlnet (a diffusers ControlNetModel directory) goes with --pretrained=SD_DIR; "
            "a ControlNet run (--workdir) has its own."
        )
    if _PRETRAINED.value:
        return _sample_pretrained(labels, noise, edit, num)
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
        if _control_options_given():
            raise ValueError(
                "ControlNet flags apply to a ControlNet run (--workdir) or to --pretrained "
                "with --controlnet; an export samples its own model."
            )
    overrides = dict(method=_METHOD.value, num_steps=_STEPS.value, guidance=_GUIDANCE.value)
    control = None
    if _WORKDIR.value:
        config, control = _run_control(config)
        generator = generate.Generator.from_workdir(
            _WORKDIR.value, step=_STEP.value, config=config, **overrides
        )
    else:
        generator = generate.Generator.from_export(
            _EXPORT_DIR.value, serialized=_SERIALIZED.value, **overrides
        )
    source = _WORKDIR.value or _EXPORT_DIR.value
    sc = generator.config.sample
    print(
        f"{_verb(edit)} {num} images from step {generator.step} of {source} "
        f"({sc.method}, {sc.num_steps} steps, guidance {sc.guidance})."
    )
    npz, png = generate.write_samples(
        _OUT.value,
        generator.batches(
            num,
            seed=_SEED.value,
            labels=labels,
            batch_size=_BATCH.value or 256,
            progress=True,
            noise=noise,
            prompts=_PROMPT.value,
            control=control,
            edit=edit,
        ),
        num,
        generator.image_shape,
        ncols=None if _PROMPT.value or edit else (generator.num_classes or None),
    )
    print(f"Wrote {num} samples to {npz} and a grid to {png}")


def _sample_pretrained(labels, noise, edit, num) -> None:
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
    nets, control, cn_kwargs = _pretrained_controlnets(pipe)
    gen = pipeline.PretrainedGenerator(
        pipe,
        num_steps=_STEPS.value or 50,
        guidance=default_guidance if _GUIDANCE.value is None else _GUIDANCE.value,
        height=_HEIGHT.value,
        width=_WIDTH.value,
        **cn_kwargs,
    )
    sc = gen.config.sample
    print(
        f"{_verb(edit)} {num} images: {pipeline.describe(pipe)}; {sc.num_steps} steps, "
        f"guidance {sc.guidance}."
    )
    for note in pipe.scheduler.differences + pipe.scheduler.grid_differences(sc.num_steps):
        print(f"  differs from diffusers' scheduler: {note}")
    npz, png = generate.write_samples(
        _OUT.value,
        gen.batches(
            num,
            seed=_SEED.value,
            labels=labels,
            prompts=_PROMPT.value,
            negative_prompt=_NEGATIVE.value,
            noise=noise,
            batch_size=_BATCH.value or 16,
            progress=True,
            **({"control": control} if nets else {}),
            **({"edit": edit} if edit is not None else {}),
        ),
        num,
        gen.image_shape,
    )
    print(f"Wrote {num} samples to {npz} and a grid to {png}")


def _verb(edit) -> str:
    if edit is None:
        return "Sampling"
    if edit.masks is None:
        return f"Editing (img2img, strength {edit.strength})"
    return f"Inpainting ({edit.inpaint}, strength {edit.strength})"


def _read_edit():
    """The editing flags as a `sample_fn.Edit` (None without --init_images)."""
    if not _INIT_IMAGES.value:
        given = [
            f"--{name}"
            for name in ("mask", "strength", "inpaint", "jump_length", "jump_n_sample")
            if flags.FLAGS[name].present
        ]
        if given:
            raise ValueError(f"{', '.join(given)} edit given images: pass --init_images too.")
        return None
    from diffjax.sample_fn import Edit

    if not _MASK.value:
        bad = [
            f"--{n}" for n in ("inpaint", "jump_length", "jump_n_sample") if flags.FLAGS[n].present
        ]
        if bad:
            raise ValueError(f"{', '.join(bad)} apply to inpainting: pass --mask too.")
    elif _INPAINT.value == "blend" and any(
        flags.FLAGS[n].present for n in ("jump_length", "jump_n_sample")
    ):
        raise ValueError("--jump_length/--jump_n_sample are RePaint's: add --inpaint=repaint.")
    return Edit(
        images=read_images(_INIT_IMAGES.value, "--init_images"),
        masks=read_masks(_MASK.value, "--mask") if _MASK.value else None,
        strength=1.0 if _STRENGTH.value is None else _STRENGTH.value,
        inpaint=_INPAINT.value,
        jump_length=_JUMP_LENGTH.value,
        jump_n_sample=_JUMP_N_SAMPLE.value,
    )


def _control_options_given() -> bool:
    return bool(
        _CONTROL_IMAGE.value
        or _CONTROL_SOURCE.value
        or _CONTROLNET_SCALE.value
        or _GUESS_MODE.value is not None
        or _CONTROL_START.value is not None
        or _CONTROL_END.value is not None
    )


def _run_control(config):
    """A ControlNet run's sampling options from the flags: (config, control images)."""
    from diffjax import experiment

    if not experiment.is_controlnet(config):
        if _control_options_given():
            raise ValueError(
                "--control_image/--control_source/--controlnet_scale/--guess_mode/"
                "--control_guidance_* apply to ControlNet runs (or --pretrained with "
                "--controlnet); this run has no ControlNet."
            )
        return config, None
    n = config.controlnet
    if _CONTROLNET_SCALE.value:
        if len(_CONTROLNET_SCALE.value) != 1:
            raise ValueError("A ControlNet run has one ControlNet: pass one --controlnet_scale.")
        n.conditioning_scale = _CONTROLNET_SCALE.value[0]
    if _GUESS_MODE.value is not None:
        n.guess_mode = _GUESS_MODE.value
    if _CONTROL_START.value is not None:
        n.guidance_start = _CONTROL_START.value
    if _CONTROL_END.value is not None:
        n.guidance_end = _CONTROL_END.value
    if _CONTROL_IMAGE.value and _CONTROL_SOURCE.value:
        raise ValueError("Pass --control_image or --control_source, not both.")
    if _CONTROL_SOURCE.value:
        from diffjax.data.control import make_control

        images = read_images(_CONTROL_SOURCE.value, "--control_source")
        opts = {k: n[k] for k in ("canny_low", "canny_high", "tile_factor", "mask_threshold")}
        if n.control == "given":
            raise ValueError(
                "This run's controls were given by its dataset (controlnet.control='given'); "
                "pass them with --control_image."
            )
        return config, make_control(images, n.control, channels=n.conditioning_channels, **opts)
    if _CONTROL_IMAGE.value:
        if len(_CONTROL_IMAGE.value) != 1:
            raise ValueError("A ControlNet run has one ControlNet: pass one --control_image.")
        return config, read_images(_CONTROL_IMAGE.value[0], "--control_image")
    return config, None  # the controls of the run's first training records


def _pretrained_controlnets(pipe):
    """--controlnet directories, their control images and the generator's options."""
    if not _CONTROLNET.value:
        if _control_options_given():
            raise ValueError(
                "--control_image/--controlnet_scale/--guess_mode/--control_guidance_* need "
                "--controlnet=CN_DIR (a diffusers ControlNetModel) with --pretrained."
            )
        return [], None, {}
    from diffjax.pretrained import controlnet as cn_io

    if _CONTROL_SOURCE.value:
        raise ValueError(
            "--control_source applies a ControlNet run's own transform; a diffusers "
            "ControlNetModel does not record one. Make the control images and pass "
            "--control_image."
        )
    nets = [cn_io.load_controlnet(d) for d in _CONTROLNET.value]
    for path, net in zip(_CONTROLNET.value, nets, strict=True):
        try:  # residuals that do not fit the U-Net's skips: refused before any compile
            cn_io.check_compatible(net, pipe.denoiser, vae_scale=pipe.vae_scale)
        except ValueError as e:
            raise ValueError(f"--controlnet={path}: {e}") from e
    paths = _CONTROL_IMAGE.value or []
    if len(paths) != len(nets):
        raise ValueError(
            f"{len(nets)} --controlnet(s) need as many --control_image(s), got {len(paths)}."
        )
    scales = _CONTROLNET_SCALE.value or [1.0]
    if len(scales) not in (1, len(nets)):
        raise ValueError(
            f"--controlnet_scale takes one value or one per --controlnet ({len(nets)}), got "
            f"{len(scales)}."
        )
    kwargs = dict(
        controlnets=nets,
        controlnet_scale=list(scales) * (len(nets) if len(scales) == 1 else 1),
        guess_mode=bool(_GUESS_MODE.value),
        control_guidance=(
            0.0 if _CONTROL_START.value is None else _CONTROL_START.value,
            1.0 if _CONTROL_END.value is None else _CONTROL_END.value,
        ),
    )
    control = [read_images(p, "--control_image") for p in paths]
    return nets, control, kwargs


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


def entry() -> None:
    """Console-script entry point (`diffjax-sample`)."""
    run(main)
