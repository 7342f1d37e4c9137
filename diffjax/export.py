"""Export of trained EMA params for sampling elsewhere, and loading exports back.

An export directory holds

* `params.safetensors`: the EMA params under flat `/`-joined names (float32);
* `config.json`: everything needed to rebuild model, schedule and sampler (the run's
  config under `config`), the data shape, class count, diffjax version, the step, and
  the SHA-256 of the params file;
* `sampler.jax_export`: the whole guided sampler serialized with `jax.export` for the
  platforms that lowered (`config.json` lists them), so a consumer with only `jax`,
  `numpy` and `safetensors` can draw samples:

      exp = jax.export.deserialize(open("sampler.jax_export", "rb").read())
      images = exp.call(params, noise, cond, guidance, key_data)   # see README
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

import diffjax
from diffjax import experiment
from diffjax.pretrained import safetensors_io
from diffjax.sample_fn import make_sample_fn

FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "tpu")


class ExportError(ValueError):
    """An export directory is missing, corrupt, or does not match its config."""


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """`/`-joined names -> float32 numpy arrays (gathers sharded params; a collective)."""
    from diffjax.parallel import gather

    flat = traverse_util.flatten_dict(gather(params), sep="/")
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _serialized_sampler(
    config, model, schedule, params, *, platforms
) -> tuple[bytes | None, list[str], str]:
    """jax.export of `(params, noise, cond, guidance, key_data) -> images`, batch symbolic."""
    kwargs = experiment.sampler_kwargs(config)
    kwargs["guidance"] = 1.0  # Replaced by the traced `guidance` argument below.
    kind = experiment.conditioning_kind(config)

    def fn(params, noise, cond, guidance, key_data):
        key = jax.random.wrap_key_data(key_data)
        sample = make_sample_fn(
            model.apply, schedule, **dict(kwargs, guidance=guidance if kind else 1.0), jit=False
        )
        return sample(params, noise, cond, key)

    (b,) = jax.export.symbolic_shape("b")
    shape = experiment.image_shape(config)
    # An inpainting model's mask and masked image: a traced input like the labels.
    channels = experiment.inpaint_concat_channels(config)
    concat = np.zeros((1, *shape[:2], channels), np.float32) if channels else None
    noise = jax.ShapeDtypeStruct((b, *shape), jnp.float32)
    cond = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype),
        experiment.sampling_condition(config, np.zeros((1,), np.int32), concat=concat),
    )
    args = (
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
        noise,
        cond,
        jax.ShapeDtypeStruct((), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    errors = []
    for plats in [tuple(platforms)] + [(p,) for p in platforms]:
        try:
            exported = jax.export.export(jax.jit(fn), platforms=plats)(*args)
            return bytes(exported.serialize()), list(plats), ""
        except Exception as e:  # noqa: BLE001 — a platform without lowering rules is skipped.
            errors.append(f"{plats}: {type(e).__name__}: {str(e)[:200]}")
    return None, [], "; ".join(errors)


def export_params(
    config: ml_collections.ConfigDict,
    model: Any,
    schedule: Any,
    params: Any,
    out_dir: str,
    *,
    step: int,
    platforms: tuple[str, ...] = PLATFORMS,
    write: bool = True,
) -> dict[str, Any] | None:
    """Writes an export of `params` to `out_dir` and returns its config.json content.

    Every process must call it (params are gathered); only those with `write` write.
    """
    flat = flatten_params(params)
    if not write:
        return None
    os.makedirs(out_dir, exist_ok=True)
    params_path = os.path.join(out_dir, "params.safetensors")
    tmp = params_path + ".tmp"
    safetensors_io.write_tensors(flat, tmp)
    os.replace(tmp, params_path)

    if platforms:
        blob, lowered_for, error = _serialized_sampler(
            config, model, schedule, params, platforms=platforms
        )
    else:
        blob, lowered_for, error = None, [], "not requested (platforms=())"
    if blob is not None:
        with open(os.path.join(out_dir, "sampler.jax_export.tmp"), "wb") as f:
            f.write(blob)
        os.replace(
            os.path.join(out_dir, "sampler.jax_export.tmp"),
            os.path.join(out_dir, "sampler.jax_export"),
        )

    meta = {
        "format_version": FORMAT_VERSION,
        "diffjax_version": diffjax.__version__,
        "step": int(step),
        "model": {
            "name": config.model.name,
            "kwargs": config.model.kwargs.to_dict(),
            "dtype": config.model.dtype,
        },
        "schedule": {"name": config.diffusion.schedule, "prediction": config.diffusion.prediction},
        "sampler_defaults": experiment.sampler_kwargs(config),
        "image_shape": list(experiment.image_shape(config)),
        "num_classes": int(config.data.num_classes),
        "conditioning": experiment.conditioning_kind(config),
        # Latent models: samples are latents, decoded by this VAE (checked by hash).
        "latent": _latent_record(config),
        "params_sha256": _sha256(params_path),
        "serialized_sampler": {
            "file": "sampler.jax_export" if blob is not None else None,
            "platforms": lowered_for,
            "arguments": "(params, noise [B,H,W,C] f32, cond dict, guidance f32 scalar, key_data uint32[2])",
            "error": error,
        },
        "config": json.loads(config.to_json_best_effort()),
    }
    path = os.path.join(out_dir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=list)
    os.replace(path + ".tmp", path)
    return meta


def _latent_record(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    if not config.latent.vae:
        return None
    from diffjax.pretrained.frozen import frozen_record

    vae = frozen_record(config)["vae"]
    return {"vae": vae["path"], "vae_sha256": vae["sha256"]}


def read_export(export_dir: str) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
    """(config.json content, the run config) of an export, verified."""
    path = os.path.join(export_dir, "config.json")
    params_path = os.path.join(export_dir, "params.safetensors")
    for p in (path, params_path):
        if not os.path.exists(p):
            raise ExportError(
                f"{p} is missing: {export_dir} is not a diffjax export (make one with "
                "python launch/export.py --workdir=RUN --out=DIR)."
            )
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e}); re-export the run.") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{export_dir} has export format {meta.get('format_version')}, this diffjax reads "
            f"{FORMAT_VERSION}; re-export with this version."
        )
    digest = _sha256(params_path)
    if digest != meta.get("params_sha256"):
        raise ExportError(
            f"{params_path} does not match its config.json (SHA-256 {digest[:12]}... vs "
            f"{str(meta.get('params_sha256'))[:12]}...): the file is corrupt or from another "
            "export. Re-export the run."
        )
    config = ml_collections.ConfigDict(meta["config"])
    _check_meta_matches_config(export_dir, meta, config)
    return meta, config


def _check_meta_matches_config(export_dir: str, meta: dict[str, Any], config) -> None:
    """The summary fields of config.json must agree with the run config it carries (the
    one readers rebuild the model from); an edited field is named, never ignored."""
    expected = {
        "model": {
            "name": config.model.name,
            "kwargs": config.model.kwargs.to_dict(),
            "dtype": config.model.dtype,
        },
        "image_shape": list(experiment.image_shape(config)),
        "num_classes": int(config.data.num_classes),
    }
    normal = lambda v: json.loads(json.dumps(v, sort_keys=True, default=list))  # noqa: E731
    for key, value in expected.items():
        if normal(meta.get(key)) != normal(value):
            raise ExportError(
                f"{export_dir}/config.json: '{key}' is {meta.get(key)!r} but the run config "
                f"in the same file says {value!r}; the file was edited. Re-export the run."
            )


def load_params(export_dir: str, config: ml_collections.ConfigDict, model: Any) -> Any:
    """The export's params as the model's pytree, checked name by name and shape by shape."""
    flat = load_file(os.path.join(export_dir, "params.safetensors"))
    abstract = jax.eval_shape(experiment.make_init_fn(model, config), jax.random.key(0))
    import flax.linen as nn

    expected = traverse_util.flatten_dict(nn.meta.unbox(abstract), sep="/")
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(flat) if tuple(flat[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {missing[:5]}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:5]}")
        if wrong:
            detail.append(
                "wrong shape "
                + ", ".join(f"{k}: {flat[k].shape} vs {expected[k].shape}" for k in wrong[:5])
            )
        raise ExportError(
            f"params.safetensors in {export_dir} does not fit the model in its config.json "
            f"({'; '.join(detail)}). The export is mismatched; re-export the run."
        )
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def load_serialized(export_dir: str, meta: dict[str, Any]) -> jax.export.Exported:
    """The deserialized sampler of an export, checked against this machine's platform."""
    info = meta.get("serialized_sampler") or {}
    if not info.get("file"):
        raise ExportError(
            f"{export_dir} has no serialized sampler ({info.get('error') or 'not exported'}); "
            "sample without --serialized."
        )
    platform = jax.default_backend()
    if platform not in info.get("platforms", []) and not (
        platform == "gpu" and "cuda" in info.get("platforms", [])
    ):
        raise ExportError(
            f"The serialized sampler in {export_dir} was lowered for {info['platforms']}, not "
            f"{platform}; re-export with --platforms={platform}."
        )
    path = os.path.join(export_dir, info["file"])
    if not os.path.isfile(path):
        raise ExportError(
            f"{path} is missing although {export_dir}/config.json lists it; re-export the "
            "run, or sample without --serialized."
        )
    with open(path, "rb") as f:
        try:
            return jax.export.deserialize(bytearray(f.read()))
        except Exception as e:  # noqa: BLE001 — flatbuffer errors have assorted types.
            raise ExportError(
                f"{export_dir}/{info['file']} is corrupt ({e}); re-export the run."
            ) from e


