"""The frozen front of a latent text-to-image run, and fine-tuning a pretrained pipeline.

A run whose data are images (not `data.source='latents'`) but whose model works on
latents (`latent.vae`), or whose captions are token ids of a pretrained tokenizer read
by a frozen text encoder (`text.encoder`), passes every batch through a `FrozenStage`
before the denoiser: images -> latents with the VAE's encoder (`scaling_factor *
(z - shift_factor)`, z a posterior draw or the mean), token ids -> the encoder's last
hidden states. The stage's weights are the train step's `frozen` argument: not in the
optimizer, the EMA or the checkpoints, recorded by hash in `frozen.json`
(`diffjax.pretrained.frozen`). Sampling encodes prompts through the same stage.

Cross-attention then sees every one of the L token states, padding included, with no
mask: the convention Stable Diffusion was trained with (diffusers' pipelines pass no
attention mask), and the null caption of classifier-free guidance is the encoding of
"" (BOS EOS), as in diffusers' `negative_prompt=""`.

`apply_pretrained(config)` fills a config from a diffusers pipeline directory
(`config.pretrained`): the U-Net's architecture, the scheduler's schedule and
prediction, the VAE, the text encoder and the tokenizer. `initial_params(config)` is the
U-Net's weights in the model's param tree: the start of a fine-tune.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import experiment, parallel
from diffjax.data.tokens import pretrained_tokenizer, tokenize
from diffjax.models import autoencoder_kl, sd_unet
from diffjax.pretrained import safetensors_io
from diffjax.pretrained import scheduler as scheduler_lib
from diffjax.pretrained.pipeline import (
    TEXT_PIPELINES,
    Component,
    component_dir,
    load_sd_unet,
    load_text_encoder,
    load_vae,
    read_model_index,
    text_encoder_dir,
    vae_dir,
)

# ----------------------------------------------------------------------------- fine-tuning

INPAINT_PIPELINE = "StableDiffusionInpaintPipeline"
# Pipelines whose U-Net a run fine-tunes: Stable Diffusion's text-to-image ones, and its
# inpainting one (a 9-channel U-Net: the run becomes an inpainting run).
FINETUNE_PIPELINES = tuple(
    dict.fromkeys(TEXT_PIPELINES + ("StableDiffusionImg2ImgPipeline", INPAINT_PIPELINE))
)


def apply_pretrained(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the fields a pipeline directory (`config.pretrained`) decides.

    Sets `model.name='sd_unet'` and `model.kwargs` (the U-Net's config), the
    `diffusion` schedule fields and `prediction` (the scheduler's), `diffusion.clip_x0 =
    False`, `latent.vae`, `text.encoder` and `data.tokenizer` (the pipeline itself),
    `data.max_text_len` (the tokenizer's 77), `data.channels` (the latent channels: the
    U-Net's output), `inpainting.enabled` (True for an SD-inpainting U-Net, whose input is
    `[x_t, mask, masked-image latents]`: 2 C + 1 channels), `data.num_classes = 0`, and
    `data.image_size` when it is 0 (the U-Net's
    `sample_size`: 64 latents = 512 pixels for SD 1.x). Idempotent, so a resume
    resolves to the same config. Returns `config` unchanged when `pretrained` is "".

    Raises:
      FileNotFoundError / ValueError: not a pipeline directory, not a Stable Diffusion
        pipeline, or a scheduler diffjax cannot train with (naming the option).
    """
    path = config.get("pretrained", "")
    if not path:
        return config
    path = os.path.abspath(os.path.expanduser(path))
    index = read_model_index(path)
    name = index.get("_class_name", "")
    if name not in FINETUNE_PIPELINES:
        raise ValueError(
            f"pretrained={path}: fine-tuning reads Stable Diffusion pipelines "
            f"{list(FINETUNE_PIPELINES)}, not {name!r}."
        )
    unet_cfg = safetensors_io.read_config(component_dir(path, index, "unet"))
    sched_cfg = safetensors_io.read_config(
        component_dir(path, index, "scheduler"), "scheduler_config.json"
    )
    try:
        # method='ddim': only the training schedule and prediction matter here.
        spec = scheduler_lib.scheduler_from_config(sched_cfg, method="ddim")
    except ValueError as e:
        raise ValueError(f"pretrained={path}: scheduler/scheduler_config.json: {e}") from e
    tokenizer = pretrained_tokenizer(path, None)
    cin = int(unet_cfg.get("in_channels", 4))
    cout = int(unet_cfg.get("out_channels", cin))
    inpainting = cin == 2 * cout + 1  # [x_t, mask, masked-image latents] (SD inpainting)
    if cin != cout and not inpainting:
        raise ValueError(
            f"pretrained={path}: its U-Net takes {cin} input channels and predicts {cout}; "
            f"fine-tuning runs text-to-image U-Nets ({cout} in) and inpainting ones "
            f"({2 * cout + 1} in: latents, mask, masked-image latents)."
        )
    if config.inpainting.enabled and not inpainting:
        raise ValueError(
            f"inpainting.enabled=True, but the U-Net of pretrained={path} is a text-to-image "
            f"one ({cin} input channels, not {2 * cout + 1}); fine-tune an inpainting pipeline "
            "(e.g. stable-diffusion-inpainting) or clear inpainting.enabled."
        )

    config = ml_collections.ConfigDict(config.to_dict())
    config.pretrained = path
    config.model.name = "sd_unet"
    config.model.kwargs = ml_collections.ConfigDict(_plain(sd_unet.diffusers_fields(unet_cfg)))
    f = config.diffusion
    f.schedule = "discrete_vp"
    for key, value in spec.schedule_kwargs.items():
        f[key] = value
    f.prediction = spec.prediction
    f.clip_x0 = False
    config.latent.vae = path
    config.text.encoder = path
    d = config.data
    d.tokenizer = path
    d.max_text_len = int(tokenizer.max_len)
    d.channels = cout
    config.inpainting.enabled = inpainting
    d.num_classes = 0
    if not d.image_size:
        size = unet_cfg.get("sample_size", 64)
        d.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return config


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def initial_params(config: ml_collections.ConfigDict, abstract_params: Any) -> Any:
    """The pipeline's U-Net weights (numpy, float32) in the tree of `abstract_params`.

    Raises:
      ValueError: the run's model is not the pipeline's U-Net (a changed
        `model.kwargs`), naming the mismatched leaves.
    """
    path = config.pretrained
    unet = load_sd_unet(component_dir(path, read_model_index(path), "unet"))
    want = jax.tree.map(lambda a: tuple(a.shape), abstract_params)
    got = jax.tree.map(lambda a: tuple(a.shape), unet.params)
    if want != got:
        raise ValueError(
            f"model.kwargs differ from the U-Net of pretrained={path}; the weights do not fit "
            "the configured model. Leave model.* to the pipeline when fine-tuning."
        )
    return unet.params


