"""A diffusers pipeline directory -> Flax components and a sampler that reproduces it.

    pipe = load_pipeline("stable-diffusion-v1-5")       # model_index.json, unet/, vae/, ...
    gen = PretrainedGenerator(pipe, num_steps=20, guidance=7.5)
    images, _ = gen.generate(4, prompts=["a photo of a cat"], seed=0)   # uint8 [4, H, W, 3]

Supported pipelines (`model_index.json` `_class_name`):
  * `StableDiffusionPipeline` (SD 1.x/2.x): `unet/` (UNet2DConditionModel), `vae/`,
    `text_encoder/` (CLIPTextModel), `tokenizer/` (CLIP BPE), `scheduler/`;
  * `DiTPipeline`: `transformer/` (DiTTransformer2DModel, into diffjax's `dit`), `vae/`,
    `scheduler/`; class labels, the null class is `num_classes`;
  * `DDIMPipeline` / `DDPMPipeline`: `unet/` (UNet2DModel, into diffjax's `unet`) and
    `scheduler/`: what `export.py --format=diffusers` writes for pixel models.

The scheduler's config picks the schedule, the prediction, the sampler and its exact
step grid (`diffjax.pretrained.scheduler`); `method` overrides the sampler. Guidance is
diffusers' `uncond + w * (cond - uncond)`, where the unconditional branch of a text
model is the encoding of the negative prompt (`""` by default), as in diffusers.

Editing (`sample_fn.Edit`; `PretrainedGenerator._runner` has the details), as diffusers'
StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline run it:

    edit = Edit(images_uint8, masks=masks_uint8_or_None, strength=0.6)
    images, _ = gen.generate(4, prompts=[...], edit=edit)        # img2img / inpainting
    noise = gen.invert(images_uint8, prompts=[...])              # DDIM inversion
    again, _ = gen.generate(len(noise), prompts=[...], noise=noise)

`StableDiffusionInpaintPipeline` directories (a 9-channel U-Net: latents, mask, masked-image
latents) load like the text-to-image ones and need `edit` with masks.

ControlNets (`controlnet.load_controlnet`) drive the denoiser as diffusers'
`StableDiffusionControlNetPipeline` does:

    gen = PretrainedGenerator(pipe, controlnets=[cn], controlnet_scale=1.0,
                              guess_mode=False, control_guidance=(0.0, 1.0))
    images, _ = gen.generate(2, prompts=[...], control=[edges_uint8])   # [N, H, W, 3]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import images, parallel
from diffjax.config import get_base_config
from diffjax.diffusion import editing, samplers, schedules
from diffjax.models import autoencoder_kl, clip_text, registry, sd_unet
from diffjax.models.controlnet import Controlled
from diffjax.pretrained import convert, diffusers_dit, diffusers_unet2d, safetensors_io
from diffjax.pretrained import scheduler as scheduler_lib
from diffjax.sample_fn import Edit, index_batches, make_invert_fn, make_sample_fn, noise_batches
from diffjax.text.clip_bpe import CLIPTokenizer

TEXT_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
)
CLASS_PIPELINES = ("DiTPipeline",)
PIXEL_PIPELINES = ("DDIMPipeline", "DDPMPipeline")
PIPELINES = TEXT_PIPELINES + CLASS_PIPELINES + PIXEL_PIPELINES


@dataclasses.dataclass
class Component:
    """A Flax module with its params (and its diffusers/HF config)."""

    module: Any
    params: Any
    config: dict


@dataclasses.dataclass
class Pipeline:
    """The loaded parts of a pipeline directory."""

    path: str
    class_name: str
    denoiser: Component
    scheduler: scheduler_lib.SchedulerSpec
    scheduler_config: dict
    vae: Component | None = None
    text_encoder: Component | None = None
    tokenizer: CLIPTokenizer | None = None
    num_classes: int = 0

    @property
    def kind(self) -> str:
        """'text', 'label' or '' (unconditional)."""
        if self.text_encoder is not None:
            return "text"
        return "label" if self.num_classes else ""

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def inpainting(self) -> bool:
        """An SD-inpainting U-Net: its input is `[x_t, mask, masked image latents]`
        (`in_channels = 2 * latent_channels + 1`, 9 for SD)."""
        if self.vae is None or self.text_encoder is None:
            return False
        c = int(self.vae.config.get("latent_channels", 4))
        return int(self.denoiser.config.get("in_channels", c)) == 2 * c + 1

    @property
    def latent_channels(self) -> int:
        """Channels of the state the sampler integrates (the VAE's latents for an
        inpainting U-Net, whose extra input channels are the condition)."""
        if self.inpainting:
            return int(self.vae.config.get("latent_channels", 4))
        return int(self.denoiser.config.get("in_channels", 4))

    def default_size(self) -> int:
        """The output resolution the denoiser was trained at (pixels)."""
        size = self.denoiser.config.get("sample_size", 64)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale


# ----------------------------------------------------------------------------- loading


def read_model_index(path: str) -> dict:
    """`model_index.json` of a pipeline directory, with a clear error."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--pretrained={path} is not a directory; point it at a downloaded diffusers "
            "pipeline (the folder holding model_index.json)."
        )
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"{path} has no model_index.json: it is not a diffusers pipeline directory "
            "(e.g. `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 "
            "--local-dir DIR` gives one)."
        )
    return safetensors_io.read_config(path, "model_index.json")