# ----------------------------------------------------------------------------- diffusers format

DIFFUSERS_MODELS = {
    "unet": ("unet", "UNet2DModel"),
    "dit": ("transformer", "DiTTransformer2DModel"),
    "sd_unet": ("unet", "UNet2DConditionModel"),
}


def export_diffusers(
    config: ml_collections.ConfigDict,
    params: Any,
    out_dir: str,
    *,
    step: int,
    method: str | None = None,
    write: bool = True,
    text_encoder_params: Any = None,
) -> dict[str, Any] | None:
    """Writes `params` as a diffusers pipeline directory that `from_pretrained` loads.

    `out_dir/unet` (`UNet2DModel`, diffjax's `unet`), `out_dir/transformer`
    (`DiTTransformer2DModel`, diffjax's `dit`) or, for an `sd_unet` run with a frozen
    text encoder (a fine-tune, `configs/sd_finetune.py`), a `StableDiffusionPipeline`:
    `out_dir/unet` (`UNet2DConditionModel`) beside copies of the run's `vae/`,
    `text_encoder/` and `tokenizer/`; `out_dir/scheduler/scheduler_config.json`
    (the training schedule and the sampling grid of `method`, default the run's
    `sample.method`, or DDIM where that sampler has no diffusers scheduler) and
    `model_index.json`. Class-conditional models store `num_class_embeds =
    num_classes + 1`; the last index is the null class. The directory appears only when
    complete.

    Args:
      config: the run config.
      params: EMA params (gathered here; every process must call).
      out_dir: the directory to create.
      step: the training step (recorded in `out_dir/diffjax.json`).
      method: the diffjax sampler the scheduler config reproduces.
      write: False on processes that only take part in the gather.
      text_encoder_params: a StableDiffusionPipeline's text encoder weights to write
        instead of copying the run's (a LoRA merged into it).

    Raises:
      ExportError: an architecture, schedule or sampler diffusers cannot express
        exactly, with the reason.
    """
    from diffjax import parallel
    from diffjax.pretrained import convert, diffusers_dit, diffusers_unet2d, pipeline
    from diffjax.pretrained import scheduler as scheduler_lib

    name = config.model.name
    if name not in DIFFUSERS_MODELS:
        raise ExportError(
            f"--format=diffusers exports the {sorted(DIFFUSERS_MODELS)} models, not {name!r}."
        )
    stable_diffusion = name == "sd_unet"
    if stable_diffusion and not (config.text.encoder and config.latent.vae):
        raise ExportError(
            "--format=diffusers writes an sd_unet run as a StableDiffusionPipeline, which "
            "needs the run's frozen text encoder (text.encoder) and VAE (latent.vae); this "
            "run has "
            + (f"text.encoder={config.text.encoder!r}, latent.vae={config.latent.vae!r}")
            + ". Export it with the default format."
        )
    if experiment.is_inpainting(config) and not stable_diffusion:
        raise ExportError(
            "--format=diffusers: diffusers has no pipeline for a pixel-space or DiT "
            "inpainting model (its input carries the mask and masked image); export it with "
            "the default format. (An sd_unet inpainting run is written as a "
            "StableDiffusionInpaintPipeline.)"
        )
    if experiment.conditioning_kind(config) == "text" and not stable_diffusion:
        raise ExportError(
            "--format=diffusers: text-conditioned diffjax models have no diffusers "
            "equivalent (UNet2DModel and DiTTransformer2DModel take no text); export them "
            "with the default format."
        )
    if config.diffusion.schedule != "discrete_vp":
        raise ExportError(
            f"--format=diffusers needs a discrete_vp schedule (diffusers' schedulers are "
            f"discrete); this run trains with {config.diffusion.schedule!r}."
        )
    schedule = experiment.build_schedule(config)
    prediction = config.diffusion.prediction
    wanted = method or config.sample.method
    clip = bool(config.diffusion.clip_x0)
    try:
        sched_cfg = scheduler_lib.scheduler_config_for(schedule, prediction, wanted, clip_x0=clip)
        used = wanted
    except ValueError as e:
        if method is not None:
            raise ExportError(f"--format=diffusers: {e}") from e
        sched_cfg = scheduler_lib.scheduler_config_for(schedule, prediction, "ddim", clip_x0=clip)
        used = "ddim"
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), parallel.gather(params))
    if not write:
        return None
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ExportError(f"{out_dir} already holds files; choose a new directory.")
    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    component, class_name = DIFFUSERS_MODELS[name]
    kwargs = config.model.kwargs.to_dict()
    try:
        if name == "unet":
            diffusers_unet2d.export_unet2d(
                host, kwargs, os.path.join(tmp, component), sample_size=config.data.image_size
            )
        elif stable_diffusion:
            _export_sd_unet(config, host, os.path.join(tmp, component), convert)
        else:
            p = int(kwargs.get("patch_size", 2))
            diffusers_dit.export_dit(
                host, kwargs, os.path.join(tmp, component), sample_size=config.data.image_size // p
            )
    except ValueError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"--format=diffusers: {e}") from e
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched_cfg, f, indent=2, sort_keys=True)
    pipeline_class = {"dit": "DiTPipeline", "sd_unet": "StableDiffusionPipeline"}.get(
        name, "DDIMPipeline"
    )
    if stable_diffusion and experiment.is_inpainting(config):
        pipeline_class = "StableDiffusionInpaintPipeline"  # the 9-channel U-Net's
    components = {
        component: ("diffusers", class_name),
        "scheduler": ("diffusers", sched_cfg["_class_name"]),
    }
    options = {}
    if config.latent.vae and name in ("dit", "sd_unet"):
        # The frozen components are copied as they are (their weights never changed).
        shutil.copytree(pipeline.vae_dir(config.latent.vae), os.path.join(tmp, "vae"))
        components["vae"] = ("diffusers", "AutoencoderKL")
    if stable_diffusion:
        from diffjax.data.tokens import tokenizer_dir

        encoder = pipeline.text_encoder_dir(config.text.encoder)
        if text_encoder_params is None:
            shutil.copytree(encoder, os.path.join(tmp, "text_encoder"))
        else:
            _write_text_encoder(encoder, text_encoder_params, os.path.join(tmp, "text_encoder"))
        shutil.copytree(tokenizer_dir(config.data.tokenizer), os.path.join(tmp, "tokenizer"))
        components.update(
            text_encoder=("transformers", "CLIPTextModel"),
            tokenizer=("transformers", "CLIPTokenizer"),
            safety_checker=(None, None),
            feature_extractor=(None, None),
            image_encoder=(None, None),
        )
        options["requires_safety_checker"] = False
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        f.write(pipeline.model_index_json(pipeline_class, components, **options))
    meta = {
        "diffjax_version": diffjax.__version__,
        "step": int(step),
        "format": "diffusers",
        "scheduler_method": used,
        # diffjax recomputes eps from the clipped x0; diffusers' DDIM does so only with
        # step(use_clipped_model_output=True) (DDIMPipeline(...)(use_clipped_model_output=True)).
        "use_clipped_model_output": clip and sched_cfg["_class_name"] == "DDIMScheduler",
        "num_classes": int(config.data.num_classes),
        "null_class": int(config.data.num_classes) if config.data.num_classes else None,
        "config": json.loads(config.to_json_best_effort()),
    }
    with open(os.path.join(tmp, "diffjax.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=list)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
    return meta


def _write_text_encoder(source: str, params: Any, out_dir: str) -> None:
    """A CLIPTextModel directory: `source`'s config.json with `params` as its weights."""
    from diffjax import parallel
    from diffjax.pretrained import convert, safetensors_io

    os.makedirs(out_dir)
    shutil.copy(os.path.join(source, "config.json"), os.path.join(out_dir, "config.json"))
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), parallel.gather(params))
    safetensors_io.write_tensors(
        convert.flax_to_torch(host), os.path.join(out_dir, "model.safetensors")
    )


