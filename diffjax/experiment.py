"""Translates a ConfigDict into library objects.

This is where the config stops: everything returned here is a module, a pure
function or plain numbers, and nothing jitted closes over the config.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import models
from diffjax.config import REMOVED_FIELDS, get_base_config
from diffjax.diffusion import editing, losses, samplers, schedules
from diffjax.finetune import lora as lora_lib
from diffjax.models.autoencoder_kl import AutoencoderKL

TASKS = ("diffusion", "autoencoder")
# config.model.name of task='autoencoder' (not in `models.MODELS`: those are denoisers
# with the denoiser call contract; this one maps images to images through a latent).
AUTOENCODER = "autoencoder_kl"
RECON_LOSSES = ("l1", "l2")
GAN_LOSSES = ("hinge", "vanilla")


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    d = config.data
    return (d.image_size, d.image_size, d.channels)


def context_dim(config: ml_collections.ConfigDict) -> int:
    """Width of the text embeddings the model attends to (0: no text).

    `model.kwargs.context_dim` for diffjax's U-Net and DiT; the SD U-Net always attends to
    text, `cross_attention_dim` wide (its default when not set).
    """
    kwargs = config.model.kwargs
    if config.model.name == "sd_unet":
        return int(
            kwargs.get("cross_attention_dim", models.model_fields("sd_unet")["cross_attention_dim"])
        )
    return int(kwargs.get("context_dim", 0))


def conditioning_kind(config: ml_collections.ConfigDict) -> str:
    """'text' for caption-conditioned models, 'label' for class-conditional, else ''."""
    kwargs = config.model.kwargs
    if context_dim(config) or kwargs.get("text_vocab_size", 0):
        return "text"
    return "label" if config.data.num_classes > 0 and kwargs.get("num_classes", 0) else ""


def condition_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The batch keys that condition this model (others, e.g. a captioned set's labels, are not fed)."""
    keys = {"label": ("labels",), "text": ("context", "context_mask"), "": ()}[
        conditioning_kind(config)
    ]
    keys += ("control",) if is_controlnet(config) else ()
    return keys + (("concat",) if is_inpainting(config) else ())


def is_inpainting(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains an inpainting model (`inpainting.enabled`): its input is
    `concat([x_t, mask, masked image])` on the channel axis."""
    return bool(config.get("inpainting", {}).get("enabled", False))


def inpaint_concat_channels(config: ml_collections.ConfigDict) -> int:
    """Channels of an inpainting model's `cond["concat"]`: 1 (the mask) + C (the masked
    image in model space: `data.channels`, the latent channels of a latent model); 0 for
    other models."""
    return 1 + config.data.channels if is_inpainting(config) else 0


def model_input_channels(config: ml_collections.ConfigDict) -> int:
    """Channels of the denoiser's input `x`: C, or C + 1 + C for an inpainting model
    (its output stays C)."""
    return config.data.channels + inpaint_concat_channels(config)


def mask_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """An inpainting run's `diffjax.data.masks.MaskGenerator` fields (the
    `masks=` of `data.make_source`), seeded by `config.seed`."""
    p = config.inpainting
    return {
        "masks": p.masks,
        "seed": int(config.seed),
        "min_size": float(p.min_size),
        "max_size": float(p.max_size),
        "max_strokes": int(p.max_strokes),
        "brush_width": float(p.brush_width),
    }


def concat_apply(apply_fn: Callable) -> Callable:
    """`apply_fn` taking an inpainting model's `concat=` keyword ([B, H, W, C'], the mask
    and masked image) and concatenating it to `x` on the channel axis before the call,
    exactly as `diffjax.sample_fn.guided_model_fn` does with `cond["concat"]`. The train
    step's loss calls the model through it (`rundir.build_components`)."""

    def apply(variables, x, t, *args, concat, **kwargs):
        x = jnp.concatenate([x, concat.astype(x.dtype)], axis=-1)
        return apply_fn(variables, x, t, *args, **kwargs)

    return apply