def component_dir(path: str, index: dict, name: str) -> str:
    """`path/name`, a component `model_index.json` (`index`) lists, checked to exist."""
    entry = index.get(name)
    if not entry or entry[0] is None:
        raise ValueError(f"{path}/model_index.json names no {name!r} component.")
    directory = os.path.join(path, name)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is missing (model_index.json lists {name!r}).")
    return directory


def _abstract(module, *args, **kwargs):
    """The params tree of `module.init(key, *args, **kwargs)` as shapes (no compute)."""

    def init(key, args, kwargs):
        return module.init(key, *args, **kwargs)["params"]

    return jax.eval_shape(init, jax.random.key(0), args, kwargs)


def load_vae(directory: str, dtype: str = "float32") -> Component:
    """A diffusers `AutoencoderKL` directory (`vae/`)."""
    cfg = safetensors_io.read_config(directory)
    module = autoencoder_kl.from_diffusers_config(cfg, dtype=dtype)
    size = 8 * 2 ** (len(cfg["block_out_channels"]) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, int(cfg.get("in_channels", 3))), jnp.float32)
    tensors = autoencoder_kl.fix_legacy_tensors(safetensors_io.read_tensors(directory))
    params = convert.torch_to_flax(tensors, _abstract(module, x), what=f"vae ({directory})")
    return Component(module, params, cfg)


def load_text_encoder(directory: str, dtype: str = "float32") -> Component:
    """A transformers `CLIPTextModel` directory (`text_encoder/`)."""
    cfg = safetensors_io.read_config(directory)
    module = clip_text.from_hf_config(cfg, dtype=dtype)
    ids = jax.ShapeDtypeStruct((1, int(cfg.get("max_position_embeddings", 77))), jnp.int32)
    params = convert.torch_to_flax(
        safetensors_io.read_tensors(directory),
        _abstract(module, ids),
        what=f"text_encoder ({directory})",
        rename=clip_text.canonical_key,
        ignore=clip_text.ignored_key,
    )
    return Component(module, params, cfg)


def load_sd_unet(directory: str, dtype: str = "float32") -> Component:
    """A diffusers `UNet2DConditionModel` directory (`unet/`)."""
    cfg = safetensors_io.read_config(directory)
    module = sd_unet.from_diffusers_config(cfg, dtype=dtype)
    levels = len(cfg["block_out_channels"])
    size = 2 ** (levels - 1)
    x = jax.ShapeDtypeStruct((1, size, size, int(cfg["in_channels"])), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 1, int(cfg["cross_attention_dim"])), jnp.float32)
    params = convert.torch_to_flax(
        safetensors_io.read_tensors(directory),
        _abstract(module, x, t, context=ctx),
        what=f"unet ({directory})",
    )
    return Component(module, params, cfg)


def _load_own(directory: str, loader: Callable, name: str, dtype: str) -> Component:
    """diffjax's own `dit`/`unet` from a diffusers DiT / UNet2DModel directory."""
    kwargs, params = loader(directory)
    module = registry.build_model(name, **kwargs, dtype=dtype)
    cfg = safetensors_io.read_config(directory)
    return Component(module, params, {**cfg, "diffjax_model": name, "diffjax_kwargs": kwargs})