def export_lora(config: ml_collections.ConfigDict, params: Any, out_dir: str, *, step: int) -> str:
    """Writes a LoRA run's (EMA) LoRA as diffusers' `pytorch_lora_weights.safetensors`
    (`unet.<module>.lora_A/B.weight`, + `text_encoder.` ones; alpha / rank folded into
    B), which `pipe.load_lora_weights(out_dir)` and `sample.py --lora` read, beside
    `diffjax.json` (the base and the step). Returns the file's path.

    Raises:
      ExportError: a model whose modules have no diffusers names (diffjax's own unet/dit:
        export the merged model instead), or an existing non-empty `out_dir`.
    """
    from diffjax import parallel
    from diffjax.pretrained import lora_files

    if config.model.name != "sd_unet":
        raise ExportError(
            f"--format=lora writes diffusers' LoRA layout, whose module names are those of "
            f"Stable Diffusion's U-Net (sd_unet); this is a {config.model.name!r} run. Export "
            "the merged model (the default format, or --format=diffusers)."
        )
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ExportError(f"{out_dir} already holds files; choose a new directory.")
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), parallel.gather(params))
    trees = {"unet": host["denoiser"]}
    if "text_encoder" in host:
        trees["text_encoder"] = host["text_encoder"]
    path = lora_files.write_lora(out_dir, trees, experiment.lora_scale(config))
    meta = {
        "diffjax_version": diffjax.__version__,
        "step": int(step),
        "format": "lora",
        "base": config.pretrained or config.base_workdir,
        "lora": config.lora.to_dict(),
        "config": json.loads(config.to_json_best_effort()),
    }
    with open(os.path.join(out_dir, "diffjax.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=list)
    return path


def check_controlnet_exportable(config: ml_collections.ConfigDict) -> None:
    """Raises `ExportError` unless `config` is a ControlNet run on an SD U-Net (`sd_unet`):
    diffusers' ControlNetModel is a copy of Stable Diffusion's U-Net encoder, and has no
    counterpart for diffjax's own `unet` / `dit` ControlNets."""
    if not experiment.is_controlnet(config):
        raise ExportError("export_controlnet exports ControlNet runs (controlnet.control) only.")
    if config.model.name != "sd_unet":
        raise ExportError(
            "--format=diffusers writes a ControlNet as diffusers' ControlNetModel, which is "
            "a copy of Stable Diffusion's U-Net encoder (an sd_unet base); this ControlNet "
            f"is for diffjax's {config.model.name!r} model, which diffusers has no "
            "ControlNet for. Sample it from the run: python launch/sample.py "
            "--workdir=RUN --control_image=CTRL.npz (or --control_source=IMAGES.npz)."
        )


def export_controlnet(
    config: ml_collections.ConfigDict,
    params: Any,
    out_dir: str,
    *,
    step: int,
    write: bool = True,
) -> dict[str, Any] | None:
    """Writes an SD ControlNet run's (EMA) ControlNet as a diffusers `ControlNetModel`
    directory: `config.json` + float32 `diffusion_pytorch_model.safetensors`
    (`diffjax.pretrained.controlnet.save_controlnet`), which
    `ControlNetModel.from_pretrained`, `StableDiffusionControlNetPipeline` and
    `launch/sample.py --pretrained=SD_DIR --controlnet=OUT` load, beside `diffjax.json`
    (the step, the base pipeline and its U-Net's SHA-256, the control transform, the run
    config). The directory appears only when complete.

    Args:
      config: the run config (`controlnet.control` set, an `sd_unet` base).
      params: the ControlNet's EMA params (gathered here; every process must call).
      out_dir: the directory to create (must not hold files).
      step: the training step (recorded in diffjax.json).
      write: False on processes that only take part in the gather.

    Raises:
      ExportError: not a ControlNet run, a ControlNet of diffjax's own `unet` / `dit`
        (diffusers' ControlNetModel is the SD U-Net's encoder), or an `out_dir` that
        holds files.
    """
    from diffjax import parallel
    from diffjax.pretrained import controlnet as controlnet_io
    from diffjax.pretrained.frozen import frozen_record

    check_controlnet_exportable(config)
    module = experiment.build_controlnet(config)
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), parallel.gather(params))
    if not write:
        return None
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ExportError(f"{out_dir} already holds files; choose a new directory.")
    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    controlnet_io.save_controlnet(tmp, module, host)
    n = config.controlnet
    base = {"pretrained": config.pretrained or None, "base_workdir": config.base_workdir or None}
    unet = frozen_record(config).get("pretrained_unet") if config.pretrained else None
    if unet is not None:
        base["unet"], base["unet_sha256"] = unet["path"], unet["sha256"]
    meta = {
        "diffjax_version": diffjax.__version__,
        "step": int(step),
        "format": "diffusers",
        "component": "ControlNetModel",
        "base": base,
        "control": {
            "control": n.control,
            "conditioning_channels": int(n.conditioning_channels),
            "control_downsample": int(n.control_downsample),
            "canny_low": n.canny_low,
            "canny_high": n.canny_high,
            "tile_factor": n.tile_factor,
            "mask_threshold": n.mask_threshold,
        },
        "weights_sha256": _sha256(os.path.join(tmp, controlnet_io.WEIGHTS)),
        "config": json.loads(config.to_json_best_effort()),
    }
    with open(os.path.join(tmp, "diffjax.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=list)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
    return meta


def _export_sd_unet(config: ml_collections.ConfigDict, host: Any, out_dir: str, convert) -> None:
    """`out_dir/config.json` + `diffusion_pytorch_model.safetensors` of an `sd_unet`."""
    from diffjax.models import sd_unet
    from diffjax.pretrained import safetensors_io

    model = experiment.build_model(config)
    os.makedirs(out_dir)
    cfg = sd_unet.diffusers_config(model)
    cfg["sample_size"] = int(config.data.image_size)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    safetensors_io.write_tensors(
        convert.flax_to_torch(host), os.path.join(out_dir, "diffusion_pytorch_model.safetensors")
    )


# ----------------------------------------------------------------------------- autoencoder


def diffusers_vae_config(model: Any) -> dict[str, Any]:
    """The diffusers `AutoencoderKL` config.json of an `AutoencoderKL` module (the
    inverse of `autoencoder_kl.from_diffusers_config`)."""
    from diffjax.models import autoencoder_kl as akl

    n = len(model.block_out_channels)
    size = model.sample_size
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "in_channels": int(model.in_channels),
        "out_channels": int(model.out_channels),
        "down_block_types": [akl.DOWN_BLOCK] * n,
        "up_block_types": [akl.UP_BLOCK] * n,
        "block_out_channels": [int(c) for c in model.block_out_channels],
        "layers_per_block": int(model.layers_per_block),
        "act_fn": "silu",
        "latent_channels": int(model.latent_channels),
        "norm_num_groups": int(model.norm_num_groups),
        "sample_size": list(size) if isinstance(size, (list, tuple)) else int(size),
        "scaling_factor": float(model.scaling_factor),
        "shift_factor": float(model.shift_factor) if model.shift_factor else None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": bool(model.force_upcast),
        "use_quant_conv": bool(model.use_quant_conv),
        "use_post_quant_conv": bool(model.use_post_quant_conv),
        "mid_block_add_attention": bool(model.mid_block_add_attention),
    }


def export_autoencoder(
    config: ml_collections.ConfigDict,
    params: Any,
    out_dir: str,
    *,
    step: int,
    write: bool = True,
    overwrite: bool = False,
) -> dict[str, Any] | None:
    """Writes an autoencoder run's params as a diffusers `AutoencoderKL` directory.

    `out_dir/config.json` (diffusers' config), `out_dir/diffusion_pytorch_model.safetensors`
    (torch layout, float32) and `out_dir/diffjax.json` (step, weights SHA-256, the run
    config). diffusers' `AutoencoderKL.from_pretrained`, `pipeline.load_vae`,
    `launch/encode_latents.py --vae=` and `latent.vae=` read it. The directory appears
    only when complete; with `overwrite` it replaces an existing one.

    Args:
      config: the run config (`task='autoencoder'`).
      params: EMA params (gathered here; every process must call), with or without a
        discriminator (`experiment.autoencoder_params` takes the autoencoder's).
      out_dir: the directory to create.
      step: the training step (recorded in diffjax.json).
      write: False on processes that only take part in the gather.
      text_encoder_params: a StableDiffusionPipeline's text encoder weights to write
        instead of copying the run's (a LoRA merged into it).
      overwrite: replace a directory that already holds files.

    Raises:
      ExportError: not an autoencoder run, or `out_dir` holds files without `overwrite`.
    """
    from diffjax import parallel
    from diffjax.pretrained import convert

    if not experiment.is_autoencoder(config):
        raise ExportError("export_autoencoder exports task='autoencoder' runs only.")
    model = experiment.build_model(config)
    if "sample_size" not in config.model.kwargs:  # the training size, not the SD default
        model = model.clone(sample_size=int(config.data.image_size))
    vae_config = diffusers_vae_config(model)
    tensors = convert.flax_to_torch(parallel.gather(experiment.autoencoder_params(config, params)))
    if not write:
        return None
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} already holds files; choose a new directory.")
    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    weights = os.path.join(tmp, "diffusion_pytorch_model.safetensors")
    safetensors_io.write_tensors(tensors, weights)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(vae_config, f, indent=2, sort_keys=True)
    meta = {
        "diffjax_version": diffjax.__version__,
        "step": int(step),
        "format": "diffusers",
        "component": "AutoencoderKL",
        "weights_sha256": _sha256(weights),
        "config": json.loads(config.to_json_best_effort()),
    }
    with open(os.path.join(tmp, "diffjax.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=list)
    old = out_dir.rstrip("/") + ".old"
    if os.path.exists(out_dir):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return meta
