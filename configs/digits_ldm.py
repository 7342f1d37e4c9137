"""Latent diffusion on the embedded digits: a class-conditional U-Net on 4x4x4 latents.

The chain (`make demo-latent` runs it; nothing is downloaded):

    python launch/train.py --config=configs/digits_vae.py --workdir=runs/digits_latent/vae
    python launch/export.py --workdir=runs/digits_latent/vae --out=runs/digits_latent/vae/export
    python launch/encode_latents.py --vae=runs/digits_latent/vae/export --images=digits \
        --out=runs/digits_latent/latents
    python launch/train.py --config=configs/digits_ldm.py --workdir=runs/digits_latent/ldm
    python launch/evaluate.py --workdir=runs/digits_latent/ldm

Samples are decoded by the autoencoder (`latent.vae`) and judged by the digits
classifier like the pixel model's. Other locations: `--config.data.data_dir=LATENTS
--config.latent.vae=VAE_EXPORT`. `arg` may be `quick` (a few steps, for tests).
"""

import ml_collections

from diffjax.config import get_base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = get_base_config()
    c.data.source = "latents"
    c.data.data_dir = "runs/digits_latent/latents"
    c.data.image_size = 4
    c.data.channels = 4
    c.data.num_classes = 10
    c.latent.vae = "runs/digits_latent/vae/export"

    c.model.name = "unet"
    c.model.kwargs = ml_collections.ConfigDict(
        dict(
            base_channels=48,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(2,),
            mid_attention=True,
            num_heads=4,
            dropout=0.1,
            scale_shift_norm=True,
            num_groups=16,
            num_classes=10,
        )
    )

    c.diffusion.schedule = "discrete_vp"
    c.diffusion.beta_schedule = "linear"
    c.diffusion.prediction = "epsilon"
    c.diffusion.loss_weighting = "min_snr"
    c.diffusion.cond_dropout = 0.1
    c.diffusion.clip_x0 = False  # Latents are not confined to [-1, 1].

    c.train.num_steps = 1500
    c.train.batch_size = 128
    c.train.learning_rate = 2e-3
    c.train.lr_schedule = "cosine"
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.999
    c.train.log_every_steps = 100
    c.train.checkpoint_every_steps = 500
    c.train.sample_every_steps = 0  # A grid at the end only.

    c.sample.method = "dpmpp_2m"
    c.sample.num_steps = 20
    c.sample.guidance = 1.5
    c.sample.num_images = 100

    c.eval.num_samples = 1000
    c.eval.batch_size = 500
    c.eval.digits_metrics = True

    if arg == "quick":
        c.model.kwargs.base_channels = 16
        c.model.kwargs.num_heads = 2
        c.model.kwargs.num_groups = 8
        c.train.num_steps = 8
        c.train.batch_size = 32
        c.train.warmup_steps = 2
        c.train.log_every_steps = 2
        c.train.checkpoint_every_steps = 4
        c.sample.num_steps = 5
        c.sample.num_images = 20
        c.eval.num_samples = 100
        c.eval.batch_size = 100
    elif arg:
        raise ValueError(f"configs/digits_ldm.py takes no argument or 'quick', got {arg!r}.")
    return c