def load_pipeline(path: str, *, method: str | None = None, dtype: str = "float32") -> Pipeline:
    """Loads every component of a pipeline directory.

    Args:
      path: the directory holding `model_index.json`.
      method: a diffjax sampler name overriding the scheduler's own.
      dtype: compute dtype of the networks ('float32' | 'bfloat16'); params stay float32.

    Raises:
      FileNotFoundError / ValueError naming the missing file, the unsupported pipeline,
      scheduler option or component, and `convert.ConversionError` naming every
      missing, unexpected or mis-shaped tensor.
    """
    index = read_model_index(path)
    name = index.get("_class_name", "")
    if name not in PIPELINES:
        raise ValueError(
            f"{path}: pipeline {name!r} is not supported; diffjax loads {list(PIPELINES)}."
        )
    sched_dir = component_dir(path, index, "scheduler")
    sched_cfg = safetensors_io.read_config(sched_dir, "scheduler_config.json")
    # A diffjax export says how its DDIM steps with clip_sample (diffjax.json).
    own = os.path.join(path, "diffjax.json")
    clipped = bool(os.path.isfile(own) and json.load(open(own)).get("use_clipped_model_output"))
    try:
        spec = scheduler_lib.scheduler_from_config(
            sched_cfg, method=method, use_clipped_model_output=clipped
        )
    except ValueError as e:
        raise ValueError(
            f"{sched_dir}/scheduler_config.json: {e} (on the command line: --method=ddim, "
            "for example)"
        ) from e
    parts = dict(path=path, class_name=name, scheduler=spec, scheduler_config=sched_cfg)
    if name in TEXT_PIPELINES:
        pipe = Pipeline(
            denoiser=load_sd_unet(component_dir(path, index, "unet"), dtype),
            vae=load_vae(component_dir(path, index, "vae"), dtype),
            text_encoder=load_text_encoder(component_dir(path, index, "text_encoder"), dtype),
            tokenizer=CLIPTokenizer.from_dir(component_dir(path, index, "tokenizer")),
            **parts,
        )
        c = int(pipe.vae.config.get("latent_channels", 4))
        got = int(pipe.denoiser.config.get("in_channels", c))
        if got not in (c, 2 * c + 1):
            raise ValueError(
                f"{path}/unet takes {got} input channels; diffjax runs U-Nets on the VAE's "
                f"{c} latent channels (text-to-image) or {2 * c + 1} (SD inpainting: latents, "
                "mask, masked-image latents)."
            )
        return pipe
    if name in CLASS_PIPELINES:
        den_dir, loader, model = "transformer", diffusers_dit.load_dit, "dit"
    else:
        den_dir, loader, model = "unet", diffusers_unet2d.load_unet2d, "unet"
    den = _load_own(component_dir(path, index, den_dir), loader, model, dtype)
    # Pixel-space models (a diffjax export, a pixel DiT) have no VAE.
    has_vae = (index.get("vae") or [None])[0] is not None
    return Pipeline(
        denoiser=den,
        vae=load_vae(component_dir(path, index, "vae"), dtype) if has_vae else None,
        num_classes=int(den.config["diffjax_kwargs"].get("num_classes", 0)),
        **parts,
    )


# ----------------------------------------------------------------------------- sampling


def encode_prompts(pipe: Pipeline, prompts: Sequence[str]) -> jax.Array:
    """Prompts -> the text encoder's last hidden states [B, L, D] (float32)."""
    if pipe.text_encoder is None or pipe.tokenizer is None:
        raise ValueError(f"{pipe.class_name} is not a text-to-image pipeline; pass labels.")
    ids, _ = pipe.tokenizer.encode(list(prompts))
    out = _text_apply(pipe.text_encoder.module)(pipe.text_encoder.params, jnp.asarray(ids))
    return out


@functools.lru_cache(maxsize=8)
def _text_apply(module):
    @jax.jit
    def fn(params, ids):
        return module.apply({"params": params}, ids)["last_hidden_state"].astype(jnp.float32)

    return fn


def decode_latents(pipe: Pipeline, params: Any, latents: jax.Array) -> jax.Array:
    """Model-space latents -> images in [-1, 1] (the VAE's `1/scaling_factor + shift`)."""
    return latents if pipe.vae is None else _decode_with(pipe.vae, params, latents)


def vae_dir(path: str) -> str:
    """The `AutoencoderKL` component directory behind `path` (a pipeline's `vae/`, or itself).

    Raises:
      FileNotFoundError: `path` is neither a pipeline with a `vae/` nor a VAE directory.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--vae={path} is not a directory; give a diffusers pipeline directory (with "
            "vae/) or an AutoencoderKL directory (config.json + safetensors weights)."
        )
    if os.path.isfile(os.path.join(path, "model_index.json")):
        vae = os.path.join(path, "vae")
        if not os.path.isdir(vae):
            raise FileNotFoundError(
                f"{path} is a pipeline directory without a vae/ component; give a pipeline "
                "of a latent model (Stable Diffusion, DiT) or a VAE directory."
            )
        return vae
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path} holds neither model_index.json (a pipeline) nor config.json (an "
            "AutoencoderKL directory); point --vae at one of them."
        )
    return path


def text_encoder_dir(path: str) -> str:
    """The text encoder directory behind `path` (a pipeline's `text_encoder/`, or itself)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return component_dir(path, read_model_index(path), "text_encoder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"text.encoder={path} is neither a pipeline directory (model_index.json) nor a "
            "CLIPTextModel directory (config.json + safetensors weights)."
        )
    return path


