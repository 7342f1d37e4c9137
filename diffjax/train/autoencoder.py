"""The autoencoder's loss: reconstruction + KL of the diagonal Gaussian posterior.

`make_autoencoder_loss_fn` returns `loss_fn(params, batch, rng) -> (loss, aux)`, which
`make_train_step(..., has_aux=True)` (gradient accumulation, clipping, EMA, the
non-finite guard) trains an `AutoencoderKL` with: `recon`, `kl` and `psnr` join the
step's metrics from the same forward pass. The
perceptual (LPIPS) and patch-GAN terms of SD's VAE training are not implemented.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax.models.autoencoder_kl import latent_sample

RECON_LOSSES = ("l1", "l2")


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over the latent dims: [B]."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """PSNR in dB of images in [-1, 1] compared in [0, 1] (`y` clipped): [B]."""
    a = (x.astype(jnp.float32) + 1.0) / 2.0
    b = jnp.clip((y.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def make_autoencoder_loss_fn(
    apply_fn: Callable,
    *,
    kl_weight: float,
    recon_loss: str,
    sample_posterior: bool,
):
    """`loss_fn(params, batch, rng) -> (loss, aux)` for `make_train_step(has_aux=True)`.

    loss = mean over the batch of [recon (mean over pixels) + kl_weight * KL (summed
    over the latent dims)]; aux holds `recon`, `kl` and `psnr` (batch means, the PSNR
    of the training reconstruction).

    Args:
      apply_fn: `AutoencoderKL.apply`.
      kl_weight: weight of the KL term (SD's VAE: 1e-6).
      recon_loss: 'l1' | 'l2' per pixel.
      sample_posterior: decode a posterior draw (else the mean).

    Raises:
      ValueError: an unknown `recon_loss` or a negative `kl_weight`.
    """
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"recon_loss={recon_loss!r} is not one of {RECON_LOSSES}.")
    if not kl_weight >= 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}.")
    per_pixel = jnp.abs if recon_loss == "l1" else jnp.square

    def loss_fn(params, batch, rng):
        x = batch["image"].astype(jnp.float32)
        variables = {"params": params}
        mean, logvar = apply_fn(variables, x, method="encode")
        z = latent_sample(mean, logvar, rng) if sample_posterior else mean
        recon_x = apply_fn(variables, z, method="decode")
        recon = jnp.mean(per_pixel(recon_x - x), axis=tuple(range(1, x.ndim)))
        kl = kl_divergence(mean, logvar)
        loss = jnp.mean(recon + kl_weight * kl)
        aux = {"recon": jnp.mean(recon), "kl": jnp.mean(kl), "psnr": jnp.mean(psnr(x, recon_x))}
        return loss, aux

    return loss_fn
