"""diffusers `ControlNetModel` directories <-> diffjax's `SDControlNet`.

    cn = load_controlnet("sd-controlnet-canny")          # config.json + safetensors
    check_compatible(cn, pipe.denoiser, vae_scale=pipe.vae_scale)
    down, mid = cn.module.apply({"params": cn.params}, x, t, context=ctx, control=img)
    save_controlnet("out/controlnet", cn.module, cn.params)   # ControlNetModel.from_pretrained loads it

A ControlNet directory holds `config.json` (`_class_name: ControlNetModel`) and
`diffusion_pytorch_model.safetensors` (what `save_pretrained` writes); published SD 1.5
ControlNets also ship the same weights as a PyTorch pickle, which is not read. A
pipeline directory with a `controlnet/` component (e.g. a saved
`StableDiffusionControlNetPipeline`) is accepted too.
"""

from __future__ import annotations

import json
import os
from typing import Any

from diffjax.models import sd_controlnet
from diffjax.models.sd_unet import SDUNet
from diffjax.pretrained import convert, safetensors_io
from diffjax.pretrained.pipeline import Component

WEIGHTS = "diffusion_pytorch_model.safetensors"


def controlnet_dir(path: str) -> str:
    """The ControlNetModel directory behind `path` (itself, or a pipeline's `controlnet/`).

    Raises:
      FileNotFoundError / ValueError: not a directory, or neither a ControlNetModel
        directory nor a pipeline with a `controlnet/` component.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--controlnet={path} is not a directory; give a diffusers ControlNetModel "
            "directory (config.json + diffusion_pytorch_model.safetensors)."
        )
    if os.path.isfile(os.path.join(path, "model_index.json")):
        sub = os.path.join(path, "controlnet")
        if os.path.isfile(os.path.join(sub, "config.json")):
            return sub
        raise ValueError(
            f"{path} is a pipeline directory without a controlnet/ component; give a "
            "ControlNetModel directory (config.json with _class_name 'ControlNetModel')."
        )
    return path


def load_controlnet(directory: str, dtype: str = "float32", **kwargs: Any) -> Component:
    """A diffusers `ControlNetModel` directory -> `Component(SDControlNet, params, config)`.

    Args:
      directory: the ControlNet directory (or a pipeline holding `controlnet/`).
      dtype: compute dtype ('float32' | 'bfloat16'); params stay float32.
      **kwargs: further SDControlNet fields (`attention_impl`, `remat_policy`).

    Raises:
      FileNotFoundError: no config.json / no safetensors weights (PyTorch pickles are
        refused with the command that converts them).
      ValueError: a config of another class or with an unsupported option (named).
      convert.ConversionError: naming every missing, unexpected and mis-shaped tensor.
    """
    directory = controlnet_dir(directory)
    cfg = safetensors_io.read_config(directory)
    cls = cfg.get("_class_name")
    if cls != "ControlNetModel":
        raise ValueError(
            f"{directory}/config.json has _class_name={cls!r}: not a diffusers ControlNetModel "
            "directory (--controlnet wants one, e.g. lllyasviel/sd-controlnet-canny)."
        )
    module = sd_controlnet.from_diffusers_config(cfg, dtype=dtype, **kwargs)
    params = convert.torch_to_flax(
        safetensors_io.read_tensors(directory),
        sd_controlnet.abstract_params(module),
        what=f"controlnet ({directory})",
    )
    return Component(module, params, cfg)


def save_controlnet(
    out_dir: str, module: sd_controlnet.SDControlNet, params: Any, *, overwrite: bool = False
) -> str:
    """Writes a directory `ControlNetModel.from_pretrained` loads: config.json and
    float32 `diffusion_pytorch_model.safetensors`.

    Args:
      out_dir: the directory to write (created).
      module: the SDControlNet.
      params: its params (plain or boxed arrays; an outer {'params': ...} is accepted).
      overwrite: replace the files of an existing non-empty directory.

    Returns:
      `out_dir`.

    Raises:
      FileExistsError: `out_dir` exists and is not empty, without `overwrite`.
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and is not empty; choose another directory or pass overwrite=True."
        )
    os.makedirs(out_dir, exist_ok=True)
    tensors = convert.flax_to_torch(params)
    safetensors_io.write_tensors(tensors, os.path.join(out_dir, WEIGHTS))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(sd_controlnet.diffusers_config(module), f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _per_block(module: Any) -> tuple[int, ...]:
    n = len(module.block_out_channels)
    lpb = module.layers_per_block
    return tuple(lpb) if isinstance(lpb, (tuple, list)) else (int(lpb),) * n


def check_compatible(controlnet: Component, unet: Component, *, vae_scale: int | None = None):
    """Raises when `controlnet`'s residuals would not fit `unet` (an `SDUNet` component).

    Compared: in_channels (the latent), cross_attention_dim (the text), block_out_channels
    and layers_per_block (the shapes of the skip connections and the mid block); with
    `vae_scale` (pixels per latent cell of the pipeline) also the condition embedding's
    downsampling.

    Raises:
      ValueError: a base that is not an SD U-Net, or naming every field that differs,
        with both values.
    """
    cn, base = controlnet.module, unet.module
    if not isinstance(cn, sd_controlnet.SDControlNet):
        raise ValueError(f"check_compatible: {type(cn).__name__} is not an SDControlNet.")
    if not isinstance(base, SDUNet):
        raise ValueError(
            f"A diffusers ControlNetModel drives a Stable Diffusion U-Net; this pipeline's "
            f"denoiser is a {type(base).__name__}. Use --controlnet with an SD pipeline."
        )
    diffs = []
    for field in ("in_channels", "cross_attention_dim", "block_out_channels"):
        a, b = getattr(cn, field), getattr(base, field, None)
        if _plain(a) != _plain(b):
            diffs.append(f"{field} {_plain(a)!r} (the base's: {_plain(b)!r})")
    same_levels = len(cn.block_out_channels) == len(base.block_out_channels)
    if same_levels and _per_block(cn) != _per_block(base):
        diffs.append(
            f"layers_per_block {cn.layers_per_block!r} (the base's: {base.layers_per_block!r})"
        )
    if vae_scale is not None and cn.downsampling != vae_scale:
        diffs.append(
            f"the condition embedding downsamples by {cn.downsampling} "
            f"(conditioning_embedding_out_channels={list(cn.conditioning_embedding_out_channels)})"
            f" but the pipeline's VAE by {vae_scale}"
        )
    if diffs:
        raise ValueError(
            "This ControlNet does not fit the base U-Net: "
            + "; ".join(diffs)
            + ". Its residuals would not match the U-Net's skip connections; use a "
            "ControlNet trained for this base model (e.g. an SD 1.5 ControlNet with SD 1.5)."
        )


__all__ = ["check_compatible", "controlnet_dir", "load_controlnet", "save_controlnet"]
