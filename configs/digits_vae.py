"""A small KL autoencoder (diffusers' AutoencoderKL) on the embedded 8x8 digits.

8x8x1 digits -> 4x4x4 latents. The embedded digits source gives 8x8 images only (no
upscaling to 32x32 yet), so this is the 8x8 version of the latent demo's autoencoder.

    python launch/train.py --config=configs/digits_vae.py --workdir=runs/digits_vae
    python launch/export.py --workdir=runs/digits_vae --out=exports/digits_vae
    python launch/encode_latents.py --vae=exports/digits_vae --images=... --out=...

`arg` may be `quick` (a few steps of a tiny model, for tests).
"""

import ml_collections

from diffjax.config import get_base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = get_base_config()
    c.task = "autoencoder"
    c.data.source = "digits"
    c.data.image_size = 8
    c.data.channels = 1
    c.data.num_classes = 0  # The labels are not used.

    c.model.name = "autoencoder_kl"
    c.model.kwargs = ml_collections.ConfigDict(
        dict(
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            # Scales latents to unit variance for the diffusion model, as SD's 0.18215:
            # 1 / 2.30, the std of this config's digits latents (encode_latents, 2026-12-02).
            scaling_factor=0.435,
        )
    )

    c.autoencoder.kl_weight = 1e-6
    c.autoencoder.recon_loss = "l1"
    c.autoencoder.sample_posterior = True

    c.train.num_steps = 2000
    c.train.batch_size = 64
    c.train.learning_rate = 1e-3
    c.train.lr_schedule = "cosine"
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.999
    c.train.log_every_steps = 100
    c.train.checkpoint_every_steps = 500
    c.train.sample_every_steps = 500

    c.sample.num_images = 20  # Reconstruction grid: originals above reconstructions.
    c.eval.every_steps = 500  # Reconstruction PSNR; the best params exported to best/.
    c.eval.num_samples = 512
    c.eval.batch_size = 256

    if arg == "quick":
        c.model.kwargs.block_out_channels = (8, 16)
        c.model.kwargs.latent_channels = 2
        c.model.kwargs.norm_num_groups = 4
        c.train.num_steps = 8
        c.train.batch_size = 16
        c.train.warmup_steps = 2
        c.train.log_every_steps = 2
        c.train.checkpoint_every_steps = 4
        c.train.sample_every_steps = 0
        c.sample.num_images = 10
        c.eval.every_steps = 0
        c.eval.num_samples = 32
        c.eval.batch_size = 32
    elif arg:
        raise ValueError(f"configs/digits_vae.py takes no argument or 'quick', got {arg!r}.")
    return c