# ----------------------------------------------------------------------------- frozen stage


@dataclasses.dataclass
class FrozenStage:
    """Frozen components applied to each batch before the denoiser (module docstring).

    Attributes:
      vae: the VAE that encodes image batches (None: the data are latents already).
      text_encoder: the CLIP text encoder of token-id captions (None: no such captions).
      params: {"vae": ..., "text_encoder": ...} (those present), the step's `frozen`.
      null_context: (ids [L], mask [L]) of "" (the null caption), or None.
      sample_posterior: encode images to a posterior draw (else the mean).
      image_shape: the [H, W, C] of the images the data source must give (pixels).
      inpainting: an inpainting run (`inpainting.enabled`) with a VAE: `prepare` also
        builds `concat` = [the batch's `mask` downsampled to the latent grid (nearest,
        binarised), the latents of the masked image] (`experiment.inpaint_concat`).
      factor: the VAE's downsampling factor (1 without one).
    """

    vae: Component | None
    text_encoder: Component | None
    params: dict[str, Any]
    null_context: tuple[np.ndarray, np.ndarray] | None
    sample_posterior: bool
    image_shape: tuple[int, int, int]
    inpainting: bool = False
    factor: int = 1

    def prepare(self, frozen: dict[str, Any], batch: dict[str, Any], key: jax.Array):
        """A training batch with images encoded to latents and ids to embeddings (and an
        inpainting run's `concat`: the mask and the latents of the masked image)."""
        batch = dict(batch)
        if self.vae is not None:
            pixels = batch["image"]
            encode = functools.partial(
                _encode_images, self.vae.module, frozen["vae"], sample=self.sample_posterior
            )
            batch["image"] = encode(pixels, key)
            if self.inpainting:
                if "mask" not in batch:
                    raise ValueError(
                        "An inpainting run's batches carry a 'mask' (data.make_source(masks=...))."
                    )
                # The masked image's posterior draw has a key of its own.
                encode_masked = lambda x: encode(x, jax.random.fold_in(key, 1))  # noqa: E731
                batch["concat"] = experiment.latent_inpaint_concat(
                    pixels, batch["mask"], encode_masked, self.factor
                )
        return self.encode_condition(frozen, batch)

    def encode_condition(self, frozen: dict[str, Any], cond: dict[str, Any]) -> dict[str, Any]:
        """`context` token ids [B, L] -> last hidden states [B, L, D], mask all True."""
        if self.text_encoder is None or "context" not in cond:
            return cond
        return _encode_text(self.text_encoder.module, frozen["text_encoder"], cond)

    def conditions(self, cond: dict[str, Any]) -> dict[str, Any]:
        """`encode_condition` with the stage's own params, jitted (for sampling)."""
        if self.text_encoder is None or "context" not in cond:
            return cond
        return _jitted_text(self.text_encoder.module)(self.params["text_encoder"], cond)

    def null_condition(self, batch: int) -> dict[str, Any] | None:
        """The encoded null caption for `batch` rows (classifier-free guidance), or None."""
        if self.null_context is None or self.text_encoder is None:
            return None
        ids, mask = self.null_context
        return self.conditions(
            {
                "context": jnp.asarray(np.repeat(ids[None], batch, 0)),
                "context_mask": jnp.asarray(np.repeat(mask[None], batch, 0)),
            }
        )

    def with_params(self, **params: Any) -> FrozenStage:
        """The stage with some components' params replaced (a text encoder with a LoRA)."""
        return dataclasses.replace(self, params={**self.params, **params})


