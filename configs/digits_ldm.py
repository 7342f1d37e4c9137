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

import os

import ml_collections

from diffjax.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # The pixel digits model's training, sampling and evaluation, on the latents.
    c = load_config_file(os.path.join(os.path.dirname(__file__), "digits.py"), arg)
    c.data.source = "latents"
    c.data.data_dir = "runs/digits_latent/latents"
    c.data.image_size = 4
    c.data.channels = 4
    c.latent.vae = "runs/digits_latent/vae/export"
    c.diffusion.clip_x0 = False  # Latents are not confined to [-1, 1].
    c.model.kwargs.attention_resolutions = (2,)  # The 2x2 level of the 4x4 latents.
    if arg != "quick":
        c.model.kwargs.base_channels = 48
        c.train.num_steps = 1500
    return c