def inpaint_concat(
    config: ml_collections.ConfigDict,
    images: Any,
    masks: Any,
    *,
    encode: Callable | None = None,
    factor: int = 1,
) -> jax.Array:
    """An inpainting model's `cond["concat"]`, as its training builds it.

    Args:
      images: float [N, H, W, Cp] pixels in [-1, 1] (the output image size).
      masks: float [N, H, W, 1] at the same size, 1 (>= 0.5) = regenerate.
      encode: latent models: pixels [N, H, W, Cp] -> scaled latents [N, H/f, W/f, C]
        (the run's VAE; `LatentDecoder.encode`, the posterior mean at sampling).
      factor: latent models: the VAE's downsampling factor f.

    Returns:
      float32 [N, h, w, 1 + C]: pixel models `editing.inpaint_condition(images, masks)`
      (the 0/1 mask, then the image with the region to regenerate zeroed); latent
      models the mask downsampled to the latent grid (nearest: each block's top-left
      pixel, diffusers' `interpolate`), binarised, then `encode(masked_image(images,
      masks))`.
    """
    images = jnp.asarray(images, jnp.float32)
    masks = jnp.asarray(masks, jnp.float32)
    if not config.latent.vae:
        return editing.inpaint_condition(images, masks)
    if encode is None:
        raise ValueError(
            "A latent inpainting model sees the VAE latents of the masked image: pass "
            "encode= (the run's VAE encoder, e.g. LatentDecoder.encode) and factor=."
        )
    return latent_inpaint_concat(images, masks, encode, factor)


def latent_inpaint_concat(images: Any, masks: Any, encode: Callable, factor: int) -> jax.Array:
    """A latent inpainting model's `concat` (see `inpaint_concat`): [the pixel mask
    downsampled by `factor` (nearest), binarised; `encode(masked_image(images, masks))`]."""
    images = jnp.asarray(images, jnp.float32)
    masks = jnp.asarray(masks, jnp.float32)
    small = editing.downsample_mask(masks, factor, mode="nearest")
    latents = encode(editing.masked_image(images, masks))
    return jnp.concatenate(
        [(small >= 0.5).astype(jnp.float32), jnp.asarray(latents, jnp.float32)], axis=-1
    )


def full_mask_concat(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
    """A pixel inpainting model's `concat` for plain generation (every pixel regenerated:
    the mask all 1, the masked image all 0, the `full` training masks): float32
    [n, H, W, 1 + C]."""
    h, w, c = image_shape(config)
    out = np.zeros((n, h, w, 1 + c), np.float32)
    out[..., 0] = 1.0
    return out


def is_controlnet(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains a ControlNet on a frozen base (`controlnet.control`)."""
    return bool(config.get("controlnet", {}).get("control", ""))


def control_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """[H, W, C] of a ControlNet run's control images (the output image's size)."""
    n, f = config.controlnet, config.controlnet.control_downsample or 1
    size = config.data.image_size * f
    return (size, size, n.conditioning_channels or config.data.channels)


def build_controlnet(config: ml_collections.ConfigDict):
    """The ControlNet module of a run (`controlnet.*`) for its base model (`model.*`)."""
    n = config.controlnet
    return models.build_controlnet(
        config.model.name,
        config.model.kwargs.to_dict(),
        conditioning_channels=control_shape(config)[-1],
        control_downsample=n.control_downsample or 1,
        embedding_channels=tuple(n.embedding_channels),
        depth=n.depth,
        dtype=config.model.dtype,
        remat_policy=config.model.remat_policy,
    )


def is_autoencoder(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains an autoencoder (`task='autoencoder'`), not a denoiser."""
    return config.get("task", "diffusion") == "autoencoder"


def require_diffusion(config: ml_collections.ConfigDict, source: str, command: str) -> None:
    """Refuses an autoencoder run where a diffusion model is needed (sampling, FID).

    Raises:
      ValueError: naming the run and what to do with an autoencoder instead.
    """
    if is_autoencoder(config):
        raise ValueError(
            f"{source} is an autoencoder run (task='autoencoder'); {command} needs a diffusion "
            "model. Export the autoencoder with `python launch/export.py --workdir=RUN "
            "--out=VAE_DIR` (a diffusers AutoencoderKL directory), encode a dataset with "
            "`python launch/encode_latents.py --vae=VAE_DIR ...`, and train a latent model "
            "with latent.vae=VAE_DIR. Reconstruction PSNR is logged during training "
            "(eval.every_steps)."
        )


def autoencoder_fields() -> dict[str, Any]:
    """The constructor fields of `AutoencoderKL` with their defaults (less `dtype`)."""
    return {
        f.name: f.default
        for f in dataclasses.fields(AutoencoderKL)
        if f.init and f.name not in ("parent", "name", "dtype")
    }


def has_discriminator(config: ml_collections.ConfigDict) -> bool:
    """Whether an autoencoder run trains a patch-GAN discriminator (`autoencoder.gan_weight > 0`).

    Its trainable params are then `{"autoencoder": ..., "discriminator": ...}`; runs without
    one keep the autoencoder's tree at the top level.
    """
    return is_autoencoder(config) and config.autoencoder.get("gan_weight", 0.0) > 0


def autoencoder_params(config: ml_collections.ConfigDict, params: Any) -> Any:
    """The `AutoencoderKL` params of an autoencoder run's (EMA) params: the `autoencoder`
    subtree when the run trains a discriminator, else the params themselves. Everything
    that reads a run's autoencoder (grids, evaluation, export) goes through here."""
    if not has_discriminator(config):
        return params
    if not isinstance(params, dict) or "autoencoder" not in params:
        keys = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            "autoencoder.gan_weight > 0, so the params should hold 'autoencoder' and "
            f"'discriminator', but they hold {keys}; use the config the run was trained with."
        )
    return params["autoencoder"]


