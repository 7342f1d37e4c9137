"""The autoencoder's loss: reconstruction + KL, optionally LPIPS and a patch GAN.

`make_autoencoder_loss_fn` returns `loss_fn(params, batch, rng, frozen, step) ->
(loss, aux)`, which `make_train_step(..., has_aux=True)` (gradient accumulation,
clipping, EMA, the non-finite guard) trains an `AutoencoderKL` with; the aux scalars
join the step's metrics from the same forward pass.

    L = rec + kl_w * KL + p_w * LPIPS(x, x_hat)
        + 1[step >= start] * (g_w * lambda * L_G(D_sg(phi)(x_hat)) + L_D(D_phi(x), D_phi(sg(x_hat))))

With a discriminator (`gan_weight > 0`) the params are `{"autoencoder": theta,
"discriminator": phi}` and one summed loss trains both: the stop-gradients (sg) make
the generator term reach only theta and the discriminator term only phi, so one AdamW
and one EMA serve both unchanged. Before `gan_start_step` the GAN terms are skipped
(`lax.cond`) and theta's update equals that of a run without a discriminator. lambda
is taming-transformers' adaptive weight ||d rec / d W|| / (||d L_G / d W|| + 1e-4),
clipped to [0, 1e4] and not differentiated, W the decoder's last conv kernel (1 when
`gan_adaptive_weight` is off). Runs without a discriminator keep the autoencoder's tree
at the top level (`experiment.autoencoder_params` reads either).

The LPIPS network is frozen: its params come from `frozen["lpips"]` when the step is
given them (`frozen_params`), else they are read from `perceptual_weights` when the
step is first traced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.models import lpips as lpips_lib
from diffjax.models.autoencoder_kl import latent_sample

RECON_LOSSES = ("l1", "l2")
GAN_LOSSES = ("hinge", "vanilla")
LAST_LAYER = ("decoder", "conv_out", "kernel")  # taming's `get_last_layer()`
ADAPTIVE_MAX = 1e4


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


# ----------------------------------------------------------------------------- GAN losses


def discriminator_loss(kind: str, real: jax.Array, fake: jax.Array) -> jax.Array:
    """L_D of logits on real and fake patches (means over all patches).

    hinge:   (mean(relu(1 - real)) + mean(relu(1 + fake))) / 2
    vanilla: (mean(softplus(-real)) + mean(softplus(fake))) / 2  (binary cross-entropy)
    """
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
    if kind == "vanilla":
        return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))
    raise ValueError(f"gan_loss={kind!r} is not one of {GAN_LOSSES}.")


def generator_loss(kind: str, fake: jax.Array) -> jax.Array:
    """L_G of the discriminator's logits on reconstructions.

    hinge: -mean(fake) (taming / SD's VAE); vanilla: mean(softplus(-fake)) (the
    non-saturating loss of Goodfellow et al.).
    """
    if kind == "hinge":
        return -jnp.mean(fake)
    if kind == "vanilla":
        return jnp.mean(jax.nn.softplus(-fake))
    raise ValueError(f"gan_loss={kind!r} is not one of {GAN_LOSSES}.")


def adaptive_weight(rec_grad: jax.Array, gan_grad: jax.Array) -> jax.Array:
    """taming's lambda = ||rec_grad|| / (||gan_grad|| + 1e-4), clipped to [0, 1e4], no grad."""
    ratio = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_MAX))


# ----------------------------------------------------------------------------- LPIPS


def frozen_params(perceptual_weights: str) -> dict[str, Any]:
    """The frozen tree the loss reads: `{"lpips": params}` (numpy) from a
    `launch/convert_lpips.py` file; pass it as the train step's `frozen`."""
    return {"lpips": lpips_lib.load_params(perceptual_weights)}


@functools.lru_cache(maxsize=2)
def _load_lpips(path: str) -> dict[str, Any]:
    return lpips_lib.load_params(path)


