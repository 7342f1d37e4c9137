"""A latent inpainting model of the digits: configs/digits_ldm.py's U-Net on 4x4x4 latents,
input `[z_t, mask, masked-digit latents]` (4 + 1 + 4 = 9 channels, Stable Diffusion
inpainting's layout).

    python launch/train.py --config=configs/digits_vae.py --workdir=runs/digits_latent/vae
    python launch/export.py --workdir=runs/digits_latent/vae --out=runs/digits_latent/vae/export
    python launch/train.py --config=configs/digits_ldm_inpaint.py \
        --workdir=runs/digits_latent/inpaint

Unlike configs/digits_ldm.py it trains on the digits' pixels (not pre-encoded latents):
the frozen VAE (`latent.vae`) encodes each batch's digits and their masked copies in the
train step, and the 8x8 mask is downsampled to the 4x4 latent grid (nearest, as
diffusers' inpainting pipelines). Its sample grid draws whole digits (a mask of ones and
the latents of a zero image). `arg` may be `quick` (a few steps, for tests).
"""

import os

import ml_collections

from diffjax.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "digits_ldm.py"), arg)
    c.data.source = "digits"  # pixels: the masked digits are encoded in the step
    c.data.data_dir = ""
    inpaint = load_config_file(os.path.join(os.path.dirname(__file__), "digits_inpaint.py"), arg)
    c.inpainting = inpaint.inpainting
    c.model.kwargs.out_channels = 4  # the input has 9 channels: latents, mask, masked latents
    return c