def build_discriminator(config: ml_collections.ConfigDict):
    """The patch-GAN discriminator of an autoencoder run (`autoencoder.disc_*`)."""
    from diffjax.models.discriminator import PatchDiscriminator

    a = config.autoencoder
    return PatchDiscriminator(
        channels=a.disc_channels, num_layers=a.disc_layers, dtype=config.model.dtype
    )


def build_model(config: ml_collections.ConfigDict):
    """The Flax module named by `config.model` (an `AutoencoderKL` for the autoencoder task)."""
    if is_autoencoder(config):
        if config.model.name != AUTOENCODER:
            raise ValueError(
                f"task='autoencoder' trains model.name={AUTOENCODER!r}, not "
                f"{config.model.name!r}; set --config.model.name={AUTOENCODER}."
            )
        kwargs = config.model.kwargs.to_dict()
        valid = autoencoder_fields()
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(
                f"Unknown argument(s) {unknown} for model {AUTOENCODER!r}; valid ones are: "
                f"{sorted(valid)}."
            )
        plain = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        return AutoencoderKL(**plain, dtype=config.model.dtype)
    return models.build_model(
        config.model.name,
        **denoiser_kwargs(config),
        dtype=config.model.dtype,
        remat_policy=config.model.remat_policy,
    )


def denoiser_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`model.kwargs` as the denoiser's constructor takes them: an inpainting model of
    diffjax's U-Net or DiT (whose output width defaults to its input's) gets
    `out_channels = data.channels` unless it is set."""
    kwargs = config.model.kwargs.to_dict()
    if is_inpainting(config) and config.model.name in ("unet", "dit"):
        if not kwargs.get("out_channels", 0):
            kwargs["out_channels"] = config.data.channels
    return kwargs


# The diffusion fields that are arguments of some schedule factory; each schedule takes
# those among them that its factory names, and `check_config` refuses the others when
# they differ from their defaults (they would otherwise be silently ignored).
_SCHEDULE_FIELDS = (
    "beta_schedule",
    "beta_start",
    "beta_end",
    "num_timesteps",
    "zero_terminal_snr",
    "beta_min",
    "beta_max",
    "t_min",
    "train_t_min",
    "sigma_min",
    "sigma_max",
    "sigma_data",
    "p_mean",
    "p_std",
    "logit_normal_mean",
    "logit_normal_std",
)


def build_schedule(config: ml_collections.ConfigDict):
    """The schedule named by `diffusion.schedule`, with every one of its fields."""
    f = config.diffusion
    takes = schedules.schedule_arguments(f.schedule)
    return schedules.make_schedule(f.schedule, **{k: f[k] for k in _SCHEDULE_FIELDS if k in takes})


def build_loss(config: ml_collections.ConfigDict, schedule) -> Callable:
    f = config.diffusion
    return losses.make_loss(
        schedule,
        prediction=f.prediction,
        weighting=f.loss_weighting,
        min_snr_gamma=f.min_snr_gamma,
        sigma_data=f.sigma_data,
        learn_sigma=bool(config.model.kwargs.get("learn_sigma", False)),
    )


def dummy_condition(config: ml_collections.ConfigDict, batch: int) -> dict[str, jax.Array]:
    """Model keyword arguments of the right shapes for `init` / `eval_shape`."""
    kind = conditioning_kind(config)
    if kind == "label":
        return {"labels": jnp.zeros((batch,), jnp.int32)}
    if kind == "text":
        length = config.data.max_text_len
        dim = context_dim(config)
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


def make_init_fn(
    model, config: ml_collections.ConfigDict, *, control: bool = False
) -> Callable[[jax.Array], Any]:
    """`init_fn(key) -> params` (logically boxed) for `init_train_state`; with `control`,
    `model` is a ControlNet and takes a control image."""
    shape = image_shape(config)
    if is_autoencoder(config):
        x = jnp.zeros((1, *shape), jnp.float32)
        if not has_discriminator(config):
            return lambda key: model.init({"params": key}, x)["params"]
        disc = build_discriminator(config)

        def init_with_discriminator(key):
            k_ae, k_disc = jax.random.split(key)
            return {
                "autoencoder": model.init({"params": k_ae}, x)["params"],
                "discriminator": disc.init({"params": k_disc}, x)["params"],
            }

        return init_with_discriminator

    if not control:  # an inpainting model's input carries the mask and masked image
        shape = (*shape[:2], model_input_channels(config))

    def init_fn(key):
        x = jnp.zeros((1, *shape), jnp.float32)
        t = jnp.zeros((1,), jnp.float32)
        cond = dummy_condition(config, 1)
        if control:
            cond["control"] = jnp.zeros((1, *control_shape(config)), jnp.float32)
        return model.init({"params": key}, x, t, **cond)["params"]

    return init_fn


def lora_rank(config: ml_collections.ConfigDict) -> int:
    """The LoRA rank of a run (0: the whole model trains)."""
    return int(config.get("lora", {}).get("rank", 0) or 0)


def lora_scale(config: ml_collections.ConfigDict) -> float:
    """alpha / rank (alpha 0 means alpha = rank: scale 1)."""
    r = lora_rank(config)
    return float(config.lora.alpha) / r if r and config.lora.alpha else 1.0


def lora_targets(config: ml_collections.ConfigDict, component: str = "denoiser") -> str:
    """The target regex of a LoRA run's component ('denoiser' or 'text_encoder')."""
    if config.lora.targets and component == "denoiser":
        return config.lora.targets
    name = "clip_text" if component == "text_encoder" else config.model.name
    if name not in lora_lib.DEFAULT_TARGETS:
        raise ValueError(
            f"model {name!r} has no default LoRA targets; set lora.targets to a regex over its "
            "module names."
        )
    return lora_lib.DEFAULT_TARGETS[name]