def _encode_text(module, params, cond: dict[str, Any]) -> dict[str, Any]:
    cond = dict(cond)
    hidden = module.apply({"params": params}, cond["context"])
    # No stop_gradient: a LoRA on the text encoder trains through it (the frozen weights
    # themselves are never differentiated, so nothing else is traced backwards).
    cond["context"] = hidden["last_hidden_state"].astype(jnp.float32)
    cond["context_mask"] = jnp.ones(cond["context"].shape[:2], bool)
    return cond


@functools.lru_cache(maxsize=4)
def _jitted_text(module):
    return jax.jit(functools.partial(_encode_text, module))


def _encode_images(vae_module, params, images, key, sample: bool):
    mean, logvar = vae_module.apply({"params": params}, images, method=vae_module.encode)
    z = autoencoder_kl.latent_sample(mean, logvar, key) if sample else mean
    scale, shift = float(vae_module.scaling_factor), float(vae_module.shift_factor or 0.0)
    return jax.lax.stop_gradient(autoencoder_kl.to_latents(z, scale, shift))


def needs_stage(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's batches pass through a `FrozenStage` (see `build_stage`)."""
    encodes_images = bool(config.latent.vae) and config.data.source != "latents"
    return encodes_images or bool(config.text.encoder)


def build_stage(config: ml_collections.ConfigDict, mesh=None) -> FrozenStage | None:
    """The run's frozen stage (None when it has none), params replicated over `mesh`.

    Raises:
      ValueError: a text encoder without a pretrained tokenizer (`data.tokenizer`), or
        a VAE whose latents do not have the model's `data.channels`.
    """
    if not needs_stage(config):
        return None
    d = config.data
    vae = text = None
    factor = 1
    image_shape = (d.image_size, d.image_size, d.channels)
    if config.latent.vae and d.source != "latents":
        vae = load_vae(vae_dir(config.latent.vae), config.model.dtype)
        latent_channels = int(vae.config.get("latent_channels", 4))
        if latent_channels != d.channels:
            raise ValueError(
                f"latent.vae={config.latent.vae} makes {latent_channels}-channel latents but "
                f"data.channels={d.channels}; set data.channels={latent_channels}."
            )
        factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        image_shape = (d.image_size * factor, d.image_size * factor, int(vae.config["in_channels"]))
    null = None
    if config.text.encoder:
        if not d.tokenizer:
            raise ValueError(
                f"text.encoder={config.text.encoder} embeds the ids of its own tokenizer; set "
                "data.tokenizer to its tokenizer folder (or the pipeline directory)."
            )
        text = load_text_encoder(text_encoder_dir(config.text.encoder), config.model.dtype)
        width, want = int(text.config["hidden_size"]), experiment.context_dim(config)
        if width != want:
            raise ValueError(
                f"text.encoder={config.text.encoder} gives {width}-wide token states but the "
                f"model attends to {want}-wide context; set the model's context width "
                f"(cross_attention_dim / context_dim) to {width}."
            )
        ids, mask = tokenize([""], d.max_text_len, d.tokenizer)
        null = (ids[0], mask[0])
    params = {}
    if vae is not None:
        params["vae"] = vae.params
    if text is not None:
        params["text_encoder"] = text.params
    if mesh is not None:
        params = jax.device_put(params, parallel.replicated(mesh))
    return FrozenStage(
        vae=vae,
        text_encoder=text,
        params=params,
        null_context=null,
        sample_posterior=bool(config.latent.sample_posterior),
        image_shape=image_shape,
        inpainting=experiment.is_inpainting(config),
        factor=factor,
    )


def data_fields(config: ml_collections.ConfigDict, stage: FrozenStage | None) -> dict[str, Any]:
    """`config.data` as `data.make_source` keywords (with the `dreambooth` section for
    that source), with the image size and channels of the pixels the stage encodes (the
    model's latent shape otherwise)."""
    fields = config.data.to_dict()
    if config.data.source == "dreambooth":
        fields["dreambooth"] = config.dreambooth.to_dict()
    if stage is not None and stage.vae is not None:
        fields["image_size"], _, fields["channels"] = stage.image_shape
    n = config.controlnet
    if n.control:  # each record gets its control image (`diffjax.data.control`)
        fields["control"] = n.control
        fields["control_options"] = {
            "channels": n.conditioning_channels,
            "canny_low": n.canny_low,
            "canny_high": n.canny_high,
            "tile_factor": n.tile_factor,
            "mask_threshold": n.mask_threshold,
        }
    if experiment.is_inpainting(config):  # each record gets a random mask (`data.masks`)
        fields["masks"] = experiment.mask_options(config)
    return fields


def resolve_controlnet(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with a ControlNet run's derived fields set (kept in config.json):
    `controlnet.control_downsample` (1 for pixel models, the VAE's factor when the images
    are encoded by `latent.vae`) and `controlnet.conditioning_channels` (0 -> the output
    image's channels). Idempotent; unchanged for other runs."""
    n = config.controlnet
    if not n.control or (n.control_downsample and n.conditioning_channels):
        return config
    factor, channels = 1, config.data.channels
    if config.latent.vae:
        vae_cfg = safetensors_io.read_config(vae_dir(config.latent.vae))
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        channels = int(vae_cfg.get("in_channels", 3))
    config = ml_collections.ConfigDict(config.to_dict())
    config.controlnet.control_downsample = n.control_downsample or factor
    config.controlnet.conditioning_channels = n.conditioning_channels or channels
    return config