def _with_leaf(tree: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A shallow copy of nested dicts `tree` with the leaf at `path` replaced."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _with_leaf(tree[path[0]], path[1:], value)
    return out


# ----------------------------------------------------------------------------- the loss


def make_autoencoder_loss_fn(
    apply_fn: Callable,
    *,
    kl_weight: float,
    recon_loss: str,
    sample_posterior: bool,
    perceptual_weight: float = 0.0,
    perceptual_weights: str = "",
    disc_apply: Callable | None = None,
    gan_weight: float = 0.0,
    gan_start_step: int = 0,
    gan_loss: str = "hinge",
    gan_adaptive_weight: bool = True,
):
    """`loss_fn(params, batch, rng, frozen, step) -> (loss, aux)` for
    `make_train_step(has_aux=True)`.

    loss = mean over the batch of [recon (mean over pixels) + perceptual_weight * LPIPS
    + kl_weight * KL (summed over the latent dims)], plus the GAN terms of the module
    docstring when `gan_weight > 0`. aux holds `recon`, `kl` and `psnr` (batch means,
    the PSNR of the training reconstruction), `perceptual` with LPIPS, and `g_loss`,
    `d_loss`, `d_real`, `d_fake` (mean logits) and `g_scale` (lambda) with a GAN (all 0
    before `gan_start_step`).

    Args:
      apply_fn: `AutoencoderKL.apply`.
      kl_weight: weight of the KL term (SD's VAE: 1e-6).
      recon_loss: 'l1' | 'l2' per pixel.
      sample_posterior: decode a posterior draw (else the mean).
      perceptual_weight: weight of LPIPS(x, x_hat) (0 = off).
      perceptual_weights: the LPIPS safetensors, read at the first trace unless the step
        passes `frozen={"lpips": ...}` (`frozen_params`).
      disc_apply: `PatchDiscriminator.apply`; needed when `gan_weight > 0`.
      gan_weight: weight of the generator's adversarial term (0 = no GAN; the params are
        then the autoencoder's alone).
      gan_start_step: optimizer step from which the GAN terms are on.
      gan_loss: 'hinge' | 'vanilla'.
      gan_adaptive_weight: scale the generator term by taming's adaptive lambda.

    Raises:
      ValueError: an unknown `recon_loss`/`gan_loss`, a negative weight, LPIPS without
        weights, or a GAN without `disc_apply`.
    """
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"recon_loss={recon_loss!r} is not one of {RECON_LOSSES}.")
    for name, value in (
        ("kl_weight", kl_weight),
        ("perceptual_weight", perceptual_weight),
        ("gan_weight", gan_weight),
    ):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    if perceptual_weight > 0 and not perceptual_weights:
        raise ValueError(
            "perceptual_weight > 0 needs perceptual_weights (make them with "
            "launch/convert_lpips.py)."
        )
    gan = gan_weight > 0
    if gan:
        if disc_apply is None:
            raise ValueError("gan_weight > 0 needs the discriminator's apply (disc_apply).")
        if gan_loss not in GAN_LOSSES:
            raise ValueError(f"gan_loss={gan_loss!r} is not one of {GAN_LOSSES}.")
    per_pixel = jnp.abs if recon_loss == "l1" else jnp.square

    def lpips_fn(frozen, x, y):
        if isinstance(frozen, Mapping) and "lpips" in frozen:
            params = frozen["lpips"]
        else:
            params = _load_lpips(perceptual_weights)
        return lpips_lib.module_for(params).apply({"params": params}, x, y)

    def loss_fn(params, batch, rng, frozen=None, step=None):
        ae = params["autoencoder"] if gan else params
        x = batch["image"].astype(jnp.float32)
        mean, logvar = apply_fn({"params": ae}, x, method="encode")
        z = latent_sample(mean, logvar, rng) if sample_posterior else mean

        def head(w_last):
            """The decoder with its last kernel as the argument -> (nll, x_hat)."""
            p = ae if w_last is None else _with_leaf(ae, LAST_LAYER, w_last)
            recon_x = apply_fn({"params": p}, z, method="decode")
            rec = jnp.mean(per_pixel(recon_x - x), axis=tuple(range(1, x.ndim)))
            perc = lpips_fn(frozen, x, recon_x) if perceptual_weight > 0 else None
            nll = rec if perc is None else rec + perceptual_weight * perc
            return (jnp.mean(nll), recon_x), (rec, perc)

        adaptive = gan and gan_adaptive_weight
        if adaptive:
            w0 = ae
            for k in LAST_LAYER:
                w0 = w0[k]
            (nll, recon_x), head_vjp, (rec, perc) = jax.vjp(head, w0, has_aux=True)
        else:
            (nll, recon_x), (rec, perc) = head(None)
        kl = kl_divergence(mean, logvar)
        loss = nll + kl_weight * jnp.mean(kl)
        aux = {"recon": jnp.mean(rec), "kl": jnp.mean(kl), "psnr": jnp.mean(psnr(x, recon_x))}
        if perc is not None:
            aux["perceptual"] = jnp.mean(perc)
        if not gan:
            return loss, aux

        d_params = params["discriminator"]

        def disc(p, images):
            return disc_apply({"params": p}, images)

        def g_of(images):
            return generator_loss(gan_loss, disc(jax.lax.stop_gradient(d_params), images))

        def gan_terms(_):
            if adaptive:
                g, dg_dx = jax.value_and_grad(g_of)(recon_x)
                (rec_grad,) = head_vjp((jnp.ones_like(nll), jnp.zeros_like(recon_x)))
                (g_grad,) = head_vjp((jnp.zeros_like(nll), dg_dx))
                scale = adaptive_weight(rec_grad, g_grad)
            else:
                g, scale = g_of(recon_x), jnp.ones((), jnp.float32)
            logits = disc(d_params, jnp.concatenate([x, jax.lax.stop_gradient(recon_x)]))
            real, fake = jnp.split(logits, 2)
            d = discriminator_loss(gan_loss, real, fake)
            terms = {"g_loss": g, "d_loss": d, "d_real": jnp.mean(real), "d_fake": jnp.mean(fake)}
            if gan_adaptive_weight:
                terms["g_scale"] = scale
            return gan_weight * scale * g + d, terms

        names = ("g_loss", "d_loss", "d_real", "d_fake") + (
            ("g_scale",) if gan_adaptive_weight else ()
        )

        def off(_):
            zero = jnp.zeros((), jnp.float32)
            return zero, {k: zero for k in names}

        if step is None:
            if gan_start_step > 0:
                raise ValueError("gan_start_step > 0: the loss needs the optimizer `step`.")
            on = jnp.asarray(True)
        else:
            on = jnp.asarray(step) >= gan_start_step
        gan_loss_value, terms = jax.lax.cond(on, gan_terms, off, None)
        return loss + gan_loss_value, {**aux, **terms}

    return loss_fn