def merged_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of a LoRA run's merged model: a plain model (no LoRA, no base), what
    exports of the merged params record."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.lora.rank, out.lora.alpha, out.lora.targets, out.lora.dropout = 0, 0.0, "", 0.0
    out.lora.text_encoder = False
    out.base_workdir = ""
    return out


def model_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What must match for a checkpoint to belong to this config."""
    fingerprint = {"task": "autoencoder"} if is_autoencoder(config) else {}
    if has_discriminator(config):  # its params sit beside the autoencoder's
        a = config.autoencoder
        fingerprint["discriminator"] = {"channels": a.disc_channels, "layers": a.disc_layers}
    if lora_rank(config):  # the checkpoints hold only the LoRA tree
        fingerprint["lora"] = {
            "rank": lora_rank(config),
            "targets": config.lora.targets,
            "text_encoder": bool(config.lora.text_encoder),
        }
    if is_inpainting(config):  # the input carries [mask, masked image]
        fingerprint["inpainting"] = True
    if is_controlnet(config):  # the checkpoints hold only the ControlNet
        n = config.controlnet
        fingerprint["controlnet"] = {
            "control": n.control,
            "control_shape": list(control_shape(config)),
            "embedding_channels": list(n.embedding_channels),
            "depth": n.depth,
        }
    return json.loads(
        json.dumps(
            {
                **fingerprint,
                "model": config.model.name,
                "model_kwargs": model_kwargs_without_defaults(
                    config.model.name, config.model.kwargs.to_dict()
                ),
                "image_shape": list(image_shape(config)),
                "num_classes": config.data.num_classes,
            },
            default=list,
        )
    )


def model_kwargs_without_defaults(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` less the fields equal to the model's defaults.

    A fingerprint made of these does not change when a model gains a field with a
    default, or when a config spells out a default, so such runs still resume.
    """
    fields = autoencoder_fields() if name == AUTOENCODER else models.model_fields(name)
    defaults = json.loads(json.dumps(fields, default=list))
    plain = json.loads(json.dumps(kwargs, default=list))
    return {k: v for k, v in plain.items() if k not in defaults or defaults[k] != v}