class LatentDecoder:
    """A frozen VAE decoding model-space latents to images in [-1, 1].

    `LatentDecoder.from_path(config.latent.vae)`; calling it on latents [B, h, w, c]
    returns [B, h*f, w*f, C] float32 (f: `factor`), with params replicated over `mesh`.
    """

    def __init__(self, vae: Component, path: str, mesh: Any = None) -> None:
        self.vae, self.path = vae, path
        self.factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        self.latent_channels = int(vae.config.get("latent_channels", 4))
        self.out_channels = int(vae.config.get("out_channels", 3))
        params = vae.params
        if mesh is not None:
            params = jax.device_put(params, parallel.replicated(mesh))
        self.params = params
        self._decode = jax.jit(functools.partial(_decode_with, vae))
        self._encode = None

    @classmethod
    def from_path(cls, path: str, mesh: Any = None, dtype: str = "float32") -> LatentDecoder:
        directory = vae_dir(path)
        return cls(load_vae(directory, dtype), directory, mesh)

    def image_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """The decoded image shape [H, W, C] of latents [h, w, c]."""
        h, w, c = latent_shape
        if c != self.latent_channels:
            raise ValueError(
                f"the model makes {c}-channel latents but the VAE {self.path} decodes "
                f"{self.latent_channels}; set data.channels={self.latent_channels} or use "
                "the VAE the latents were encoded with."
            )
        return (h * self.factor, w * self.factor, self.out_channels)

    def __call__(self, latents: jax.Array) -> jax.Array:
        return self._decode(self.params, latents)

    def encode(self, images: jax.Array) -> jax.Array:
        """Images [B, H, W, C] in [-1, 1] -> model-space latents [B, h, w, c]: the
        posterior mean (no sampling noise), scaled and shifted as training's latents."""
        if self._encode is None:
            self._encode = jax.jit(functools.partial(encode_with, self.vae))
        return self._encode(self.params, images)


