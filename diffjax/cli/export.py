"""Exports a run's EMA params for sampling elsewhere.

    python launch/export.py --workdir=runs/digits --out=exports/digits [--step=N]
    python launch/export.py --workdir=runs/digits --out=exports/digits-diffusers --format=diffusers

The default format writes params.safetensors, config.json and sampler.jax_export (see
diffjax/export.py); sample from it with `python launch/sample.py --export_dir=DIR`.
`--format=diffusers` writes a directory diffusers loads with `from_pretrained`
(`unet/` UNet2DModel or `transformer/` DiTTransformer2DModel, `scheduler/`,
`model_index.json`); sample from it with `python launch/sample.py --pretrained=DIR`.
An autoencoder run (`task='autoencoder'`) exports, in either format, a diffusers
`AutoencoderKL` directory (config.json + diffusion_pytorch_model.safetensors) for
`launch/encode_latents.py --vae=DIR` and `latent.vae=DIR`. A ControlNet run on a Stable
Diffusion pipeline (`configs/sd_controlnet.py`) exports, with `--format=diffusers` only,
its ControlNet as a diffusers `ControlNetModel` directory for
`launch/sample.py --pretrained=SD_DIR --controlnet=DIR`.
"""

import os

from absl import flags

from diffjax.cli.common import run, setup_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Export directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest good one).")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"], "Serialized-sampler platforms.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export at --out.")
_FORMAT = flags.DEFINE_enum(
    "format",
    "diffjax",
    ["diffjax", "diffusers", "lora"],
    "diffjax export, a diffusers directory, or (a LoRA run of an SD U-Net) the LoRA alone as "
    "diffusers' pytorch_lora_weights.safetensors. LoRA runs otherwise export the merged model.",
)
_METHOD = flags.DEFINE_string(
    "method",
    None,
    "--format=diffusers: the sampler the scheduler config reproduces (default: the run's "
    "sample.method, or ddim where it has no diffusers scheduler).",
)


def main(argv):
    del argv
    setup_logging()
    out = _OUT.value
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; pass a directory for the export.")
    if os.path.isdir(out) and os.listdir(out) and not _OVERWRITE.value:
        raise ValueError(
            f"--out {out} already holds files; pass --overwrite to replace that export, or "
            "choose another directory."
        )
    from diffjax import experiment, export, generate, parallel
    from diffjax.rundir import load_state, load_workdir_config

    config = load_workdir_config(_WORKDIR.value)
    controlnet_run = experiment.is_controlnet(config)
    if controlnet_run:
        _check_controlnet_export(config)  # before any restore
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    lora_run = experiment.lora_rank(config) > 0
    stage = generate.text_stage(config, mesh) if lora_run else None
    text = None if stage is None else stage.params.get("text_encoder")
    state, step, parts = load_state(config, _WORKDIR.value, mesh, _STEP.value, text_params=text)
    params, text_params = state.ema_params, None
    if controlnet_run:
        _export_controlnet(config, params, out, step)
        return
    if _FORMAT.value == "lora":
        if not lora_run:
            raise ValueError(f"--format=lora: {_WORKDIR.value} is not a LoRA run (lora.rank=0).")
        if _OVERWRITE.value and os.path.isdir(out):
            import shutil

            shutil.rmtree(out)
        path = export.export_lora(config, params, out, step=step)
        print(f"Exported the LoRA of step {step} of {_WORKDIR.value} to {path}.")
        return
    if lora_run:  # the merged model, exported as a plain one
        frozen = {"base": generate.base_params(config, mesh), "text_encoder": text}
        params, merged_stage = generate.sampling_view(parts, stage, frozen, params)
        if "text_encoder" in parts.lora_targets:
            text_params = merged_stage.params["text_encoder"]
            if _FORMAT.value != "diffusers":
                raise ValueError(
                    "This run trained a LoRA on the text encoder too, which a diffjax export "
                    "(it names the base text encoder) cannot hold; export with "
                    "--format=diffusers (the merged pipeline) or --format=lora."
                )
        config = experiment.merged_config(config)
    if config.get("task", "diffusion") == "autoencoder":
        if _METHOD.value:
            raise ValueError("--method applies to diffusion models only, not an autoencoder.")
        export.export_autoencoder(
            config, state.ema_params, out, step=step, overwrite=_OVERWRITE.value
        )
        print(
            f"Exported step {step} of {_WORKDIR.value} to {out} as a diffusers AutoencoderKL "
            f"(use it with launch/encode_latents.py --vae={out} or latent.vae={out})."
        )
        return
    if _FORMAT.value == "diffusers":
        if _OVERWRITE.value and os.path.isdir(out):
            import shutil

            shutil.rmtree(out)
        meta = export.export_diffusers(
            config, params, out, step=step, method=_METHOD.value, text_encoder_params=text_params
        )
        print(
            f"Exported step {step} of {_WORKDIR.value} to {out} in diffusers format "
            f"(scheduler reproduces diffjax's {meta['scheduler_method']!r} sampler)."
        )
        return
    if _METHOD.value:
        raise ValueError("--method applies to --format=diffusers only.")
    meta = export.export_params(
        config,
        parts.model,
        parts.schedule,
        params,
        _OUT.value,
        step=step,
        platforms=tuple(_PLATFORMS.value),
    )
    serialized = meta["serialized_sampler"]
    print(f"Exported step {step} of {_WORKDIR.value} to {_OUT.value}")
    if serialized["file"]:
        print(f"Serialized sampler for {', '.join(serialized['platforms'])}: {serialized['file']}")
    else:
        print(f"No serialized sampler could be lowered: {serialized['error']}")


def _check_controlnet_export(config) -> None:
    """A ControlNet run exports with --format=diffusers only, and only an SD one."""
    from diffjax import export

    sd = config.model.name == "sd_unet"
    if _FORMAT.value != "diffusers":
        how = (
            "export it with --format=diffusers (a diffusers ControlNetModel directory; sample "
            f"it with launch/sample.py --pretrained={config.pretrained or 'SD_DIR'} "
            "--controlnet=OUT --control_image=...)"
            if sd
            else "sample it from the run: launch/sample.py --workdir=RUN --control_image=..."
        )
        raise ValueError(
            f"--format={_FORMAT.value}: {_WORKDIR.value} is a ControlNet run, which trains a "
            f"ControlNet beside a frozen base, not a model a {_FORMAT.value} export holds; "
            f"{how}."
        )
    if not sd:
        export.check_controlnet_exportable(config)  # raises, naming why
    if _METHOD.value:
        raise ValueError(
            "--method sets a pipeline's scheduler; a ControlNet export is the ControlNet "
            "alone (the base pipeline keeps its scheduler). Drop --method."
        )


def _export_controlnet(config, params, out, step) -> None:
    """A ControlNet run: its (EMA) ControlNet alone, as a diffusers ControlNetModel."""
    from diffjax import export

    if _OVERWRITE.value and os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    export.export_controlnet(config, params, out, step=step)
    print(
        f"Exported the ControlNet of step {step} of {_WORKDIR.value} to {out} as a diffusers "
        f"ControlNetModel (base: {config.pretrained or config.base_workdir}; sample with "
        f"launch/sample.py --pretrained={config.pretrained} --controlnet={out} "
        "--control_image=...)."
    )


def entry() -> None:
    """Console-script entry point (`diffjax-export`)."""
    run(main)