def sampler_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of `diffjax.sample_fn.make_sample_fn` from `config.sample`."""
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
    if s.eta is not None:
        kwargs["eta"] = s.eta
    if is_controlnet(config):
        n = config.controlnet
        kwargs["guess_mode"] = bool(n.guess_mode)
        if (n.guidance_start, n.guidance_end) != (0.0, 1.0):
            kwargs["control_window"] = samplers.step_window(
                build_schedule(config), s.method, s.num_steps, n.guidance_start, n.guidance_end
            )
    return kwargs


def sampling_condition(
    config: ml_collections.ConfigDict, labels: jax.Array, control: Any = None, concat: Any = None
) -> dict[str, jax.Array]:
    """Model keyword arguments asking for `labels` [N] (an empty dict if unconditional),
    for a ControlNet run the `control` images [N, H, W, C] (float in [0, 1]) with
    `control_scale` [N, 1] = `controlnet.conditioning_scale`, and for an inpainting run
    `concat` [N, h, w, 1 + C] (`inpaint_concat`; a pixel model without one generates
    whole images: `full_mask_concat`)."""
    kind = conditioning_kind(config)
    cond = {}
    if kind == "label":
        cond = {"labels": jnp.asarray(labels, jnp.int32)}
    elif kind == "text":
        from diffjax.data.captions import caption_condition

        cond = caption_condition(config, labels)
    if is_controlnet(config):
        if control is None:
            raise ValueError("A ControlNet run samples with control images; pass control=.")
        cond.update(control_condition(config, control))
    if is_inpainting(config):
        cond["concat"] = concat_condition(config, len(np.asarray(labels)), concat)
    elif concat is not None:
        raise ValueError(
            "concat= (a mask and masked image) conditions inpainting models "
            "(inpainting.enabled); this run is not one."
        )
    return cond


def concat_condition(config: ml_collections.ConfigDict, n: int, concat: Any = None) -> jax.Array:
    """An inpainting run's `concat` for `n` samples, checked: the given one, or for a
    pixel model the full mask (plain generation)."""
    h, w, c = image_shape(config)
    want = (h, w, 1 + c)
    if concat is None:
        if config.latent.vae:
            raise ValueError(
                "A latent inpainting model samples with concat= [N, h, w, 1 + C]: the mask on "
                "the latent grid and the VAE latents of the masked image "
                "(experiment.inpaint_concat with the VAE's encode); for plain generation, "
                "a mask of ones and an all-zero (gray) image."
            )
        return jnp.asarray(full_mask_concat(config, n))
    concat = jnp.asarray(concat, jnp.float32)
    if concat.ndim != 4 or tuple(concat.shape[1:]) != want:
        raise ValueError(
            f"concat must be [N, h, w, 1 + C] with [h, w, 1 + C] = {list(want)} (the mask "
            f"and the masked image on the model's grid), got {list(concat.shape)}."
        )
    return concat


def control_condition(config: ml_collections.ConfigDict, control: Any) -> dict[str, Any]:
    """`control` (float [N, H, W, C] in [0, 1]) and its `control_scale` [N, 1], checked."""
    control = np.asarray(control)
    want = control_shape(config)
    if control.ndim != 4 or tuple(control.shape[1:]) != want:
        raise ValueError(
            f"control images must be [N, H, W, C] with [H, W, C] = {list(want)} (the output "
            f"image size and the run's control channels), got {list(control.shape)}."
        )
    scale = np.full((len(control), 1), config.controlnet.conditioning_scale, np.float32)
    return {"control": control.astype(np.float32), "control_scale": scale}


def upgrade_config(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """A run's saved config.json as a ConfigDict, with fields of older versions mapped.

    Fields added since take their defaults; removed fields
    (`diffjax.config.REMOVED_FIELDS`) are dropped; `sample.eta = 0.0`
    (the old always-present default, read only by `ddim`) becomes None (the method's
    default), so old runs sample exactly as before.
    """
    config = ml_collections.ConfigDict(saved)
    # Fields added after the run was made take their defaults (e.g. `latent.vae`).
    for section, fields in get_base_config().items():
        if section not in config:
            config[section] = fields
        elif isinstance(fields, ml_collections.ConfigDict):
            for key, value in fields.items():
                if key not in config[section]:
                    config[section][key] = value
    for dotted in REMOVED_FIELDS:
        section, field = dotted.split(".")
        if section in config and field in config[section]:
            del config[section][field]
    if "sample" in config and config.sample.get("eta", None) == 0.0:
        config.sample.eta = None
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses, before any work, a config whose fields would fail or be silently ignored.

    Checks the model's keyword fields, the schedule and its fields (a field of another
    schedule set to a non-default value is refused, naming it), the loss, the sampler
    and its options, and the training counts.

    Raises:
      ValueError: naming the field, its value and the fix.
    """
    base = get_base_config()
    if config.get("pretrained", "") is None:
        raise ValueError(
            "This config fine-tunes a pretrained pipeline: set --config.pretrained=SD_DIR (a "
            "diffusers Stable Diffusion directory with model_index.json)."
        )
    if config.get("task", "diffusion") not in TASKS:
        raise ValueError(f"task={config.task!r} is not one of {TASKS}.")
    if is_autoencoder(config):
        if is_inpainting(config):
            raise ValueError(
                "inpainting.enabled trains a denoiser that fills masked regions; "
                "task='autoencoder' has none. Clear inpainting.enabled."
            )
        _check_autoencoder(config, base)
        _check_train_counts(config)
        return
    f = config.diffusion
    takes = schedules.schedule_arguments(f.schedule)
    used = set(takes)
    if f.loss_weighting == "edm":
        used.add("sigma_data")
    for k in _SCHEDULE_FIELDS:
        if k not in used and f[k] != base.diffusion[k]:
            raise ValueError(
                f"diffusion.{k}={f[k]!r} is not used by diffusion.schedule={f.schedule!r} "
                f"(it takes {', '.join(k2 for k2 in _SCHEDULE_FIELDS if k2 in takes)}). "
                f"Remove the override, or choose the schedule that field belongs to."
            )
    if f.loss_weighting != "min_snr" and f.min_snr_gamma != base.diffusion.min_snr_gamma:
        raise ValueError(
            f"diffusion.min_snr_gamma={f.min_snr_gamma} is used only with "
            f"diffusion.loss_weighting='min_snr', not {f.loss_weighting!r}. Remove it."
        )
    schedule = build_schedule(config)
    build_loss(config, schedule)
    build_model(config)
    _check_sampler(config, schedule)
    _check_train_counts(config)
    if config.sample.num_steps < 1:
        raise ValueError(f"sample.num_steps must be >= 1, got {config.sample.num_steps}.")
    _check_lora(config)
    _check_controlnet(config)
    _check_inpainting(config, base)
    if config.data.source == "dreambooth" and not (config.pretrained or config.base_workdir):
        raise ValueError(
            "data.source='dreambooth' fine-tunes a trained model: set "
            "--config.pretrained=SD_DIR or --config.base_workdir=RUN."
        )
    if config.text.encoder and config.data.source == "latents":
        raise ValueError(
            "text.encoder embeds the caption token ids of image data in the train step, but "
            "data.source='latents' gives encode_latents' captions; precompute the embeddings "
            "with `launch/encode_latents.py --text_encoder=...`, or train on the images "
            "(data.source='folder' with latent.vae: they are encoded in the step)."
        )
    if config.latent.vae and config.diffusion.clip_x0:
        raise ValueError(
            "diffusion.clip_x0=True clips predictions to [-1, 1], the range of pixels, but "
            f"this model makes latents of latent.vae={config.latent.vae!r}, which are not "
            "confined to it; set --config.diffusion.clip_x0=False."
        )