def encode_with(vae: Component, params: Any, images: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> model-space latents: the VAE posterior mean, `(z - shift) *
    scaling_factor` (deterministic; what editing starts from)."""
    cfg = vae.config
    mean, _ = vae.module.apply({"params": params}, images, method=vae.module.encode)
    return autoencoder_kl.to_latents(
        mean, float(cfg.get("scaling_factor", 0.18215)), float(cfg.get("shift_factor") or 0.0)
    )


def _decode_with(vae: Component, params: Any, latents: jax.Array) -> jax.Array:
    cfg = vae.config
    z = autoencoder_kl.from_latents(
        latents, float(cfg.get("scaling_factor", 0.18215)), float(cfg.get("shift_factor") or 0.0)
    )
    return vae.module.apply({"params": params}, z, method=vae.module.decode)


def sampler_config(pipe: Pipeline, *, num_steps: int, guidance: float) -> ml_collections.ConfigDict:
    """The run-config view of a pretrained pipeline (what evaluation and sample.py read):
    the sampler, the class count and `data.image_size`/`channels` at the default size."""
    c = get_base_config()
    c.data.image_size = pipe.default_size()
    c.data.channels = 3 if pipe.vae is not None else pipe.latent_channels
    c.data.num_classes = pipe.num_classes
    c.sample.method = pipe.scheduler.method
    c.sample.num_steps = num_steps
    c.sample.guidance = guidance
    c.diffusion.prediction = pipe.scheduler.prediction
    return c


class PretrainedGenerator:
    """A pipeline with a compiled sampler: draws uint8 images in fixed-size batches.

    The interface of `diffjax.generate.Generator` (`config`, `step`, `num_classes`,
    `batches`, `generate`, `invert`; editing with `edit=`), plus prompts and explicit
    initial noise.
    """

    def __init__(
        self,
        pipe: Pipeline,
        *,
        num_steps: int = 50,
        guidance: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        mesh: Any = None,
        controlnets: Sequence[Component] = (),
        controlnet_scale: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
        control_guidance: tuple[float, float] = (0.0, 1.0),
        compiler_options: dict | None = None,
    ) -> None:
        """
        Args:
          pipe: the loaded pipeline.
          num_steps, guidance: sampler steps and classifier-free guidance scale.
          height, width: output size in pixels (default: the denoiser's training size).
          mesh: device mesh (default: all devices on the batch axis).
          controlnets: ControlNet components (`controlnet.load_controlnet`) driving the
            denoiser as diffusers' StableDiffusionControlNetPipeline does; their
            residuals are scaled and summed. `batches`/`generate` then need `control`.
          controlnet_scale: diffusers' `controlnet_conditioning_scale`: one float, or
            one per ControlNet.
          guess_mode: diffusers' guess mode: residuals scaled by logspace(-1, 0) over the
            skip connections, and (with guidance) the unconditional branch without them.
          control_guidance: diffusers' `(control_guidance_start, control_guidance_end)`:
            the fraction of the steps where the ControlNets apply.
          compiler_options: XLA options of the compiled sampler (e.g. cheaper
            compilation in tests); None: XLA's defaults.
        """
        self.pipe = pipe
        self.step = 0
        self.config = sampler_config(pipe, num_steps=num_steps, guidance=guidance)
        h, w = height or pipe.default_size(), width or pipe.default_size()
        if h % pipe.vae_scale or w % pipe.vae_scale:
            raise ValueError(
                f"--height/--width must be multiples of {pipe.vae_scale} for this VAE, got {h}x{w}."
            )
        if h == w:
            self.config.data.image_size = h
        #: uint8 output images [H, W, C] and the noise they start from [h, w, c].
        self.image_shape = (h, w, self.config.data.channels)
        self.latent_shape = (h // pipe.vae_scale, w // pipe.vae_scale, pipe.latent_channels)
        self.mesh = mesh if mesh is not None else parallel.make_mesh(-1, 1)
        spec = pipe.scheduler
        schedule = schedules.make_schedule("discrete_vp", **spec.schedule_kwargs)
        kwargs = spec.sampler_kwargs(num_steps, guidance)
        self.controlnets = tuple(controlnets)
        self.guess_mode = bool(guess_mode)
        self.controlnet_scale = self._check_controlnets(controlnet_scale)
        if self.controlnets and pipe.inpainting:
            raise ValueError(
                f"{pipe.path} has an SD-inpainting U-Net: ControlNets (made for a "
                "text-to-image U-Net's input) do not drive it here; drop --controlnet."
            )
        apply_fn, den_params = pipe.denoiser.module.apply, pipe.denoiser.params
        window = None
        if self.controlnets:
            model = Controlled(
                pipe.denoiser.module, tuple(c.module for c in self.controlnets), self.guess_mode
            )
            apply_fn = model.apply
            den_params = {"base": den_params}
            den_params.update({f"controlnets_{i}": c.params for i, c in enumerate(controlnets)})
            start, end = (float(v) for v in control_guidance)
            if (start, end) != (0.0, 1.0):
                window = samplers.step_window(
                    schedule, kwargs["method"], num_steps, start, end, placement=kwargs["placement"]
                )
        self._apply_fn, self._schedule = apply_fn, schedule
        self._sample_kwargs = dict(
            num_classes=pipe.num_classes,
            control_window=window,
            guess_mode=self.guess_mode,
            **kwargs,
        )
        self._compiler_options = compiler_options
        # diffusers starts from `noise * init_noise_sigma`; diffjax's samplers from
        # `sigma(t_0) * noise`: this factor makes a given noise start where diffusers does.
        self._noise_scale = spec.noise_scale(num_steps)
        vae_params = None if pipe.vae is None else pipe.vae.params
        rep = parallel.replicated(self.mesh)
        self.params = jax.device_put((den_params, vae_params), rep)
        # Compiled runs: one for plain sampling, one per distinct set of static editing
        # options (`_runner`), one per inversion method (`_inverter`).
        self._runs: dict[Any, Callable] = {}

    def _runner(self, edit: Edit | None) -> Callable:
        """The compiled `run(params, noise, cond, null, key, pixels, masks)` -> images in
        [-1, 1] of plain sampling (`edit` None) or of an edit with `edit`'s static options.

        Editing (diffusers' StableDiffusionImg2ImgPipeline / InpaintPipeline):
          * img2img (`strength < 1`): the last `round(strength * steps)` steps from the
            image's VAE latents (posterior mean) noised to the first of them,
            `alpha latents + sigma noise` (diffusers' `add_noise`: the given noise is not
            scaled by `noise_scale` then);
          * an ordinary U-Net inpaints by blending (`samplers.sample`'s `inpaint_known`)
            under the mask downsampled to the latent grid (`mode='any'`: a latent is
            regenerated when any of its pixels is), with the initial noise for the known
            region (`inpaint_noise='fixed'`, diffusers' inpainting pipeline), or RePaint's
            resampling (fresh noise);
          * an SD-inpainting U-Net (`pipe.inpainting`) gets `cond["concat"] = [mask
            (nearest), latents of the masked image]` in both guidance branches and no
            blending, as diffusers' StableDiffusionInpaintPipeline runs a 9-channel U-Net;
          * with a mask the known pixels are pasted back after decoding, exactly.
        """
        if not _uses_images(edit):
            edit = None  # strength 1 without masks: plain sampling (one compiled run)
        masked = edit is not None and edit.masks is not None
        options = {} if edit is None else edit.sampler_kwargs()
        key = None if edit is None else (tuple(sorted(options.items())), masked)
        if key in self._runs:
            return self._runs[key]
        pipe = self.pipe
        blend = masked and not pipe.inpainting
        if blend and edit.inpaint == "blend":
            options["inpaint_noise"] = "fixed"
        sample = make_sample_fn(
            self._apply_fn,
            self._schedule,
            jit=False,
            **self._sample_kwargs,
            **options,
        )
        strength = float(options.get("strength", 1.0))
        scale = self._noise_scale if strength >= 1.0 else 1.0
        factor = pipe.vae_scale

        def run(params, noise, cond, null_cond, key, pixels, masks):
            den, vae = params
            arrays = {}
            if pixels is not None:
                known = pixels if pipe.vae is None else encode_with(pipe.vae, vae, pixels)
                if strength < 1.0:
                    arrays["init_image"] = known
                if masks is not None and pipe.inpainting:
                    hidden = encode_with(pipe.vae, vae, editing.masked_image(pixels, masks))
                    small = editing.downsample_mask(masks, factor, mode="nearest")
                    cond = {**cond, "concat": jnp.concatenate([small, hidden], axis=-1)}
                elif masks is not None:
                    small = editing.downsample_mask(masks, factor, mode="any")
                    arrays.update(inpaint_known=known, inpaint_mask=small)
            x = sample(den, noise * scale, cond, key, null_cond=null_cond, edit=arrays or None)
            x = decode_latents(pipe, vae, x)
            if masks is not None:  # the kept pixels, exactly
                x = jnp.where(masks >= 0.5, x, pixels)
            return x

        self._runs[key] = jax.jit(run, compiler_options=self._compiler_options)
        return self._runs[key]

    def _check_edit(self, edit: Edit | None) -> None:
        """Refuses an edit this pipeline cannot run (and an inpainting U-Net without one)."""
        if edit is None:
            if self.pipe.inpainting:
                raise ValueError(
                    f"{self.pipe.path} has an SD-inpainting U-Net (in_channels "
                    f"{self.pipe.denoiser.config.get('in_channels')}): it needs images and "
                    "masks to inpaint (--init_images and --mask)."
                )
            return
        if not isinstance(edit, Edit):
            raise TypeError(f"edit must be a sample_fn.Edit, got {type(edit).__name__}.")
        edit.check(self.image_shape, f"the pipeline at --height/--width {self.image_shape[:2]}")
        if self.pipe.inpainting:
            if edit.masks is None:
                raise ValueError(
                    f"{self.pipe.path} has an SD-inpainting U-Net (in_channels "
                    f"{self.pipe.denoiser.config.get('in_channels')}): it needs --mask (uint8 "
                    "[N, H, W], 255 = regenerate); img2img runs on a text-to-image pipeline."
                )
            if edit.inpaint != "blend":
                raise ValueError(
                    f"--inpaint={edit.inpaint}: an SD-inpainting U-Net sees the mask and the "
                    "masked image itself and is not blended (as in diffusers); RePaint "
                    "applies to ordinary U-Nets. Drop --inpaint."
                )

    @property
    def num_classes(self) -> int:
        return self.pipe.num_classes

    def _check_controlnets(self, scale: float | Sequence[float]) -> np.ndarray:
        """The per-ControlNet scales [K] (float32), after checking the ControlNets fit."""
        k = len(self.controlnets)
        scales = np.atleast_1d(np.asarray(scale, np.float32))
        if not k:
            return scales[:0]
        if scales.ndim != 1 or scales.size not in (1, k):
            raise ValueError(
                f"controlnet_scale needs one value or one per ControlNet ({k}), got "
                f"{np.asarray(scale).tolist()}."
            )
        for i, c in enumerate(self.controlnets):
            if getattr(c.module, "global_pool_conditions", False):
                raise ValueError(
                    f"ControlNet {i} has global_pool_conditions=True (residuals [B, 1, 1, C]); "
                    "the U-Net adds residuals of its skip connections' shape only."
                )
            factor = getattr(c.module, "downsampling", None)
            if factor is not None and factor != self.pipe.vae_scale:
                raise ValueError(
                    f"ControlNet {i}'s condition embedding downsamples by {factor} but this "
                    f"pipeline's VAE by {self.pipe.vae_scale}: it was made for another base "
                    "model (controlnet.check_compatible names every difference)."
                )
        return np.broadcast_to(scales, (k,)).copy()

    def _controls(self, control, idx: np.ndarray) -> tuple[jax.Array, ...]:
        """The control images of samples `idx` (cycled), one float32 [n, H, W, C] in [0, 1]
        per ControlNet."""
        k = len(self.controlnets)
        if control is None:
            raise ValueError(
                f"This generator runs {k} ControlNet(s): pass control= (one image array "
                "[N, H, W, C] per ControlNet; --control_image on the command line)."
            )
        if not isinstance(control, (list, tuple)):
            control = [control]
        if len(control) != k:
            raise ValueError(f"{k} ControlNet(s) need {k} control arrays, got {len(control)}.")
        h, w = self.image_shape[:2]
        out = []
        for i, (c, net) in enumerate(zip(control, self.controlnets, strict=True)):
            c = np.asarray(c)
            if c.ndim == 3:
                c = c[None]
            want = getattr(net.module, "conditioning_channels", c.shape[-1])
            if c.ndim != 4 or c.shape[1:] != (h, w, want):
                raise ValueError(
                    f"control {i} must be [N, {h}, {w}, {want}] (the output image size, the "
                    f"ControlNet's conditioning_channels), got {list(c.shape)}."
                )
            if c.dtype == np.uint8:
                c = c.astype(np.float32) / 255.0
            elif not np.issubdtype(c.dtype, np.floating):
                raise ValueError(f"control {i} must be uint8 or float in [0, 1], got {c.dtype}.")
            elif c.size and (c.min() < 0.0 or c.max() > 1.0):
                raise ValueError(
                    f"float control {i} must lie in [0, 1] (diffusers' convention, not "
                    f"[-1, 1]), got values in [{c.min():.3g}, {c.max():.3g}]."
                )
            out.append(jnp.asarray(c[idx % len(c)], jnp.float32))
        return tuple(out)

    def _with_control(self, cond: dict, null: dict | None, idx: np.ndarray, control):
        """`cond`/`null` with the ControlNets' control images and per-sample scales."""
        if not self.controlnets:
            if control is not None:
                raise ValueError("control images were given, but no ControlNet (--controlnet).")
            return cond, null
        controls = self._controls(control, idx)
        scale = jnp.broadcast_to(jnp.asarray(self.controlnet_scale), (len(idx), len(controls)))
        cond = {**cond, "control": controls, "control_scale": scale}
        if null is not None:
            # diffusers: both halves get the control; in guess mode the unconditional
            # one runs without it (zero residuals).
            null_scale = jnp.zeros_like(scale) if self.guess_mode else scale
            null = {**null, "control": controls, "control_scale": null_scale}
        return cond, null

    def _conditions(
        self, idx: np.ndarray, labels, prompts, negative_prompt: str
    ) -> tuple[dict, dict | None, np.ndarray]:
        kind = self.pipe.kind
        if kind == "text":
            if not prompts:
                raise ValueError("A text-to-image pipeline needs --prompt (one or more).")
            rows = [prompts[i % len(prompts)] for i in idx]
            ctx = encode_prompts(self.pipe, rows)
            neg = encode_prompts(self.pipe, [negative_prompt])
            null = jnp.broadcast_to(neg, ctx.shape)
            return {"context": ctx}, {"context": null}, np.zeros(len(idx), np.int32)
        if prompts:
            raise ValueError(f"{self.pipe.class_name} is not text-conditioned; drop --prompt.")
        if kind == "label":
            k = self.num_classes
            if isinstance(labels, str) and labels == "none":
                labels = [k]  # --labels=none: the null class
            if labels is not None and len(labels):
                given = np.asarray(labels, np.int32)
                if given.min() < 0 or given.max() > k:
                    raise ValueError(
                        f"labels must lie in [0, {k - 1}] ({k}: the null class, an "
                        f"unconditional sample), got {given.tolist()}."
                    )
                lab = given[idx % len(given)]
            else:
                lab = (idx % k).astype(np.int32)
            return {"labels": jnp.asarray(lab)}, None, lab
        return {}, None, np.zeros(len(idx), np.int32)

    def batches(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        labels: Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        negative_prompt: str = "",
        noise: np.ndarray | None = None,
        batch_size: int = 16,
        progress: bool = False,
        control: Sequence[np.ndarray] | np.ndarray | None = None,
        edit: Edit | None = None,
        first_batch: int = 0,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (uint8 images [n, H, W, 3], labels int32 [n]) batch by batch.

        `noise` [N, h, w, c] (standard normal, latent shape) replaces the draw from
        `seed`; prompts and labels are cycled to `num_samples`. With ControlNets,
        `control` holds one array per ControlNet, [N, H, W, C] at the output size, uint8
        or float in [0, 1] (RGB), cycled to `num_samples` like the prompts.

        `edit` (`sample_fn.Edit`, images at the output size) edits images instead, sample
        i editing `edit.images[i % M]` (`_runner` says how): img2img from
        `edit.strength` (diffusers' img2img runs `int(strength * steps)` steps, diffjax
        `round(...)`: equal when `strength * steps` is whole), inpainting with
        `edit.masks` (255 = regenerate), whose kept pixels come back exactly. An
        SD-inpainting pipeline (`pipe.inpainting`) needs `edit` with masks.

        `first_batch` starts at that batch, as `Generator.batches` does.
        """
        self._check_edit(edit)
        run = self._runner(edit)
        sharding = parallel.batch_sharding(self.mesh)
        for start, n, z, key in noise_batches(
            num_samples,
            batch_size,
            self.mesh,
            self.latent_shape,
            seed=seed,
            noise=noise,
            progress=progress,
            first_batch=first_batch,
        ):
            idx = np.arange(start, start + z.shape[0])
            cond, null, lab = self._conditions(idx, labels, prompts, negative_prompt)
            cond, null = self._with_control(cond, null, idx, control)
            pixels, masks = edit.pixels(idx) if _uses_images(edit) else (None, None)
            z, cond, null, pixels, masks = jax.device_put((z, cond, null, pixels, masks), sharding)
            x = run(self.params, z, cond, null, key, pixels, masks)
            yield images.to_uint8(parallel.gather(x))[:n], lab[:n]

    def invert(
        self,
        images_u8: np.ndarray,
        *,
        labels: Sequence[int] | str | None = None,
        prompts: Sequence[str] | None = None,
        negative_prompt: str = "",
        method: str | None = None,
        batch_size: int = 16,
        progress: bool = False,
    ) -> np.ndarray:
        """Images -> the noise from which `batches(noise=...)` regenerates them.

        The images' VAE latents (posterior mean) are inverted (`diffusion.editing.invert`:
        DDIM, or DPM-Solver++(2M)) on this generator's schedule, timesteps, steps and
        guidance, with image i's prompt / label (cycled, as in `batches`; guidance's
        unconditional branch the negative prompt). Sample back with the same method
        (`load_pipeline(..., method=)`), steps, guidance and prompts: the result is the
        noise in `batches`' convention (divided by the factor `batches` multiplies given
        noise by).

        Args:
          images_u8: uint8 [N, H, W, C] at the output size.
          labels, prompts, negative_prompt: the condition, as for `batches`.
          method: `ddim` (default) or `dpmpp_2m`.
          batch_size: images per device call.
          progress: show a progress bar.

        Returns:
          float32 [N, h, w, c]: the noise (latent shape).
        """
        if self.controlnets:
            raise ValueError(
                "invert does not take control images; invert with the base pipeline (drop "
                "--controlnet)."
            )
        if self.pipe.inpainting:
            raise ValueError(
                f"{self.pipe.path} has an SD-inpainting U-Net: it needs a mask at every step; "
                "invert with a text-to-image pipeline."
            )
        imgs = np.asarray(images_u8)
        Edit(imgs).check(
            self.image_shape,
            f"the pipeline at --height/--width {self.image_shape[:2]}",
            flag="--images",
        )
        method = method or "ddim"
        if method not in editing.INVERSION_METHODS:
            raise ValueError(
                f"inversion supports {list(editing.INVERSION_METHODS)}, not {method!r}."
            )
        run = self._inverter(method)
        n_total = len(imgs)
        sharding = parallel.batch_sharding(self.mesh)
        out = []
        for _, idx in index_batches(
            n_total, batch_size, self.mesh, progress=progress, desc="invert"
        ):
            cond, null, _ = self._conditions(idx, labels, prompts, negative_prompt)
            pixels = images.uint8_to_float(imgs[idx % n_total])
            pixels, cond, null = jax.device_put((pixels, cond, null), sharding)
            z = run(self.params, pixels, cond, null)
            out.append(np.asarray(parallel.gather(z), np.float32)[: n_total - idx[0]])
        return np.concatenate(out)

    def _inverter(self, method: str) -> Callable:
        """The compiled `run(params, pixels, cond, null) -> noise` of `method`'s inversion."""
        key = ("invert", method)
        if key in self._runs:
            return self._runs[key]
        kwargs = {**self._sample_kwargs, "method": method}
        kwargs.pop("control_window")
        invert = make_invert_fn(self._apply_fn, self._schedule, jit=False, **kwargs)
        pipe, scale = self.pipe, self._noise_scale

        def run(params, pixels, cond, null_cond):
            den, vae = params
            x = pixels if pipe.vae is None else encode_with(pipe.vae, vae, pixels)
            return invert(den, x, cond, null_cond=null_cond) / scale

        self._runs[key] = jax.jit(run, compiler_options=self._compiler_options)
        return self._runs[key]

    def generate(self, num_samples: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """All of `batches(num_samples, **kwargs)` in memory."""
        parts = list(self.batches(num_samples, **kwargs))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _uses_images(edit: Edit | None) -> bool:
    """Whether an edit reads its images (img2img below strength 1, or inpainting)."""
    return edit is not None and (edit.strength < 1.0 or edit.masks is not None)


def describe(pipe: Pipeline) -> str:
    """One line for logs: the pipeline, its denoiser and scheduler."""
    return (
        f"{pipe.class_name} from {pipe.path} ({pipe.kind or 'unconditional'}"
        f"{', inpainting U-Net' if pipe.inpainting else ''}; scheduler "
        f"{pipe.scheduler_config.get('_class_name', '?')} -> {pipe.scheduler.method}, "
        f"prediction {pipe.scheduler.prediction})"
    )


def model_index_json(
    class_name: str, components: dict[str, tuple[str | None, str | None]], **options: Any
) -> str:
    """A `model_index.json` text for a pipeline of `components` (name -> (lib, class);
    (None, None) for an absent optional one) and pipeline `options`."""
    body = {"_class_name": class_name, "_diffusers_version": "0.42.1", **options}
    body.update({k: list(v) for k, v in components.items()})
    return json.dumps(body, indent=2, sort_keys=True) + "\n"
