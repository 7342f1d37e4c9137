"""DiT on ImageNet 256x256 latents (Peebles & Xie 2023): `configs/imagenet256_dit.py:VARIANT`.

VARIANT is one of S/2 S/4 S/8 B/2 B/4 B/8 L/2 L/4 L/8 XL/2 XL/4 XL/8 (default XL/2).
The model sees the 32x32x4 Stable-Diffusion VAE latents of 256x256 images (scaled by
0.18215), precomputed into an .npz / .npy directory with `latents` and `labels`.
1000 classes with a null class for guidance, learned sigma, linear schedule.

    python launch/train.py --config=configs/imagenet256_dit.py:XL/2 --workdir=runs/dit \
        --config.data.data_dir=/data/imagenet256_latents
"""

import ml_collections

from diffjax.config import get_base_config
from diffjax.models import preset_kwargs

VARIANTS = tuple(f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "XL/2"
    if variant not in VARIANTS:
        raise ValueError(f"DiT variant must be one of {VARIANTS}, got {variant!r}.")
    c = get_base_config()
    c.data.source = "latents"
    c.data.image_size = 32
    c.data.channels = 4
    c.data.num_classes = 1000
    c.data.random_flip = False  # Latents are flipped when precomputed, if at all.

    c.model.name = "dit"
    c.model.kwargs = ml_collections.ConfigDict(preset_kwargs(f"DiT-{variant}"))
    # True: the blocks as one nn.scan, the same function; XL/2's train step compiled
    # 2.5-3.8x faster (BENCHMARKS.md, scan_layers). The params are stacked, so a run
    # resumes only with its own layout (diffjax.models.dit.stack_block_params converts).
    c.model.kwargs.scan_layers = False
    c.model.dtype = "bfloat16"

    c.diffusion.schedule = "discrete_vp"
    c.diffusion.beta_schedule = "linear"
    c.diffusion.prediction = "epsilon"
    c.diffusion.loss_weighting = "eps_mse"
    c.diffusion.cond_dropout = 0.1
    c.diffusion.clip_x0 = False  # Latents are not bounded to [-1, 1].

    c.train.num_steps = 400_000
    c.train.batch_size = 256
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 0
    c.train.weight_decay = 0.0
    c.train.grad_clip = 0.0
    c.train.ema_decay = 0.9999
    c.train.ema_warmup = False
    c.train.log_every_steps = 100
    c.train.checkpoint_every_steps = 10_000
    c.train.sample_every_steps = 50_000

    c.sample.method = "dpmpp_2m"
    c.sample.num_steps = 20
    c.sample.guidance = 1.5
    c.eval.num_samples = 50_000
    return c