def _check_lora(config: ml_collections.ConfigDict) -> None:
    """LoRA fields: a base to adapt, a rank, targets that parse."""
    lo = config.lora
    if lo.rank < 0:
        raise ValueError(f"lora.rank must be >= 0 (0 = no LoRA), got {lo.rank}.")
    if config.pretrained and config.base_workdir:
        raise ValueError(
            "Set one base: config.pretrained (a diffusers pipeline) or config.base_workdir (a "
            "diffjax run), not both."
        )
    if not lo.rank:
        unused = [f"lora.{k}" for k in ("alpha", "targets", "text_encoder", "dropout") if lo[k]]
        if unused:
            raise ValueError(f"{', '.join(unused)} apply only with lora.rank > 0; set lora.rank.")
        return
    if not (config.pretrained or config.base_workdir):
        raise ValueError(
            "lora.rank > 0 adapts a trained model: set --config.pretrained=SD_DIR or "
            "--config.base_workdir=RUN (the frozen base)."
        )
    if lo.alpha < 0:
        raise ValueError(f"lora.alpha must be >= 0 (0 = alpha = rank), got {lo.alpha}.")
    if not 0.0 <= lo.dropout < 1.0:
        raise ValueError(f"lora.dropout must lie in [0, 1), got {lo.dropout}.")
    if lo.text_encoder and not config.text.encoder:
        raise ValueError(
            "lora.text_encoder=True trains a LoRA on the frozen text encoder, but this run has "
            "none (text.encoder); clear lora.text_encoder."
        )
    lora_targets(config)


def _check_controlnet(config: ml_collections.ConfigDict) -> None:
    """ControlNet fields: a known control, a frozen base, sampling options in range."""
    from diffjax.data.control import CONTROLS

    n = config.controlnet
    if not n.control:
        return
    if n.control not in CONTROLS:
        raise ValueError(f"controlnet.control={n.control!r} is not one of {CONTROLS}.")
    if not (config.pretrained or config.base_workdir):
        raise ValueError(
            "controlnet.control trains a ControlNet beside a frozen base: set "
            "--config.pretrained=SD_DIR or --config.base_workdir=RUN."
        )
    if lora_rank(config):
        raise ValueError("A run trains a ControlNet or a LoRA, not both; clear lora.rank.")
    if config.model.name not in models.CONTROLNETS:
        raise ValueError(
            f"model {config.model.name!r} has no ControlNet; ones exist for "
            f"{sorted(models.CONTROLNETS)}."
        )
    if not 0.0 <= n.guidance_start < n.guidance_end <= 1.0:
        raise ValueError(
            "controlnet.guidance_start/end must satisfy 0 <= start < end <= 1, got "
            f"{n.guidance_start}, {n.guidance_end}."
        )
    if n.conditioning_scale < 0:
        raise ValueError(f"controlnet.conditioning_scale must be >= 0, got {n.conditioning_scale}.")


