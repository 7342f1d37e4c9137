"""Translates a ConfigDict into library objects.

This is where the config stops: everything returned here is a module, a pure
function or plain numbers, and nothing jitted closes over the config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffjax import models
from diffjax.diffusion import losses, schedules


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    d = config.data
    return (d.image_size, d.image_size, d.channels)


def conditioning_kind(config: ml_collections.ConfigDict) -> str:
    """'text' for caption-conditioned models, 'label' for class-conditional, else ''."""
    kwargs = config.model.kwargs
    if kwargs.get("context_dim", 0) or kwargs.get("text_vocab_size", 0):
        return "text"
    return "label" if config.data.num_classes > 0 and kwargs.get("num_classes", 0) else ""


def condition_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The batch keys that condition this model (others, e.g. a captioned set's labels, are not fed)."""
    return {"label": ("label",), "text": ("context", "context_mask"), "": ()}[
        conditioning_kind(config)
    ]


def build_model(config: ml_collections.ConfigDict):
    """The Flax module named by `config.model`."""
    return models.build_model(
        config.model.name,
        **config.model.kwargs.to_dict(),
        dtype=config.model.dtype,
        remat_policy=config.model.remat_policy,
    )


def build_schedule(config: ml_collections.ConfigDict):
    f = config.diffusion
    if f.schedule == "discrete_vp":
        kwargs = dict(
            beta_schedule=f.beta_schedule,
            beta_start=f.beta_start,
            beta_end=f.beta_end,
            num_timesteps=f.num_timesteps,
            zero_terminal_snr=f.zero_terminal_snr,
        )
    elif f.schedule == "continuous_vp":
        kwargs = {}
    elif f.schedule == "edm":
        kwargs = dict(sigma_data=f.sigma_data, p_mean=f.p_mean, p_std=f.p_std)
    elif f.schedule == "flow":
        kwargs = dict(logit_normal_mean=f.logit_normal_mean, logit_normal_std=f.logit_normal_std)
    else:
        raise ValueError(
            f"Unknown diffusion.schedule {f.schedule!r}; choose discrete_vp, continuous_vp, "
            "edm or flow."
        )
    return schedules.make_schedule(f.schedule, **kwargs)


def build_loss(config: ml_collections.ConfigDict, schedule) -> Callable:
    f = config.diffusion
    return losses.make_loss(
        schedule,
        prediction=f.prediction,
        weighting=f.loss_weighting,
        min_snr_gamma=f.min_snr_gamma,
        sigma_data=f.sigma_data,
        learned_sigma=bool(config.model.kwargs.get("learn_sigma", False)),
    )


def dummy_condition(config: ml_collections.ConfigDict, batch: int) -> dict[str, jax.Array]:
    """Model keyword arguments of the right shapes for `init` / `eval_shape`."""
    kind = conditioning_kind(config)
    if kind == "label":
        return {"labels": jnp.zeros((batch,), jnp.int32)}
    if kind == "text":
        length = config.data.max_text_len
        dim = config.model.kwargs.get("context_dim", 0)
        if config.model.kwargs.get("text_vocab_size", 0):
            return {
                "context": jnp.zeros((batch, length), jnp.int32),
                "context_mask": jnp.ones((batch, length), bool),
            }
        return {
            "context": jnp.zeros((batch, length, dim), jnp.float32),
            "context_mask": jnp.ones((batch, length), bool),
        }
    return {}


def make_init_fn(model, config: ml_collections.ConfigDict) -> Callable[[jax.Array], Any]:
    """`init_fn(key) -> params` (logically boxed) for `init_train_state`."""
    shape = image_shape(config)

    def init_fn(key):
        x = jnp.zeros((1, *shape), jnp.float32)
        t = jnp.zeros((1,), jnp.float32)
        return model.init({"params": key}, x, t, **dummy_condition(config, 1))["params"]

    return init_fn


def model_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What must match for a checkpoint to belong to this config."""
    return json.loads(
        json.dumps(
            {
                "model": config.model.name,
                "model_kwargs": config.model.kwargs.to_dict(),
                "image_shape": list(image_shape(config)),
                "num_classes": config.data.num_classes,
            },
            default=list,
        )
    )


def sampler_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of `diffjax.sampling.make_sample_fn` from `config.sample`."""
    s, f = config.sample, config.diffusion
    kwargs = dict(
        method=s.method,
        num_steps=s.num_steps,
        prediction=f.prediction,
        guidance=s.guidance,
        guidance_rescale=s.guidance_rescale,
        num_classes=config.data.num_classes,
        clip_x0=f.clip_x0,
    )
    if s.method == "ddim":
        kwargs["eta"] = s.eta
    return kwargs


def sampling_condition(
    config: ml_collections.ConfigDict, labels: jax.Array
) -> dict[str, jax.Array]:
    """Model keyword arguments asking for `labels` [N] (an empty dict if unconditional)."""
    kind = conditioning_kind(config)
    if kind == "label":
        return {"labels": jnp.asarray(labels, jnp.int32)}
    if kind == "text":
        from diffjax.data.captions import caption_condition

        return caption_condition(config, labels)
    return {}