def _check_inpainting(config: ml_collections.ConfigDict, base) -> None:
    """Inpainting fields: the masks parse, the model's channels fit, the data are pixels."""
    from diffjax.data.masks import MaskGenerator

    if "inpainting" not in config:
        return
    p = config.inpainting
    if not p.enabled:
        unused = [
            f"inpainting.{k}"
            for k in base.inpainting
            if k != "enabled" and p[k] != base.inpainting[k]
        ]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} apply only to inpainting models; set "
                "inpainting.enabled=True or remove those overrides."
            )
        return
    MaskGenerator(**mask_options(config))  # the spec and sizes, checked
    if is_controlnet(config):
        raise ValueError(
            "inpainting.enabled with controlnet.control: a ControlNet of an inpainting model "
            "is not supported; train one or the other."
        )
    if config.data.source == "latents":
        raise ValueError(
            "inpainting.enabled: an inpainting latent model sees the VAE latents of each masked "
            "image, encoded from pixels in the train step, but data.source='latents' holds "
            "latents of whole images. Train from the images (data.source='folder', 'tfds' or "
            "'digits' with latent.vae: they are encoded in the step)."
        )
    c, want = config.data.channels, model_input_channels(config)
    kwargs = denoiser_kwargs(config)
    if config.model.name == "sd_unet":
        fields = models.model_fields("sd_unet")
        cin = int(kwargs.get("in_channels", fields["in_channels"]))
        cout = int(kwargs.get("out_channels", fields["out_channels"]))
        if (cin, cout) != (want, c):
            raise ValueError(
                f"An inpainting sd_unet takes [x_t, mask, masked image] = {c} + 1 + {c} = "
                f"{want} input channels and predicts {c}, but model.kwargs has in_channels="
                f"{cin}, out_channels={cout}; set them to {want} and {c} (Stable Diffusion "
                "inpainting U-Nets have 9 and 4)."
            )
    elif int(kwargs.get("out_channels", 0)) != c:
        raise ValueError(
            f"An inpainting model predicts data.channels={c} channels from its {want} input "
            f"channels, but model.kwargs.out_channels={kwargs['out_channels']}; set it to {c} "
            "(or 0)."
        )


def _check_train_counts(config: ml_collections.ConfigDict) -> None:
    """The training counts, and the data fields that pick records (before the run
    directory is written: a bad `data.mix` would otherwise fail when the data loads)."""
    for name in ("num_steps", "batch_size", "log_every_steps", "checkpoint_every_steps"):
        if config.train[name] < 1:
            raise ValueError(f"train.{name} must be >= 1, got {config.train[name]}.")
    if config.data.get("num_examples", 0) < 0:
        raise ValueError(
            f"data.num_examples must be >= 0 (0 = all records), got {config.data.num_examples}."
        )
    from diffjax.data.mix import parse_mix

    parse_mix(config.data.get("mix", ""))


def _check_autoencoder(config: ml_collections.ConfigDict, base) -> None:
    """task='autoencoder': its own fields, the model against the data, and the
    diffusion-only fields refused when set (they would be silently ignored)."""
    a = config.autoencoder
    if a.recon_loss not in RECON_LOSSES:
        raise ValueError(f"autoencoder.recon_loss={a.recon_loss!r} is not one of {RECON_LOSSES}.")
    if not a.kl_weight >= 0:
        raise ValueError(f"autoencoder.kl_weight must be >= 0, got {a.kl_weight}.")
    _check_autoencoder_extras(config, base)
    if config.latent.vae:
        raise ValueError(
            "latent.vae is set but task='autoencoder' trains on images; clear latent.vae."
        )
    if config.data.source == "latents":
        raise ValueError("task='autoencoder' trains on images, not data.source='latents'.")
    if config.model.remat_policy != "none":
        raise ValueError(
            f"model.remat_policy={config.model.remat_policy!r}: AutoencoderKL has no remat; "
            "use 'none'."
        )
    unused = [f"diffusion.{k}" for k in base.diffusion if config.diffusion[k] != base.diffusion[k]]
    unused += [
        f"sample.{k}"
        for k in base.sample
        if k != "num_images" and config.sample[k] != base.sample[k]
    ]
    if config.eval.digits_metrics:
        unused.append("eval.digits_metrics")
    unused += [f"eval.{n}" for n in ("memorization", "cas") if config.eval.get(n, False)]
    if unused:
        raise ValueError(
            f"{', '.join(unused)} do not apply to task='autoencoder' (no diffusion, no "
            "sampler); remove those overrides."
        )
    model = build_model(config)
    c = config.data.channels
    if model.in_channels != c or model.out_channels != c:
        raise ValueError(
            f"model.kwargs in_channels={model.in_channels}, out_channels={model.out_channels} "
            f"must equal data.channels={c}."
        )
    if config.data.image_size % model.downscale:
        raise ValueError(
            f"data.image_size={config.data.image_size} is not divisible by the autoencoder's "
            f"downscale factor {model.downscale} (2^(len(block_out_channels) - 1))."
        )
    model._check()


def _check_autoencoder_extras(config: ml_collections.ConfigDict, base) -> None:
    """The perceptual (LPIPS) and patch-GAN fields of task='autoencoder'."""
    from diffjax.models.discriminator import output_size
    from diffjax.models.lpips import MIN_SIZE

    a, size = config.autoencoder, config.data.image_size
    if not a.perceptual_weight >= 0:
        raise ValueError(f"autoencoder.perceptual_weight must be >= 0, got {a.perceptual_weight}.")
    if a.perceptual_weight > 0:
        if not a.perceptual_weights:
            raise ValueError(
                f"autoencoder.perceptual_weight={a.perceptual_weight} needs the LPIPS weights: "
                "convert torchvision's vgg16 and lpips' vgg.pth with `python "
                "launch/convert_lpips.py --vgg=... --lin=... --out=lpips.safetensors` and set "
                "--config.autoencoder.perceptual_weights=lpips.safetensors (or set "
                "perceptual_weight=0)."
            )
        if size < MIN_SIZE:
            raise ValueError(
                f"autoencoder.perceptual_weight > 0 needs data.image_size >= {MIN_SIZE} (LPIPS' "
                f"VGG16 pools four times), got {size}; set perceptual_weight=0."
            )
    elif a.perceptual_weights != base.autoencoder.perceptual_weights:
        raise ValueError(
            "autoencoder.perceptual_weights is set but perceptual_weight=0, so it would be "
            "ignored; set perceptual_weight > 0 or clear perceptual_weights."
        )
    if not a.gan_weight >= 0:
        raise ValueError(f"autoencoder.gan_weight must be >= 0, got {a.gan_weight}.")
    if a.gan_weight == 0:
        unused = [
            f"autoencoder.{k}"
            for k in (
                "gan_start_step",
                "gan_loss",
                "gan_adaptive_weight",
                "disc_channels",
                "disc_layers",
            )
            if a[k] != base.autoencoder[k]
        ]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} apply only with autoencoder.gan_weight > 0 (no "
                "discriminator is trained); set gan_weight or remove those overrides."
            )
        return
    if a.gan_loss not in GAN_LOSSES:
        raise ValueError(f"autoencoder.gan_loss={a.gan_loss!r} is not one of {GAN_LOSSES}.")
    if a.gan_start_step < 0:
        raise ValueError(f"autoencoder.gan_start_step must be >= 0, got {a.gan_start_step}.")
    if a.disc_channels < 1 or a.disc_layers < 1:
        raise ValueError(
            f"autoencoder.disc_channels={a.disc_channels} and disc_layers={a.disc_layers} "
            "must be >= 1."
        )
    if output_size(size, a.disc_layers) < 1:
        raise ValueError(
            f"autoencoder.disc_layers={a.disc_layers} is too many for {size}x{size} images (the "
            f"patch logits would be empty: size // 2^layers - 2 < 1); lower disc_layers."
        )


def _check_sampler(config: ml_collections.ConfigDict, schedule) -> None:
    """Traces the configured sampler on a one-pixel stand-in model (no compile, no
    allocation), so every option check of `samplers.sample` runs before training."""
    kwargs = sampler_kwargs(config)
    guidance, rescale = kwargs.pop("guidance"), kwargs.pop("guidance_rescale")
    for key in ("num_classes", "guess_mode", "control_window"):  # make_sample_fn's own
        kwargs.pop(key, None)
    if guidance < 0:
        raise ValueError(f"sample.guidance must be >= 0 (1 = no guidance), got {guidance}.")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"sample.guidance_rescale must lie in [0, 1], got {rescale}.")

    def run(noise, key):
        return samplers.sample(lambda x, t: x, noise, schedule=schedule, key=key, **kwargs)

    try:
        jax.eval_shape(run, jax.ShapeDtypeStruct((1, 1), jnp.float32), jax.random.key(0))
    except ValueError as e:
        raise ValueError(f"config.sample: {e}") from None
