"""Pretrained components side by side with diffusers: SD U-Net, text-to-image, VAE tiling,
VAE encode throughput, the latent train step, a LoRA step against the full one, and a
ControlNet step against its base's full step.

    python benchmarks/pretrained.py --suite cpu            # shrunken shapes, here (minutes)
    python benchmarks/pretrained.py --suite gpu            # SD 1.5 shapes on one GPU
    python benchmarks/pretrained.py --suite gpu --quick    # the script's logic, tiny, any device

Eight measurements, each for diffjax and (but `finetune` and `controlnet`), in the same
run, for diffusers 0.42.1
(`pip install torch==2.13.0 diffusers==0.42.1 transformers peft==0.21.2`; `--no-torch`
skips it,
`--torch-python PATH` runs the diffusers side with another interpreter):

* `unet`: one forward of an SD-1.5-shaped `UNet2DConditionModel` (GPU: 64x64x4
  latents, batch 2 as under classifier-free guidance, 77x768 context, float32 and
  bfloat16; CPU: the same block structure at widths 32/64/128/128 on 16x16 latents,
  77x64 context, float32). diffjax: `SDUNet` jitted ahead of time (compile time
  reported apart), warm calls with `block_until_ready`. diffusers: eval, no_grad.
* `t2i`: a whole 20-step DDIM text-to-image sample with guidance 7.5, batch 1 (text
  encoder, U-Net, VAE decode; GPU: 512x512 with SD 1.5's U-Net, VAE and CLIP text
  encoder; CPU: shrunken components at 128x128). diffjax: `load_pipeline` +
  `PretrainedGenerator` (one jitted sampler + decode); diffusers:
  `StableDiffusionPipeline.from_pretrained` called with the same `latents=`.
* `vae`: SD VAE (`preset_kwargs('sd')`) decode of 128x128 latents (1024 px) on a GPU,
  32x32 (256 px) on a CPU, full and tiled (tiles of the config's `sample_size`, as
  diffusers' `enable_tiling()`). Memory: diffjax's is XLA's compiled buffer plan of the
  decode (`memory_analysis()`: arguments + outputs + temporaries, deterministic, also on
  a CPU; tiled: the plan for one tile plus the host-side blend buffers); diffusers' is
  `torch.cuda.max_memory_allocated` (GPU only; n/a on a CPU).
* `encode`: VAE encode throughput (img/s) with SD's VAE (the `vae` case's directory):
  GPU 8x512x512 images, bfloat16 and float32; CPU 4x128x128, float32. diffjax:
  `diffjax.pretrained.encode.Encoder`, the jitted per-batch step of
  `launch/encode_latents.py` (the posterior mean x scaling_factor); diffusers:
  `vae.encode(x).latent_dist.mean * scaling_factor` under no_grad. Both take host
  images and return host latents; compile time is the first call less a warm one.
* `train`: one latent-diffusion train step of the SD-structured U-Net (GPU: SD 1.5's,
  4x64x64x4 latents, 77x768 context, bfloat16 compute with float32 params on both
  sides; CPU: the `unet` case's widths, 2x16x16x4, float32). diffjax: the real step,
  `rundir.build_components` of a config (`model.name='sd_unet'`, `data.source=
  'latents'`, discrete_vp scaled_linear, epsilon, AdamW + clipping + EMA), compiled
  with donated state as `train/loop.py` does; diffusers: `DDPMScheduler.add_noise`,
  MSE on epsilon, backward, `clip_grad_norm_`, `torch.optim.AdamW`, EMA of the params
  (as `train_text_to_image.py --use_ema --max_grad_norm 1`). Steps/s and img/s.
* `finetune` (diffjax only): `configs/sd_finetune.py`'s step with the frozen VAE encoder
  and CLIP inside it, at two remat policies; XLA's memory plan and the device's peak.
* `lora`: a rank-4 LoRA step (`lora_r4`) against the full fine-tune step (`lora_full`)
  of the same U-Net, batch, dtype and remat (the train case's latents and context; both
  start from the directory's U-Net weights). diffjax: the train case's config with
  `lora.rank=4, lora.alpha=4` (configs/sd_lora.py's LoRA and AdamW, no EMA; the U-Net is
  the step's frozen `base`), compiled by the loop's `_compile_step`; diffusers: the train
  case's step after `unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=
  [to_q, to_k, to_v, to_out.0]))` (peft 0.21.2; train_text_to_image_lora.py), AdamW over
  the LoRA params only. Both cases are set up first and their timing windows alternate
  (4 sides on a GPU, 6 on a CPU), so the LoRA/full ratio sees the same load. img/s,
  XLA's plan (arguments / temporaries), the optimizer state's bytes on both sides, the
  device peaks on a GPU (diffjax: a JAX worker per case; diffusers:
  `max_memory_allocated` less what was allocated before the case).
* `controlnet` (diffjax only): a ControlNet step against its base's full train step on
  the same shapes and batch, measured together (timing windows alternate), for two
  models. `cn_sd_*`: the lora case's latent-fed SD U-Net and batch with a 3-channel
  control 8x the latents' size (SD's condition embedding); full (AdamW + EMA),
  `lora_r4` (the lora case's LoRA step) and `controlnet` (the ControlNet's params in
  configs/sd_controlnet.py's AdamW, no EMA; the U-Net in `frozen["base"]`, the
  ControlNet initialised from it as the loop's `_controlnet_start`). `cn_digits_*`:
  configs/digits.py's U-Net at its batch (128x8x8x1 + labels), full vs
  configs/digits_controlnet.py's edges ControlNet (a 1-channel control at 1x), on a
  random-init base. img/s, XLA's FLOP count and memory plan of the step, the optimizer
  state's bytes, the trained, base, copied and embedding param counts; ratios to the
  full step.

Both frameworks read the SAME random weights: the JAX worker writes a diffusers-layout
pipeline directory (random weights, SD 1.5's DDIM scheduler config, the CLIP BPE
tokenizer of `tests/fixtures/clip_tokenizer`) to a temporary directory, and each side
loads it through its real loading path. Parameter counts are checked equal, and the
outputs are compared (float32 cases agree to about 1e-5; the table's last column).

As in `benchmarks/run.py`, the orchestrator imports neither framework: diffjax and
diffusers run in worker processes and their timing windows alternate (3 rounds,
median), so the load of other processes falls on both. On a CPU diffusers runs twice,
with spinning and with passive OpenMP waits (`torch`, `torch_passive`), and diffjax is
compared with the faster. Ratios are diffjax time / diffusers time (below 1: diffjax is
faster). Prints a table and writes
`benchmarks/results/pretrained_<suite>[-quick]_<device>_<time>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.run import RESULTS, _fmt_bytes, _table, host_info, result_path  # noqa: E402

TOKENIZER = common.ROOT / "tests" / "fixtures" / "clip_tokenizer"
KINDS = ("unet", "t2i", "vae", "encode", "train", "finetune", "lora", "controlnet")
# Cases measured on diffjax's side only (variants of one diffjax config, side by side).
JAX_ONLY_KINDS = ("finetune", "controlnet")
# Kinds whose cases are measured together, after the others: all set up, then their
# timing windows alternate (so their ratios see the same load). In the gpu suite each
# case has a JAX worker of its own, so that the device's peak memory is its own (JAX
# cannot reset it); a CPU has no device peak and they share the JAX worker.
TOGETHER_KINDS = ("lora", "controlnet")

# The train case's AdamW on both sides (diffusers' train_text_to_image.py defaults, with
# its --max_grad_norm 1.0 and --use_ema); no warmup, constant learning rate.
TRAIN_OPTIMIZER = {
    "learning_rate": 1e-4,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "grad_clip": 1.0,
    "ema_decay": 0.9999,
}
# The LoRA case's AdamW: configs/sd_lora.py's and diffusers' train_text_to_image_lora.py's
# (lr 1e-4, weight decay 1e-2, clipping 1.0, no EMA); its full fine-tune twin keeps EMA.
LORA_OPTIMIZER = {**TRAIN_OPTIMIZER, "ema_decay": 0.0}
# The ControlNet case's AdamW: configs/sd_controlnet.py's and diffusers'
# train_controlnet.py's (lr 1e-5, weight decay 1e-2, clipping 1.0, no EMA).
CONTROLNET_OPTIMIZER = {**TRAIN_OPTIMIZER, "learning_rate": 1e-5, "ema_decay": 0.0}

# Stable Diffusion 1.5's scheduler/scheduler_config.json, DDIM variant (as users swap in).
SD15_DDIM = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.42.1",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# ----------------------------------------------------------------------------- configs


def unet_config(
    widths: tuple[int, ...],
    *,
    context_dim: int,
    heads: int = 8,
    layers: int = 2,
    groups: int = 32,
    sample_size: int = 64,
) -> dict[str, Any]:
    """A diffusers `unet/config.json` with SD 1.5's structure at the given sizes.

    Every key either side reads is written out, so diffusers' and diffjax's defaults
    never come into play. `widths=(320, 640, 1280, 1280), context_dim=768` is SD 1.5.
    """
    n = len(widths)
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        "only_cross_attention": False,
        "block_out_channels": list(widths),
        "layers_per_block": layers,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": 0.0,
        "act_fn": "silu",
        "norm_num_groups": groups,
        "norm_eps": 1e-05,
        "cross_attention_dim": context_dim,
        "transformer_layers_per_block": 1,
        "attention_head_dim": heads,  # diffusers' quirk: SD 1.x's NUMBER of heads
        "use_linear_projection": False,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional",
    }


def vae_config(
    widths: tuple[int, ...], *, layers: int = 2, groups: int = 32, sample_size: int = 512
) -> dict[str, Any]:
    """A diffusers `vae/config.json`; the defaults are SD's VAE (`preset_kwargs('sd')`).

    `sample_size` (pixels) is also the tile size of tiled decoding, on both sides.
    """
    n = len(widths)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(widths),
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
    }


def text_config(
    hidden: int, *, layers: int = 12, heads: int = 12, mlp: int | None = None
) -> dict[str, Any]:
    """A transformers CLIPTextModel `config.json`; `hidden=768` is SD 1.5's text encoder."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": mlp or 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "bos_token_id": 0,  # SD 1.5's text_encoder/config.json ids (old CLIP configs)
        "eos_token_id": 2,
        "pad_token_id": 1,
        "projection_dim": hidden,
    }


SD_VAE_WIDTHS = (128, 256, 512, 512)


def suite_plan(suite: str, quick: bool) -> dict[str, Any]:
    """Component configs and measured cases of a suite (JSON-able).

    GPU: SD 1.5 shapes. CPU: SD 1.5's block structure at about a tenth of the width (the
    U-Net forward is then ~0.1 s on 2 cores), SD's real VAE for the tiling case.
    `quick`: tiny stand-ins of the chosen suite's cases (logic only, seconds).
    """
    prompt = "a photograph of an astronaut riding a horse"
    if quick:
        unet = unet_config((16, 32), context_dim=16, heads=2, layers=1, groups=8, sample_size=8)
        plan = {
            "unet": unet,
            "vae": vae_config((8, 16), layers=1, groups=4, sample_size=16),
            "text": text_config(16, layers=2, heads=2),
            "vae_mem": vae_config((8, 16), layers=1, groups=4, sample_size=16),
            "unet_case": {"batch": 2, "latent": 8, "context_len": 77, "dtypes": ["float32"]},
            "t2i_case": {"size": 16, "steps": 4, "dtype": "float32"},
            "vae_case": {"batch": 1, "latent": 16, "dtype": "float32"},
            "encode_case": {"batch": 2, "size": 16, "dtypes": ["float32"]},
            "train_case": {"batch": 2, "latent": 8, "context_len": 77, "dtypes": ["float32"]},
            "finetune_case": {"batch": 2, "dtype": "float32", "remats": ["full", "none"]},
            "lora_case": {
                "batch": 2,
                "latent": 8,
                "context_len": 77,
                "dtype": "float32",
                "remat": "none",
                "rank": 4,
            },  # fmt: skip
            # The SD rows on the quick train U-Net (8x8 latents, 64x64x3 controls); digits:
            # configs/digits.py:quick's model.
            "controlnet_case": {
                "sd": {
                    "batch": 2,
                    "latent": 8,
                    "context_len": 77,
                    "dtype": "float32",
                    "remat": "none",
                    "rank": 4,
                    "downsample": 8,
                    "embedding": [4, 8, 8, 8],  # tiny, as the quick U-Net
                },
                "digits": {"arg": "quick", "batch": 8, "dtype": "float32"},
            },  # fmt: skip
            # One level (no cross-attention block but the middle one): the train step's
            # compile is ~4x shorter than with `unet`'s two levels.
            "train_unet": dict(
                unet_config((8,), context_dim=8, heads=2, layers=1, groups=4, sample_size=8),
                down_block_types=["DownBlock2D"],
                up_block_types=["UpBlock2D"],
            ),
            "windows": 2,
            "window_s": 0.2,
        }
    elif suite == "gpu":
        plan = {
            "unet": unet_config((320, 640, 1280, 1280), context_dim=768),
            "vae": vae_config(SD_VAE_WIDTHS, sample_size=512),
            "text": text_config(768),
            "vae_mem": vae_config(SD_VAE_WIDTHS, sample_size=512),
            "unet_case": {
                "batch": 2,
                "latent": 64,
                "context_len": 77,
                "dtypes": ["bfloat16", "float32"],
            },
            "t2i_case": {"size": 512, "steps": 20, "dtype": "bfloat16"},
            "vae_case": {"batch": 1, "latent": 128, "dtype": "float32"},
            "encode_case": {"batch": 8, "size": 512, "dtypes": ["bfloat16", "float32"]},
            "train_case": {"batch": 4, "latent": 64, "context_len": 77, "dtypes": ["bfloat16"]},
            # configs/sd_finetune.py at SD 1.5's shape: 512-px images, frozen VAE + CLIP in
            # the step; the peak memory of one device is what the issue asks for.
            "finetune_case": {"batch": 4, "dtype": "bfloat16", "remats": ["full", "none"]},
            # LoRA vs the full step on the train case's latents, SD 1.5's U-Net; no remat
            # (diffusers' scripts' default, and configs/sd_lora.py's).
            "lora_case": {
                "batch": 4,
                "latent": 64,
                "context_len": 77,
                "dtype": "bfloat16",
                "remat": "none",
                "rank": 4,
            },  # fmt: skip
            # ControlNet vs the full step: SD 1.5's U-Net on the lora case's latents with
            # 512x512x3 controls; the digits U-Net at configs/digits.py's batch.
            "controlnet_case": {
                "sd": {
                    "batch": 4,
                    "latent": 64,
                    "context_len": 77,
                    "dtype": "bfloat16",
                    "remat": "none",
                    "rank": 4,
                    "downsample": 8,
                    "embedding": [],  # SD's (16, 32, 96, 256)
                },
                "digits": {"arg": "", "batch": 128, "dtype": "float32"},
            },  # fmt: skip
            "windows": 3,
            "window_s": 2.0,
        }
    else:
        plan = {
            "unet": unet_config((32, 64, 128, 128), context_dim=64, sample_size=16),
            "vae": vae_config((32, 64, 128, 128), sample_size=128),
            "text": text_config(64, heads=4),
            # SD's VAE; tiles of 128 px = 16 latents: 32x32 latents are 3x3 tiles, as
            # 128x128 latents with SD's 512-px tiles on the GPU.
            "vae_mem": vae_config(SD_VAE_WIDTHS, sample_size=128),
            "unet_case": {"batch": 2, "latent": 16, "context_len": 77, "dtypes": ["float32"]},
            "t2i_case": {"size": 128, "steps": 20, "dtype": "float32"},
            "vae_case": {"batch": 1, "latent": 32, "dtype": "float32"},
            "encode_case": {"batch": 4, "size": 128, "dtypes": ["float32"]},
            "train_case": {"batch": 2, "latent": 16, "context_len": 77, "dtypes": ["float32"]},
            "finetune_case": {"batch": 2, "dtype": "float32", "remats": ["full", "none"]},
            "lora_case": {
                "batch": 2,
                "latent": 16,
                "context_len": 77,
                "dtype": "float32",
                "remat": "none",
                "rank": 4,
            },  # fmt: skip
            # The lora case's shapes (2x16x16x4 latents, 77x64 context) with 128x128x3
            # controls (SD's 8x condition embedding); the digits U-Net at its config's batch.
            "controlnet_case": {
                "sd": {
                    "batch": 2,
                    "latent": 16,
                    "context_len": 77,
                    "dtype": "float32",
                    "remat": "none",
                    "rank": 4,
                    "downsample": 8,
                    "embedding": [],  # SD's (16, 32, 96, 256)
                },
                "digits": {"arg": "", "batch": 128, "dtype": "float32"},
            },  # fmt: skip
            "windows": 3,
            "window_s": 2.0,
        }
    plan["prompt"] = prompt
    plan["guidance"] = 7.5
    return plan


def cases_of(plan: dict[str, Any], pipe_dir: str, vae_dir: str) -> list[dict[str, Any]]:
    """The measured cases (what every worker's `setup` receives)."""
    u, t, v = plan["unet_case"], plan["t2i_case"], plan["vae_case"]
    cases = [
        {"name": f"unet_{dt}", "kind": "unet", "dir": pipe_dir, "batch": u["batch"],
         "latent": u["latent"], "context_len": u["context_len"], "dtype": dt, "seed": 1}
        for dt in u["dtypes"]
    ]  # fmt: skip
    cases.append({"name": "t2i", "kind": "t2i", "dir": pipe_dir, "size": t["size"],
                  "steps": t["steps"], "guidance": plan["guidance"], "dtype": t["dtype"],
                  "prompt": plan["prompt"], "seed": 2})  # fmt: skip
    for tiled in (False, True):
        cases.append({"name": "vae_tiled" if tiled else "vae_full", "kind": "vae",
                      "dir": vae_dir, "batch": v["batch"], "latent": v["latent"],
                      "tiled": tiled, "dtype": v["dtype"], "seed": 3})  # fmt: skip
    e, tr = plan["encode_case"], plan["train_case"]
    # The train case's U-Net: the pipeline's, or (--quick) a smaller one of its own.
    train_dir = train_unet_dir(pipe_dir) if "train_unet" in plan else pipe_dir
    for dt in e["dtypes"]:  # SD's VAE (the tiling case's directory)
        cases.append({"name": f"encode_{dt}", "kind": "encode", "dir": vae_dir,
                      "batch": e["batch"], "size": e["size"], "dtype": dt, "seed": 4})  # fmt: skip
    for dt in tr["dtypes"]:
        cases.append({"name": f"train_{dt}", "kind": "train", "dir": train_dir,
                      "batch": tr["batch"], "latent": tr["latent"],
                      "context_len": tr["context_len"], "dtype": dt, "seed": 5,
                      "schedule": SD15_DDIM, "optimizer": TRAIN_OPTIMIZER})  # fmt: skip
    ft = plan["finetune_case"]
    for remat in ft["remats"]:
        cases.append({"name": f"finetune_remat_{remat}", "kind": "finetune", "dir": pipe_dir,
                      "batch": ft["batch"], "dtype": ft["dtype"], "remat": remat,
                      "prompt": plan["prompt"], "seed": 6})  # fmt: skip
    lo = plan["lora_case"]
    for name, lora, opt in (
        ("lora_full", None, TRAIN_OPTIMIZER),
        (f"lora_r{lo['rank']}", {"rank": lo["rank"], "alpha": float(lo["rank"])}, LORA_OPTIMIZER),
    ):
        cases.append({"name": name, "kind": "lora", "dir": train_dir, "batch": lo["batch"],
                      "latent": lo["latent"], "context_len": lo["context_len"],
                      "dtype": lo["dtype"], "remat": lo["remat"], "lora": lora, "seed": 7,
                      "schedule": SD15_DDIM, "optimizer": opt})  # fmt: skip
    cn = plan["controlnet_case"]
    sd, dg = cn["sd"], cn["digits"]
    rank = {"rank": sd["rank"], "alpha": float(sd["rank"])}
    control = {"control": "given", "channels": 3, "downsample": sd["downsample"],
               "embedding_channels": sd["embedding"]}  # fmt: skip
    for variant, opt in (("full", TRAIN_OPTIMIZER), (f"lora_r{sd['rank']}", LORA_OPTIMIZER),
                         ("controlnet", CONTROLNET_OPTIMIZER)):  # fmt: skip
        cases.append({"name": f"cn_sd_{variant}", "kind": "controlnet", "model": "sd",
                      "variant": variant, "dir": train_dir, "batch": sd["batch"],
                      "latent": sd["latent"], "context_len": sd["context_len"],
                      "dtype": sd["dtype"], "remat": sd["remat"], "seed": 8,
                      "lora": rank if variant.startswith("lora") else None,
                      "control": control if variant == "controlnet" else None,
                      "schedule": SD15_DDIM, "optimizer": opt})  # fmt: skip
    # configs/digits_controlnet.py's ControlNet (edges, 1 channel, pixel space: 1x).
    control = {"control": "edges", "channels": 1, "downsample": 1, "embedding_channels": None}
    for variant in ("full", "controlnet"):
        cases.append({"name": f"cn_digits_{variant}", "kind": "controlnet", "model": "digits",
                      "variant": variant, "arg": dg["arg"], "batch": dg["batch"],
                      "dtype": dg["dtype"], "seed": 9,
                      "control": control if variant == "controlnet" else None})  # fmt: skip
    return cases


def train_unet_dir(pipe_dir: str) -> str:
    """Where `plan['train_unet']` (if any) is written: DIR/unet/, next to the pipeline."""
    return os.path.join(os.path.dirname(pipe_dir), "train-unet")


def normal(seed: int, shape: tuple[int, ...]):
    """The same float32 standard normal draw on both sides (numpy, NHWC)."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


# ----------------------------------------------------------------------------- diffjax side


class _Side:
    """What both workers share: timing windows, reference outputs, forgetting a case.

    `runs[name]()` runs one call to completion; `outs[name]()` returns its output.
    """

    def __init__(self) -> None:
        self.runs: dict[str, Any] = {}
        self.outs: dict[str, Any] = {}

    def window(self, name: str, reps: int) -> float:
        run = self.runs[name]
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        return time.perf_counter() - t0

    def output(self, name: str, path: str) -> str:
        import numpy as np

        np.save(path, np.asarray(self.outs[name](), np.float32))
        return path

    def drop(self, name: str) -> None:
        self.runs.pop(name, None)
        self.outs.pop(name, None)


class JaxSide(_Side):
    """The JAX worker: writes the shared weights, builds and times diffjax's side."""

    def __init__(self, threads: int) -> None:
        import jax

        self.jax = jax
        self.threads = threads
        super().__init__()
        self._vaes: dict[tuple[str, str], Any] = {}

    def info(self) -> dict[str, Any]:
        jax = self.jax
        dev = jax.devices()[0]
        return {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "device_kind": dev.device_kind,
            "num_devices": jax.device_count(),
            "cpus": sorted(os.sched_getaffinity(0)),
        }

    # -- the shared weights

    def write_pipeline(self, path: str, vae_path: str, plan: dict[str, Any]) -> dict[str, Any]:
        """Random weights in diffusers' layout: a StableDiffusionPipeline dir and a VAE dir.

        Params are drawn with numpy from the models' abstract shapes (no compile): kernels
        ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02), biases ~ N(0, 0.02), norm scales
        1 + N(0, 0.02) -- nothing zero-initialised, so outputs exercise every weight.
        """
        import jax.numpy as jnp
        import numpy as np

        from diffjax.models import autoencoder_kl, clip_text, sd_unet
        from diffjax.pretrained import safetensors_io

        t0 = time.perf_counter()
        if not plan.get("quick"):  # the tiling case is SD's VAE: check against the preset
            preset, cfg = autoencoder_kl.preset_kwargs("sd"), plan["vae_mem"]
            keys = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")
            if any(tuple(np.atleast_1d(cfg[k])) != tuple(np.atleast_1d(preset[k])) for k in keys):
                raise ValueError(f"vae_mem {cfg} is not preset_kwargs('sd') {preset}.")
        counts = {}
        f32 = jnp.float32

        def abstract(module, *args, **kwargs):
            def init(key, args, kwargs):
                return module.init(key, *args, **kwargs)["params"]

            return self.jax.eval_shape(init, self.jax.random.key(0), args, kwargs)

        def write(directory, name, cfg, module, abstract_params, weights_file, seed):
            os.makedirs(directory, exist_ok=True)
            tensors = _random_torch_tensors(abstract_params, seed)
            counts[name] = int(sum(t.size for t in tensors.values()))
            safetensors_io.write_tensors(tensors, os.path.join(directory, weights_file))
            with open(os.path.join(directory, "config.json"), "w") as f:
                json.dump(cfg, f, indent=1)

        u = plan["unet"]
        unet = sd_unet.from_diffusers_config(u)
        x = self.jax.ShapeDtypeStruct((1, 8, 8, 4), f32)
        ts = self.jax.ShapeDtypeStruct((1,), f32)
        ctx = self.jax.ShapeDtypeStruct((1, 1, u["cross_attention_dim"]), f32)
        write(os.path.join(path, "unet"), "unet", u, unet, abstract(unet, x, ts, context=ctx),
              "diffusion_pytorch_model.safetensors", 10)  # fmt: skip
        if "train_unet" in plan:
            tu = plan["train_unet"]
            mod = sd_unet.from_diffusers_config(tu)
            ctx = self.jax.ShapeDtypeStruct((1, 1, tu["cross_attention_dim"]), f32)
            write(os.path.join(train_unet_dir(path), "unet"), "train_unet", tu, mod,
                  abstract(mod, x, ts, context=ctx), "diffusion_pytorch_model.safetensors",
                  14)  # fmt: skip
        for directory, name, cfg, seed in (
            (os.path.join(path, "vae"), "vae", plan["vae"], 11),
            (vae_path, "vae_mem", plan["vae_mem"], 12),
        ):
            vae = autoencoder_kl.from_diffusers_config(cfg)
            img = self.jax.ShapeDtypeStruct((1, 2 * vae.downscale, 2 * vae.downscale, 3), f32)
            write(directory, name, cfg, vae, abstract(vae, img),
                  "diffusion_pytorch_model.safetensors", seed)  # fmt: skip
        tc = plan["text"]
        text = clip_text.from_hf_config(tc)
        ids = self.jax.ShapeDtypeStruct((1, 77), jnp.int32)
        write(os.path.join(path, "text_encoder"), "text_encoder", tc, text, abstract(text, ids),
              "model.safetensors", 13)  # fmt: skip
        shutil.copytree(TOKENIZER, os.path.join(path, "tokenizer"),
                        ignore=shutil.ignore_patterns("reference.json"))  # fmt: skip
        os.makedirs(os.path.join(path, "scheduler"))
        with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(SD15_DDIM, f, indent=1)
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        with open(os.path.join(path, "model_index.json"), "w") as f:
            json.dump(index, f, indent=1)
        size = sum(
            os.path.getsize(os.path.join(d, n))
            for root in (path, vae_path, train_unet_dir(path))
            for d, _, names in os.walk(root)
            for n in names
        )
        return {"params": counts, "bytes": size, "write_s": time.perf_counter() - t0}

    # -- cases

    def setup(self, spec: dict[str, Any]) -> dict[str, Any]:
        return getattr(self, f"_setup_{spec['kind']}")(spec)

    def _setup_unet(self, spec: dict[str, Any]) -> dict[str, Any]:
        jax, jnp = self.jax, self.jax.numpy
        from diffjax.models.summary import count_params
        from diffjax.pretrained import pipeline

        t0 = time.perf_counter()
        comp = pipeline.load_sd_unet(os.path.join(spec["dir"], "unet"), spec["dtype"])
        load_s = time.perf_counter() - t0
        module, params = comp.module, jax.device_put(comp.params)
        b, n, ctx_len = spec["batch"], spec["latent"], spec["context_len"]
        x = jnp.asarray(normal(spec["seed"], (b, n, n, 4)))
        ctx = jnp.asarray(
            normal(spec["seed"] + 1, (b, ctx_len, comp.config["cross_attention_dim"]))
        )
        t = jnp.full((b,), 500.0, jnp.float32)

        @jax.jit
        def forward(p, x, t, ctx):
            return module.apply({"params": p}, x, t, context=ctx)

        t0 = time.perf_counter()
        lowered = forward.lower(params, x, t, ctx)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        compiled(params, x, t, ctx).block_until_ready()
        t3 = time.perf_counter()
        self.runs[spec["name"]] = lambda: compiled(params, x, t, ctx).block_until_ready()
        self.outs[spec["name"]] = lambda: compiled(params, x, t, ctx)
        return {
            "params": count_params(params),
            "load_s": load_s,
            "lower_s": t1 - t0,
            "compile_s": t2 - t1,
            "first_run_s": t3 - t2,
            "memory": _xla_memory(compiled),
            "attention_impl": module.attention_impl or "auto",
        }

    def _setup_t2i(self, spec: dict[str, Any]) -> dict[str, Any]:
        from diffjax.models.summary import count_params
        from diffjax.pretrained import pipeline

        t0 = time.perf_counter()
        pipe = pipeline.load_pipeline(spec["dir"], dtype=spec["dtype"])
        load_s = time.perf_counter() - t0
        gen = pipeline.PretrainedGenerator(
            pipe, num_steps=spec["steps"], guidance=spec["guidance"],
            height=spec["size"], width=spec["size"],
        )  # fmt: skip
        noise = normal(spec["seed"], (1, *gen.latent_shape))
        prompts = [spec["prompt"]]

        def once():
            images, _ = gen.generate(1, prompts=prompts, noise=noise, batch_size=1)
            return images

        t0 = time.perf_counter()
        once()
        first = time.perf_counter() - t0
        self.runs[spec["name"]] = once
        self.outs[spec["name"]] = lambda: once().astype("float32") / 255.0
        params = sum(count_params(c.params) for c in (pipe.denoiser, pipe.vae, pipe.text_encoder))
        return {
            "params": params,
            "load_s": load_s,
            "first_run_s": first,
            "method": pipe.scheduler.method,
            "latent_shape": list(gen.latent_shape),
        }

    def _setup_vae(self, spec: dict[str, Any]) -> dict[str, Any]:
        jax, jnp = self.jax, self.jax.numpy
        from diffjax.models import autoencoder_kl
        from diffjax.models.summary import count_params
        from diffjax.pretrained import pipeline

        key = (spec["dir"], spec["dtype"])
        t0 = time.perf_counter()
        if key not in self._vaes:
            comp = pipeline.load_vae(spec["dir"], spec["dtype"])
            self._vaes[key] = (comp, jax.device_put(comp.params))
        load_s = time.perf_counter() - t0
        comp, params = self._vaes[key]
        module = comp.module
        f = module.downscale
        tile = int(comp.config["sample_size"]) // f  # diffusers' tile_latent_min_size
        overlap = tile // 4  # diffusers' tile_overlap_factor 0.25
        b, n = spec["batch"], spec["latent"]
        z = jnp.asarray(normal(spec["seed"], (b, n, n, module.latent_channels)))
        side = tile if spec["tiled"] else n

        @jax.jit
        def decode(p, z):
            return module.apply({"params": p}, z, method=module.decode)

        shape = jax.ShapeDtypeStruct((b, side, side, module.latent_channels), jnp.float32)
        t0 = time.perf_counter()
        lowered = decode.lower(params, shape)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        if spec["tiled"]:

            def once():
                return autoencoder_kl.tiled_decode(
                    lambda zt: compiled(params, zt), z, tile=tile, overlap=overlap
                )

            out_px = n * f
            # tiled_decode blends on the host: the output and the weight sum, float32.
            host = b * out_px * out_px * module.out_channels * 4 + out_px * out_px * 4
        else:

            def once():
                return compiled(params, z).block_until_ready()

            host = 0
        once()
        t3 = time.perf_counter()
        self.runs[spec["name"]] = once
        self.outs[spec["name"]] = once
        mem = _xla_memory(compiled)
        mem["host_blend_bytes"] = host
        dev = jax.devices()[0]
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        if stats:
            mem["device_peak_bytes_in_use_so_far"] = int(stats.get("peak_bytes_in_use", 0))
        return {
            "params": count_params(params),
            "load_s": load_s,
            "lower_s": t1 - t0,
            "compile_s": t2 - t1,
            "first_run_s": t3 - t2,
            "tile": tile if spec["tiled"] else None,
            "overlap": overlap if spec["tiled"] else None,
            "memory": mem,
        }

    def _setup_encode(self, spec: dict[str, Any]) -> dict[str, Any]:
        """`launch/encode_latents.py`'s per-batch encode: `encode.Encoder` (jitted, the mode).

        Host images in, host latents out (as it writes them to disk); compile happens
        on the first call, so its time is the first call less a warm one.
        """
        import numpy as np

        from diffjax.models.summary import count_params
        from diffjax.pretrained import encode, pipeline

        t0 = time.perf_counter()
        comp = pipeline.load_vae(spec["dir"], spec["dtype"])
        load_s = time.perf_counter() - t0
        b, px = spec["batch"], spec["size"]
        enc = encode.Encoder(comp, batch_size=b)
        if enc.batch_size != b:
            raise ValueError(f"encode: batch {b} became {enc.batch_size} over the devices.")
        x = np.clip(normal(spec["seed"], (b, px, px, 3)), -1.0, 1.0)
        batch = {"image": x, "index": np.arange(b, dtype=np.int32)}

        def once():
            return enc(batch)["latents"]

        t0 = time.perf_counter()
        z = once()
        t1 = time.perf_counter()
        self.runs[spec["name"]] = once
        self.outs[spec["name"]] = once
        return {
            "params": count_params(comp.params),
            "load_s": load_s,
            "first_run_s": t1 - t0,
            "latent_shape": list(z.shape[1:]),
            "scaling_factor": enc.scaling_factor,
            "path": "diffjax.pretrained.encode.Encoder (launch/encode_latents.py's step)",
        }

    def _latent_step(self, spec: dict[str, Any], extra: dict[str, Any] | None = None):
        """The latent train step's config, U-Net config and global batch (train, lora,
        controlnet).

        A config with `model.name='sd_unet'` (the directory's U-Net as kwargs),
        `data.source='latents'`, discrete_vp scaled_linear, epsilon, `eps_mse`, no caption
        dropout, AdamW + clipping + EMA from `spec['optimizer']`; the batch is the latents
        and the context the diffusers side reads (`normal` draws, an all-True mask), plus
        the host arrays of `extra` (a ControlNet's `control`).
        Returns (config, unet config, mesh, batch).
        """
        import dataclasses

        import numpy as np

        from diffjax import parallel
        from diffjax.config import get_base_config
        from diffjax.models import sd_unet

        with open(os.path.join(spec["dir"], "unet", "config.json")) as f:
            ucfg = json.load(f)
        module = sd_unet.from_diffusers_config(ucfg)
        skip = {"parent", "name", "dtype", "remat_policy", "attention_impl"}
        kwargs = {
            f.name: getattr(module, f.name)
            for f in dataclasses.fields(module)
            if f.init and f.name not in skip
        }
        s, o = spec["schedule"], spec["optimizer"]
        b, n, ctx_len = spec["batch"], spec["latent"], spec["context_len"]
        config = get_base_config()
        config.model.name = "sd_unet"
        config.model.kwargs.update(kwargs)
        config.model.dtype = spec["dtype"]
        config.model.remat_policy = spec.get("remat", "none")
        d = config.data
        d.source, d.image_size, d.channels = "latents", n, ucfg["in_channels"]
        d.num_classes, d.max_text_len = 0, ctx_len
        f = config.diffusion
        f.schedule, f.beta_schedule = "discrete_vp", s["beta_schedule"]
        f.beta_start, f.beta_end = s["beta_start"], s["beta_end"]
        f.num_timesteps, f.prediction = s["num_train_timesteps"], s["prediction_type"]
        f.loss_weighting, f.cond_dropout = "eps_mse", 0.0
        tc = config.train
        tc.batch_size, tc.lr_schedule, tc.warmup_steps = b, "constant", 0
        tc.learning_rate, tc.weight_decay = o["learning_rate"], o["weight_decay"]
        tc.b1, tc.b2, tc.eps, tc.grad_clip = o["b1"], o["b2"], o["eps"], o["grad_clip"]
        tc.ema_decay, tc.ema_warmup = o["ema_decay"], True
        mesh = parallel.make_mesh(-1, 1)
        dim = ucfg["cross_attention_dim"]
        batch = parallel.global_batch(
            {
                "image": normal(spec["seed"], (b, n, n, ucfg["in_channels"])),
                "context": normal(spec["seed"] + 1, (b, ctx_len, dim)),
                # SD attends to every token; the latents source gives an all-True mask.
                "context_mask": np.ones((b, ctx_len), bool),
                **(extra or {}),
            },
            mesh,
        )
        return config, ucfg, mesh, batch

    def _setup_train(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The real latent train step, as `launch/train.py` builds and compiles it.

        `rundir.build_components` of `_latent_step`'s config, the state initialised and
        the step compiled ahead of time with donated state as
        `diffjax.train.loop._compile_step` does. The U-Net is randomly initialised (the
        step's cost does not depend on the weights; the parameter count is checked).
        """
        import numpy as np

        jax = self.jax
        from diffjax import parallel, rundir
        from diffjax.models.partitioning import sharding_context
        from diffjax.models.summary import count_params

        t0 = time.perf_counter()
        config, _, mesh, batch = self._latent_step(spec)
        parts = rundir.build_components(config, mesh)
        # The real step: sd_unet configs are text-conditioned, so it feeds the context.
        train_step, step_from = parts.train_step, "rundir.build_components"
        init = functools.partial(parts.init, unbox=True)
        state = jax.jit(init, out_shardings=parts.state_sharding)(jax.random.key(0))
        build_s = time.perf_counter() - t0
        platform = mesh.devices.flat[0].platform
        t0 = time.perf_counter()
        with sharding_context(mesh):
            lowered = jax.jit(
                train_step,
                in_shardings=(parts.state_sharding, parallel.batch_sharding(mesh)),
                out_shardings=(parts.state_sharding, parallel.replicated(mesh)),
                donate_argnums=0,
                compiler_options=parallel.compiler_options(platform),
            ).lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        holder = {"state": state}
        losses = []

        def once():
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready((holder["state"], metrics))
            return metrics

        m = once()
        t3 = time.perf_counter()
        losses.append(float(m["loss"]))
        if not bool(m["finite"]):
            raise ValueError(f"train: the first diffjax step is not finite (loss {losses[0]}).")
        self.runs[spec["name"]] = once
        self.outs[spec["name"]] = lambda: np.asarray(once()["loss"])
        return {
            "params": count_params(holder["state"].params),
            "load_s": build_s,
            "lower_s": t1 - t0,
            "compile_s": t2 - t1,
            "first_run_s": t3 - t2,
            "first_loss": losses[0],
            "train_step": step_from,
            "param_dtype": str(jax.tree.leaves(holder["state"].params)[0].dtype),
            "memory": _xla_memory(compiled),
        }

    def _setup_finetune(self, spec: dict[str, Any]) -> dict[str, Any]:
        """`configs/sd_finetune.py` on the pipeline directory, as `launch/train.py` runs it.

        `apply_pretrained` resolves the config, the frozen stage (VAE encoder + CLIP) runs
        inside the step on 512-px images (SD 1.5 shape) and token ids, and the step is
        compiled by the loop's own `_compile_step`. The U-Net is randomly initialised (the
        cost does not depend on the weights). Memory: XLA's plan of the compiled step
        (state + frozen weights + batch + temporaries), and on GPUs the device's peak.
        """
        import numpy as np

        jax = self.jax
        from diffjax import parallel, rundir
        from diffjax.config import load_config_file
        from diffjax.data.tokens import tokenize
        from diffjax.models.summary import count_params
        from diffjax.pretrained import stage as stage_lib

        t0 = time.perf_counter()
        config = load_config_file(str(common.ROOT / "configs" / "sd_finetune.py"))
        config.pretrained, config.data.data_dir = spec["dir"], "(synthetic batch)"
        config.model.dtype, config.model.remat_policy = spec["dtype"], spec["remat"]
        config.train.batch_size = b = spec["batch"]
        config = stage_lib.apply_pretrained(config)
        mesh = parallel.make_mesh(-1, 1)
        stage = stage_lib.build_stage(config, mesh)
        parts = rundir.build_components(
            config, mesh, prepare=stage.prepare, null_context=stage.null_context
        )
        init = functools.partial(parts.init, unbox=True)
        state = jax.jit(init, out_shardings=parts.state_sharding)(jax.random.key(0))
        ids, mask = tokenize([spec["prompt"]] * b, config.data.max_text_len, config.data.tokenizer)
        h, w, c = stage.image_shape
        image = np.clip(normal(spec["seed"], (b, h, w, c)), -1, 1).astype(np.float32)
        batch = parallel.global_batch({"image": image, "context": ids, "context_mask": mask}, mesh)
        build_s = time.perf_counter() - t0
        out = self._loop_step(spec["name"], parts, state, batch, stage.params, mesh)
        return {
            "params": out.pop("trained_params"),
            "frozen_params": count_params(stage.params),
            "image_shape": list(stage.image_shape),
            "load_s": build_s,
            **out,
        }

    def _loop_step(self, name, parts, state, batch, frozen, mesh) -> dict[str, Any]:
        """Compiles the step as the loop does (`_compile_step`), runs it once (finite),
        and registers it for the timing windows; returns its compile/first-run numbers."""
        import numpy as np

        jax = self.jax
        from diffjax.models.summary import count_params
        from diffjax.train import loop

        t0 = time.perf_counter()
        compiled = loop._compile_step(parts, state, batch, frozen, mesh)
        compile_s = time.perf_counter() - t0
        holder = {"state": state}

        def once():
            holder["state"], metrics = compiled(holder["state"], batch, frozen)
            jax.block_until_ready((holder["state"], metrics))
            return metrics

        t0 = time.perf_counter()
        m = once()
        first_s = time.perf_counter() - t0
        if not bool(m["finite"]):
            raise ValueError(f"{name}: the first step is not finite (loss {float(m['loss'])}).")
        self.runs[name] = once
        self.outs[name] = lambda: np.asarray(once()["loss"])
        stats = jax.devices()[0].memory_stats() or {}
        return {
            "trained_params": count_params(holder["state"].params),
            "compile_s": compile_s,
            "first_run_s": first_s,
            "first_loss": float(m["loss"]),
            "param_dtype": str(jax.tree.leaves(holder["state"].params)[0].dtype),
            "memory": _xla_memory(compiled),
            # XLA's count for the whole compiled step (forward, backward, optimizer).
            "flops": _xla_flops(compiled),
            # Cumulative over this worker process (cases run one after another).
            "device_peak_bytes": stats.get("peak_bytes_in_use"),
        }

    def _setup_lora(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A LoRA step or the full fine-tune step of the same latent-fed U-Net.

        `_latent_step`'s config (the train case's, at `spec['remat']`), with
        `lora.rank`/`lora.alpha` from `spec['lora']` (None: the full fine-tune), built by
        `rundir.build_components` and compiled by the loop's own `_compile_step`. Both
        start from the directory's U-Net weights: the full step's state holds them (the
        loop's `_start_from`); the LoRA step's `frozen["base"]` does (placed with
        `parts.base_sharding`, as the loop does), its state holds only the LoRA (B = 0,
        so the first step's loss equals the full step's). Memory: XLA's plan of the step
        (arguments = state + frozen + batch), the state's bytes per part, and on GPUs the
        device's peak (the gpu suite gives each lora case a JAX worker of its own).
        """

        jax = self.jax
        from diffjax import rundir
        from diffjax.models.summary import count_params
        from diffjax.pretrained import pipeline
        from diffjax.train import loop

        t0 = time.perf_counter()
        config, _, mesh, batch = self._latent_step(spec)
        lo = spec["lora"]
        if lo:
            config.lora.rank, config.lora.alpha = lo["rank"], lo["alpha"]
        parts = rundir.build_components(config, mesh)
        base = pipeline.load_sd_unet(os.path.join(spec["dir"], "unet")).params
        shapes = jax.tree.map(lambda a: tuple(a.shape), parts.model_shapes)
        if jax.tree.map(lambda a: tuple(a.shape), base) != shapes:
            raise ValueError(f"{spec['name']}: the directory's U-Net is not the config's model.")
        init = functools.partial(parts.init, unbox=True)
        state = jax.jit(init, out_shardings=parts.state_sharding)(jax.random.key(0))
        if lo:
            frozen = {"base": jax.device_put(base, parts.base_sharding)}
        else:
            state, frozen = loop._start_from(config, parts, state, base), {}
        build_s = time.perf_counter() - t0

        def nbytes(tree):
            return int(sum(x.nbytes for x in jax.tree.leaves(tree)))

        state_bytes = {
            "params": nbytes(state.params),
            "ema_params": nbytes(state.ema_params),
            "opt_state": nbytes(state.opt_state),
            "frozen": nbytes(frozen),
        }
        out = self._loop_step(spec["name"], parts, state, batch, frozen, mesh)
        targets = parts.lora_targets or {}
        return {
            "params": out.pop("trained_params"),  # trained (what AdamW holds)
            "model_params": count_params(base),
            "lora_modules": len(targets.get("denoiser", [])),
            "load_s": build_s,
            "state_bytes": state_bytes,
            **out,
        }

    def _setup_controlnet(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A ControlNet step, or its base's full step (or a LoRA step), on the same shapes.

        `spec['model']`: "sd" is `_latent_step`'s config (the lora case's latent-fed SD
        U-Net, the directory's weights as the base; a control image 8x the latents' size,
        3 channels, SD's condition embedding), "digits" is configs/digits.py's (full) and
        configs/digits_controlnet.py's (controlnet) config on a random batch of 8x8x1
        images and labels, a random-init base (edges: a 1-channel control, 1x). A
        controlnet variant sets `controlnet.control`, `conditioning_channels` and
        `control_downsample` (what `stage.resolve_controlnet` would), is built by
        `rundir.build_components`, starts as the loop's `_controlnet_start` (the encoder
        half copied from `frozen["base"]`, placed with `parts.base_sharding`) and trains the
        ControlNet only; full: the loop's `_start_from` (every weight trains); lora: as
        the lora case. Each is compiled by the loop's `_compile_step`. Memory: XLA's plan
        (arguments = state + frozen + batch), the state's bytes per part.
        """
        import numpy as np

        jax = self.jax
        from diffjax import experiment, parallel, rundir
        from diffjax.config import load_config_file
        from diffjax.models.summary import count_params
        from diffjax.pretrained import pipeline
        from diffjax.train import loop

        t0 = time.perf_counter()
        ctl, b = spec["control"], spec["batch"]
        rng = np.random.default_rng(spec["seed"] + 2)
        if spec["model"] == "sd":
            f = ctl["downsample"] if ctl else 1
            px = spec["latent"] * f
            extra = (
                {"control": rng.random((b, px, px, ctl["channels"]), dtype=np.float32)}
                if ctl
                else None
            )
            config, _, mesh, batch = self._latent_step(spec, extra)
            base = pipeline.load_sd_unet(os.path.join(spec["dir"], "unet")).params
        else:
            name = "digits_controlnet.py" if ctl else "digits.py"
            config = load_config_file(str(common.ROOT / "configs" / name), spec["arg"] or None)
            config.base_workdir = ""  # the base is given below, not read from a run
            config.model.dtype = spec["dtype"]
            config.train.batch_size = b
            d, mesh = config.data, parallel.make_mesh(-1, 1)
            n = d.image_size
            host = {
                "image": np.clip(normal(spec["seed"], (b, n, n, d.channels)), -1, 1),
                "labels": rng.integers(0, d.num_classes, b).astype(np.int32),
            }
            if ctl:  # edges: a binary map (as the Canny transform gives), 1x the image
                host["control"] = (rng.random((b, n, n, ctl["channels"])) < 0.2).astype(np.float32)
            batch = parallel.global_batch(host, mesh)
            base = None
        if spec.get("lora"):
            config.lora.rank, config.lora.alpha = spec["lora"]["rank"], spec["lora"]["alpha"]
        if ctl:
            c = config.controlnet
            c.control, c.conditioning_channels = ctl["control"], ctl["channels"]
            c.control_downsample = ctl["downsample"]
            if ctl["embedding_channels"] is not None:  # None: the config's own
                c.embedding_channels = tuple(ctl["embedding_channels"])
        parts = rundir.build_components(config, mesh)
        if base is None:  # a random base of the config's model (the cost is the same)
            init_base = experiment.make_init_fn(experiment.build_model(config), config)
            base = jax.jit(functools.partial(_unboxed, init_base))(jax.random.key(1))
        shapes = jax.tree.map(lambda a: tuple(a.shape), parts.model_shapes)
        if jax.tree.map(lambda a: tuple(a.shape), base) != shapes:
            raise ValueError(f"{spec['name']}: the base's params are not the config's model.")
        init = functools.partial(parts.init, unbox=True)
        state = jax.jit(init, out_shardings=parts.state_sharding)(jax.random.key(0))
        if spec["variant"] == "full":
            state, frozen = loop._start_from(config, parts, state, base), {}
        else:
            frozen = {"base": jax.device_put(base, parts.base_sharding)}
            if parts.controlnet:
                state = loop._controlnet_start(config, parts, state, frozen["base"])
        build_s = time.perf_counter() - t0

        def nbytes(tree):
            return int(sum(x.nbytes for x in jax.tree.leaves(tree)))

        state_bytes = {
            "params": nbytes(state.params),
            "ema_params": nbytes(state.ema_params),
            "opt_state": nbytes(state.opt_state),
            "frozen": nbytes(frozen),
        }
        out = self._loop_step(spec["name"], parts, state, batch, frozen, mesh)
        return {
            "params": out.pop("trained_params"),  # trained (what AdamW holds)
            "model_params": count_params(base),
            "controlnet": bool(parts.controlnet),
            # The ControlNet's condition embedding (control image -> the model's width).
            "embedding_params": count_params(state.params.get("controlnet_cond_embedding", {}))
            if parts.controlnet
            else 0,
            # Its copy of the base's encoder half (the entries named as the base's).
            "copied_params": count_params({k: v for k, v in state.params.items() if k in base})
            if parts.controlnet
            else 0,
            "batch_shapes": {k: list(v.shape) for k, v in batch.items()},
            "ema_decay": float(config.train.ema_decay),
            "load_s": build_s,
            "state_bytes": state_bytes,
            **out,
        }


def _unboxed(init_fn, key):
    """`init_fn(key)`'s params without their partitioning boxes."""
    import flax.linen as nn

    return nn.meta.unbox(init_fn(key))


def _random_torch_tensors(abstract_params: Any, seed: int) -> dict[str, Any]:
    """Random params of a Flax tree's shapes, as torch-layout numpy tensors."""
    import flax.linen as nn
    import numpy as np
    from flax import traverse_util

    from diffjax.pretrained import convert

    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params))
    params = {}
    for path in sorted(flat):
        shape, leaf = flat[path].shape, path[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            x = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
        elif leaf == "scale":
            x = 1.0 + 0.02 * rng.standard_normal(shape, dtype=np.float32)
        else:  # bias, embedding
            x = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        params[path] = x
    return convert.flax_to_torch(traverse_util.unflatten_dict(params))


def _xla_flops(compiled: Any) -> float | None:
    """XLA's FLOP count of a compiled program (None where the backend gives none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per device
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _xla_memory(compiled: Any) -> dict[str, Any]:
    """XLA's buffer plan of a compiled program (bytes); `total` = args + outputs + temps."""
    m = compiled.memory_analysis()
    if m is None:
        return {"kind": "n/a (no memory_analysis on this backend)", "total_bytes": None}
    out = {
        "kind": "XLA memory_analysis: arguments + outputs + temporaries - aliased",
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "generated_code_bytes": int(m.generated_code_size_in_bytes),
    }
    out["total_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


# ----------------------------------------------------------------------------- diffusers side


class TorchSide(_Side):
    """The PyTorch worker: diffusers' side of every case (eval mode, no_grad)."""

    def __init__(self, threads: int) -> None:
        import torch

        self.torch = torch
        torch.set_grad_enabled(False)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.threads = threads
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        super().__init__()
        self._vaes: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        import diffusers
        import transformers

        out = {
            "torch": self.torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "device": str(self.device),
            "threads": self.torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        }
        if self.device.type == "cuda":
            out["device_name"] = self.torch.cuda.get_device_name()
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _dtype(self, name: str):
        return {"float32": self.torch.float32, "bfloat16": self.torch.bfloat16}[name]

    def _nchw(self, x, dtype):
        return self.torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(self.device, dtype)

    def _peak(self, run, baseline: int = 0) -> int | None:
        """torch.cuda.max_memory_allocated over one call, less `baseline` (the bytes that
        were allocated before the case loaded anything); None on a CPU."""
        if self.device.type != "cuda":
            return None
        self._sync()
        self.torch.cuda.reset_peak_memory_stats()
        run()
        self._sync()
        return int(self.torch.cuda.max_memory_allocated()) - baseline

    def _allocated(self) -> int:
        return int(self.torch.cuda.memory_allocated()) if self.device.type == "cuda" else 0

    def setup(self, spec: dict[str, Any]) -> dict[str, Any]:
        return getattr(self, f"_setup_{spec['kind']}")(spec)

    def _setup_unet(self, spec: dict[str, Any]) -> dict[str, Any]:
        from diffusers import UNet2DConditionModel

        dt = self._dtype(spec["dtype"])
        t0 = time.perf_counter()
        unet = UNet2DConditionModel.from_pretrained(spec["dir"], subfolder="unet", torch_dtype=dt)
        unet = unet.to(self.device).eval()
        load_s = time.perf_counter() - t0
        b, n = spec["batch"], spec["latent"]
        x = self._nchw(normal(spec["seed"], (b, n, n, 4)), dt)
        d = unet.config.cross_attention_dim
        ctx = self.torch.from_numpy(normal(spec["seed"] + 1, (b, spec["context_len"], d)))
        ctx = ctx.to(self.device, dt)
        t = self.torch.full((b,), 500.0, device=self.device)

        def once():
            out = unet(x, t, encoder_hidden_states=ctx).sample
            self._sync()
            return out

        t0 = time.perf_counter()
        once()
        first = time.perf_counter() - t0
        once()
        self.runs[spec["name"]] = once
        self.outs[spec["name"]] = lambda: once().float().permute(0, 2, 3, 1).cpu().numpy()
        return {
            "params": int(sum(p.numel() for p in unet.parameters())),
            "load_s": load_s,
            "first_run_s": first,
            "memory": {"kind": "torch.cuda.max_memory_allocated", "total_bytes": self._peak(once)},
        }

    def _setup_t2i(self, spec: dict[str, Any]) -> dict[str, Any]:
        from diffusers import StableDiffusionPipeline

        dt = self._dtype(spec["dtype"])
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(
            spec["dir"], torch_dtype=dt, safety_checker=None, requires_safety_checker=False
        ).to(self.device)
        load_s = time.perf_counter() - t0
        pipe.set_progress_bar_config(disable=True)
        lat = spec["size"] // pipe.vae_scale_factor
        latents = self._nchw(normal(spec["seed"], (1, lat, lat, 4)), dt)

        def once():
            out = pipe(
                spec["prompt"],
                latents=latents.clone(),
                num_inference_steps=spec["steps"],
                guidance_scale=spec["guidance"],
                height=spec["size"],
                width=spec["size"],
                output_type="np",
            ).images
            self._sync()
            return out

        t0 = time.perf_counter()
        once()
        first = time.perf_counter() - t0
        self.runs[spec["name"]] = once
        self.outs[spec["name"]] = once
        params = sum(
            sum(p.numel() for p in m.parameters()) for m in (pipe.unet, pipe.vae, pipe.text_encoder)
        )
        return {
            "params": int(params),
            "load_s": load_s,
            "first_run_s": first,
            "scheduler": type(pipe.scheduler).__name__,
            "memory": {"kind": "torch.cuda.max_memory_allocated", "total_bytes": self._peak(once)},
        }

    def _setup_vae(self, spec: dict[str, Any]) -> dict[str, Any]:
        from diffusers import AutoencoderKL

        dt = self._dtype(spec["dtype"])
        t0 = time.perf_counter()
        key = f"{spec['dir']}:{spec['dtype']}"
        if key not in self._vaes:
            vae = AutoencoderKL.from_pretrained(spec["dir"], torch_dtype=dt)
            self._vaes[key] = vae.to(self.device).eval()
        load_s = time.perf_counter() - t0
        vae = self._vaes[key]
        n = spec["latent"]
        z = self._nchw(normal(spec["seed"], (spec["batch"], n, n, 4)), dt)
        tiled = spec["tiled"]

        def once():
            vae.use_tiling = tiled  # what enable_tiling() / disable_tiling() set
            out = vae.decode(z).sample
            self._sync()
            return out

        once()
        t0 = time.perf_counter()
        once()
        first = time.perf_counter() - t0
        self.runs[spec["name"]] = once
        self.outs[spec["name"]] = lambda: once().float().permute(0, 2, 3, 1).cpu().numpy()
        return {
            "params": int(sum(p.numel() for p in vae.parameters())),
            "load_s": load_s,
            "first_run_s": first,
            "tile": vae.tile_latent_min_size if tiled else None,
            "memory": {"kind": "torch.cuda.max_memory_allocated", "total_bytes": self._peak(once)},
        }

    def _setup_encode(self, spec: dict[str, Any]) -> dict[str, Any]:
        """`vae.encode(x).latent_dist.mean * scaling_factor`, host images in, host latents out."""
        from diffusers import AutoencoderKL

        dt = self._dtype(spec["dtype"])
        t0 = time.perf_counter()
        vae = AutoencoderKL.from_pretrained(spec["dir"], torch_dtype=dt).to(self.device).eval()
        load_s = time.perf_counter() - t0
        b, px = spec["batch"], spec["size"]
        x = normal(spec["seed"], (b, px, px, 3)).clip(-1.0, 1.0)
        scale = float(vae.config.scaling_factor)

        def once():
            xt = self._nchw(x, dt)
            z = vae.encode(xt).latent_dist.mean * scale
            return z.float().permute(0, 2, 3, 1).cpu().numpy()

        t0 = time.perf_counter()
        once()
        first = time.perf_counter() - t0
        self.runs[spec["name"]] = once
        self.outs[spec["name"]] = once
        return {
            "params": int(sum(p.numel() for p in vae.parameters())),
            "load_s": load_s,
            "first_run_s": first,
            "memory": {"kind": "torch.cuda.max_memory_allocated", "total_bytes": self._peak(once)},
        }

    def _setup_train(self, spec: dict[str, Any]) -> dict[str, Any]:
        """diffusers' latent train step (train_text_to_image.py's loop body, one step)."""
        return self._latent_step(spec, lora=None)

    def _setup_lora(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The same step with a peft LoRA (train_text_to_image_lora.py), or without one."""
        return self._latent_step(spec, lora=spec["lora"])

    def _latent_step(self, spec: dict[str, Any], lora: dict[str, Any] | None) -> dict[str, Any]:
        """One latent train step of diffusers' U-Net, full or with a LoRA adapter.

        DDPMScheduler(scaled_linear).add_noise, MSE on epsilon, backward, clip_grad_norm_,
        torch.optim.AdamW over the trained params, and (optimizer `ema_decay` > 0) an EMA
        of them (what `--use_ema` keeps; EMAModel's decay min(decay, (1 + step) /
        (10 + step))). bfloat16: autocast, float32 params. `lora`: {rank, alpha}: the
        U-Net frozen, `unet.add_adapter(LoraConfig(r, lora_alpha, init_lora_weights=
        "gaussian", target_modules=[to_q, to_k, to_v, to_out.0]))` as diffusers'
        train_text_to_image_lora.py does, so only the LoRA params require grad.
        """
        import torch
        import torch.nn.functional as F
        from diffusers import DDPMScheduler, UNet2DConditionModel

        bf16 = spec["dtype"] == "bfloat16"
        before = self._allocated()  # the lora cases' twin may be resident (run together)
        t0 = time.perf_counter()
        unet = UNet2DConditionModel.from_pretrained(
            spec["dir"], subfolder="unet", torch_dtype=torch.float32
        )
        if lora:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(
                LoraConfig(
                    r=lora["rank"],
                    lora_alpha=lora["alpha"],
                    init_lora_weights="gaussian",
                    target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                )
            )
        unet = unet.to(self.device).train()
        s, o = spec["schedule"], spec["optimizer"]
        sched = DDPMScheduler(
            num_train_timesteps=s["num_train_timesteps"],
            beta_start=s["beta_start"],
            beta_end=s["beta_end"],
            beta_schedule=s["beta_schedule"],
            prediction_type=s["prediction_type"],
        )
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params,
            lr=o["learning_rate"],
            betas=(o["b1"], o["b2"]),
            eps=o["eps"],
            weight_decay=o["weight_decay"],
        )
        ema = [p.detach().clone() for p in params] if o["ema_decay"] > 0 else None
        load_s = time.perf_counter() - t0
        b, n = spec["batch"], spec["latent"]
        latents = self._nchw(normal(spec["seed"], (b, n, n, unet.config.in_channels)),
                             torch.float32)  # fmt: skip
        d = unet.config.cross_attention_dim
        ctx = torch.from_numpy(normal(spec["seed"] + 1, (b, spec["context_len"], d)))
        ctx = ctx.to(self.device)
        gen = torch.Generator(self.device).manual_seed(spec["seed"])
        step = [0]

        def once():
            with torch.enable_grad():
                noise = torch.randn(latents.shape, generator=gen, device=self.device)
                t = torch.randint(0, s["num_train_timesteps"], (b,), generator=gen,
                                  device=self.device)  # fmt: skip
                noisy = sched.add_noise(latents, noise, t)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                    pred = unet(noisy, t, encoder_hidden_states=ctx).sample
                loss = F.mse_loss(pred.float(), noise, reduction="mean")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, o["grad_clip"])
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    decay = min(o["ema_decay"], (1 + step[0]) / (10 + step[0]))
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, params, 1.0 - decay)
                step[0] += 1
            self._sync()
            return loss.detach()

        t0 = time.perf_counter()
        first_loss = float(once())
        first = time.perf_counter() - t0
        self.runs[spec["name"]] = once
        self.outs[spec["name"]] = lambda: once().float().cpu().numpy()

        def nbytes(tensors):
            return int(sum(x.numel() * x.element_size() for x in tensors))

        opt_tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        return {
            "params": int(sum(p.numel() for p in params)),
            "model_params": int(
                sum(p.numel() for k, p in unet.named_parameters() if "lora_" not in k)
            ),
            "load_s": load_s,
            "first_run_s": first,
            "first_loss": first_loss,
            "param_dtype": str(params[0].dtype),
            "autocast": "bfloat16" if bf16 else None,
            "state_bytes": {
                "params": nbytes(params),
                "ema_params": nbytes(ema or []),
                "opt_state": nbytes(opt_tensors),
            },
            "memory": {
                "kind": "torch.cuda.max_memory_allocated less what was allocated before",
                "total_bytes": self._peak(once, before),
            },
        }


# ----------------------------------------------------------------------------- orchestrator


class Worker(common.Worker):
    """`common.Worker` serving this script's JaxSide / TorchSide (optionally another python)."""

    def __init__(self, kind: str, *, python: str, threads: int, env: dict[str, str]):
        self.kind = kind
        self._log = tempfile.NamedTemporaryFile(
            "w+", prefix=f"bench-pretrained-{kind}-", suffix=".log", delete=False
        )
        cmd = [python, str(pathlib.Path(__file__).resolve()), "--worker", kind,
               "--threads", str(threads)]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            cwd=str(common.ROOT), env=env,
        )  # fmt: skip


def worker_env(suite: str, quick: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # One device is what is measured (the test suite's conftest simulates 8).
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform" not in f]
    if quick:
        flags.append("--xla_backend_optimization_level=0")  # compiles faster; logic only
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times are cold
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    if suite == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:  # both frameworks hold GPU memory at once
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env.update(extra or {})
    return env


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.suite, self.quick = args.suite, args.quick
        self.t0 = time.perf_counter()
        self.threads = args.threads if self.suite == "cpu" else 0
        if self.suite == "cpu" and not self.threads:
            self.threads = len(os.sched_getaffinity(0))
        self.torch_python = args.torch_python or sys.executable
        self.notes: list[str] = []
        self.errors: list[str] = []
        if self.quick:
            self.notes.append("--quick: tiny components, XLA:CPU at -O0; checks the logic only.")

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def use_torch(self) -> bool:
        if self.args.no_torch:
            return False
        if self.args.torch_python:
            probe = "import torch, diffusers, transformers"
            return (
                subprocess.run([self.torch_python, "-c", probe], capture_output=True).returncode
                == 0
            )
        return all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers"))

    def references(self) -> dict[str, dict[str, str]]:
        """Reference variants -> extra env (CPU: spinning and passive OpenMP waits)."""
        if self.suite == "cpu":
            return {"torch": {}, "torch_passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
        return {"torch": {}}

    def run(self) -> dict[str, Any]:
        load0 = os.getloadavg()
        plan = suite_plan(self.suite, self.quick)
        plan["quick"] = self.quick
        if self.args.windows:
            plan["windows"] = self.args.windows
        wanted = [k for k in self.args.cases.split(",") if k] if self.args.cases else list(KINDS)
        names = [s["name"] for s in cases_of(plan, "", "")]
        unknown = sorted(set(wanted) - set(KINDS) - set(names))
        if unknown:
            raise SystemExit(f"unknown --cases {unknown}; known kinds: {list(KINDS)}, "
                             f"cases: {names}")  # fmt: skip
        result: dict[str, Any] = {
            "benchmark": "pretrained",
            "suite": self.suite,
            "quick": self.quick,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "host": host_info(),
            "threads": self.threads or None,
            "load_avg_before": load0,
            "plan": {k: v for k, v in plan.items() if k != "quick"},
            "cases": [],
        }
        tmp = tempfile.mkdtemp(prefix="diffjax-bench-pretrained-")
        env = worker_env(self.suite, self.quick)
        jw = Worker("jax", python=sys.executable, threads=self.threads, env=env)
        refs: dict[str, Worker] = {}
        try:
            info = jw.call("info")
            result["jax"] = info
            if self.suite == "gpu" and info["backend"] != "gpu" and not self.quick:
                raise SystemExit(
                    f"--suite gpu needs a GPU, but JAX's backend is {info['backend']!r}. "
                    "Use --suite cpu, or --suite gpu --quick to check the script's logic."
                )
            if self.use_torch():
                for name, extra in self.references().items():
                    e = worker_env(self.suite, self.quick, extra)
                    refs[name] = Worker("torch", python=self.torch_python, threads=self.threads,
                                        env=e)  # fmt: skip
                result["torch"] = next(iter(refs.values())).call("info")
            else:
                result["torch"] = None
                self.notes.append("diffusers side skipped (--no-torch, or torch/diffusers absent).")
            pipe_dir, vae_dir = os.path.join(tmp, "sd-pipeline"), os.path.join(tmp, "sd-vae")
            self.log("writing random-weight diffusers directories")
            result["weights"] = jw.call(
                "write_pipeline", path=pipe_dir, vae_path=vae_dir, plan=plan
            )
            specs = [
                s for s in cases_of(plan, pipe_dir, vae_dir)
                if s["kind"] in wanted or s["name"] in wanted
            ]  # fmt: skip
            for spec in specs:
                if spec["kind"] not in TOGETHER_KINDS:
                    result["cases"].append(self.run_case(spec, plan, jw, refs, tmp))
            for kind in TOGETHER_KINDS:
                group = [s for s in specs if s["kind"] == kind]
                if not group:
                    continue
                # On a GPU each case gets a JAX worker of its own (its own device peak).
                own = [
                    Worker("jax", python=sys.executable, threads=self.threads, env=env)
                    for _ in group
                ] if self.suite == "gpu" else []  # fmt: skip
                try:
                    jws = own or [jw] * len(group)
                    result["cases"] += self.run_cases(group, plan, jws, refs, tmp)
                finally:
                    for w in own:
                        w.close()
        finally:
            for w in (jw, *refs.values()):
                w.close()
            shutil.rmtree(tmp, ignore_errors=True)
        result["load_avg_after"] = os.getloadavg()
        result["wall_s"] = time.perf_counter() - self.t0
        result["notes"] = self.notes
        result["errors"] = self.errors
        return result

    def run_case(self, spec, plan, jw: Worker, refs: dict[str, Worker], tmp: str):
        return self.run_cases([spec], plan, [jw], refs, tmp)[0]

    def run_cases(self, specs, plan, jws: list[Worker], refs: dict[str, Worker], tmp: str):
        """Cases measured together: each set up on its diffjax worker (`jws[i]`) and the
        references, then the timing windows of all of them alternate (`_windows`)."""
        outs, groups = [], []
        for spec, jw in zip(specs, jws, strict=True):
            name = spec["name"]
            out: dict[str, Any] = {"name": name, "kind": spec["kind"],
                                   "spec": {k: v for k, v in spec.items() if k != "dir"}}  # fmt: skip
            outs.append(out)
            workers = {"diffjax": jw}
            groups.append((name, workers, out))
            try:
                self.log(f"{name}: diffjax setup (load + compile)")
                out["diffjax"] = {"setup": jw.call("setup", spec=spec)}
                out["params"] = out["diffjax"]["setup"]["params"]
                for ref, w in refs.items() if spec["kind"] not in JAX_ONLY_KINDS else ():
                    self.log(f"{name}: {ref} setup")
                    try:
                        setup = w.call("setup", spec=spec)
                    except common.WorkerError as e:
                        self.errors.append(f"{name} {ref}: {e}")
                        out[ref] = {"error": str(e)[-2000:]}
                        continue
                    out[ref] = {"setup": setup}
                    if setup["params"] != out["params"]:
                        raise ValueError(
                            f"{name}: parameter counts differ: diffjax {out['params']:,}, "
                            f"{ref} {setup['params']:,}; the configs are not the same model."
                        )
                    workers[ref] = w
            except (common.WorkerError, ValueError) as e:
                self.errors.append(f"{name}: {e}")
                out["error"] = str(e)[-4000:]
        ready = [g for g in groups if "error" not in g[2]]
        try:
            self.log(f"{', '.join(g[0] for g in ready)}: timing windows")
            self._windows(ready, plan)
            for name, workers, out in ready:
                self._compare(name, workers, out, tmp)
                _ratio(out)
        except (common.WorkerError, ValueError) as e:
            for name, _, out in ready:
                self.errors.append(f"{name}: {e}")
                out["error"] = str(e)[-4000:]
        finally:
            for name, workers, _ in groups:
                for w in workers.values():
                    try:
                        w.call("drop", name=name)
                    except common.WorkerError:
                        pass
        return outs

    def _windows(self, cases: list[tuple[str, dict[str, Worker], Any]], plan) -> None:
        """Alternating timing windows of ~window_s each; median time per call.

        `cases`: (name, {side: worker}, out) of the cases measured together; every round
        runs one window of each side of each case. A reference variant whose calibration
        call is over 2x slower than the fastest variant's of its case is left out
        (spinning OpenMP threads on a loaded CPU; see run.py).
        """
        timed = {}  # (name, side) -> (worker, out, calls per window)
        for name, workers, out in cases:
            first = {k: w.call("window", name=name, reps=1) for k, w in workers.items()}
            refs = [k for k in workers if k != "diffjax"]
            if len(refs) > 1:
                best = min(refs, key=lambda k: first[k])
                for k in refs:
                    if first[k] > 2 * first[best]:
                        out[k]["dropped"] = (
                            f"calibration call {first[k]:.3f} s vs {first[best]:.3f} s for {best}"
                        )
                        self.notes.append(f"{name}: {k} dropped ({out[k]['dropped']})")
            for k, w in workers.items():
                if "dropped" not in out.get(k, {}):
                    reps = max(1, min(50, round(plan["window_s"] / max(first[k], 1e-4))))
                    timed[name, k] = (w, out, reps)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in timed}
        for _ in range(plan["windows"]):
            for (name, k), (w, _, reps) in timed.items():
                times[name, k].append(w.call("window", name=name, reps=reps))
        for (name, k), (_, out, reps) in timed.items():
            per_call = common.median(times[name, k]) / reps
            out[k].update(calls_per_window=reps, window_s=times[name, k], ms=1e3 * per_call)

    def _compare(self, name: str, workers: dict[str, Worker], out, tmp: str) -> None:
        """Max |diffjax - diffusers| of the outputs (same weights, same inputs)."""
        import numpy as np

        refs = [k for k in workers if k != "diffjax" and "ms" in out.get(k, {})]
        if not refs or out["spec"].get("tiled") or out["kind"] in ("train", "lora"):
            # tiled decodes: the two tile layouts and blends differ by design; train
            # steps: each side draws its own noise and timesteps (the losses are recorded).
            return
        a = np.load(workers["diffjax"].call("output", name=name, path=f"{tmp}/{name}_jax.npy"))
        b = np.load(workers[refs[0]].call("output", name=name, path=f"{tmp}/{name}_torch.npy"))
        if a.shape != b.shape:
            raise ValueError(
                f"{name}: output shapes differ: diffjax {a.shape}, diffusers {b.shape}"
            )
        diff = float(np.max(np.abs(a - b)))
        out["max_abs_diff"] = diff
        out["max_abs_output"] = float(np.max(np.abs(b)))
        if out["kind"] == "t2i":
            out["diff_note"] = "images in [0, 1]; diffjax's are uint8-rounded (1/255 = 0.0039)"


def _ratio(out: dict[str, Any]) -> None:
    """diffjax time / the fastest diffusers variant's time."""
    refs = [k for k in out if k.startswith("torch") and "ms" in out[k]]
    if refs and "ms" in out.get("diffjax", {}):
        best = min(refs, key=lambda k: out[k]["ms"])
        out["reference"] = best
        out["ratio"] = out["diffjax"]["ms"] / out[best]["ms"]


# ----------------------------------------------------------------------------- report


def _shape(c: dict[str, Any]) -> str:
    s = c["spec"]
    if c["kind"] == "unet":
        return f"{s['batch']}x{s['latent']}x{s['latent']}x4, ctx {s['context_len']}"
    if c["kind"] == "t2i":
        return f"{s['size']}px, {s['steps']} DDIM steps, cfg {s['guidance']}"
    if c["kind"] == "encode":
        return f"{s['batch']}x{s['size']}x{s['size']}x3 images"
    if c["kind"] == "train":
        return f"{s['batch']}x{s['latent']}x{s['latent']}x4, ctx {s['context_len']}"
    if c["kind"] == "lora":
        what = f"LoRA r{s['lora']['rank']}" if s["lora"] else "full"
        return f"{s['batch']}x{s['latent']}x{s['latent']}x4, ctx {s['context_len']}, {what}"
    if c["kind"] == "controlnet":
        shapes = (c.get("diffjax", {}).get("setup") or {}).get("batch_shapes", {})
        x = "x".join(str(d) for d in shapes.get("image", ["?"]))
        what = "labels" if s["model"] == "digits" else f"ctx {s['context_len']}"
        ctl = shapes.get("control")
        return f"{x}, {what}" + (f", control {'x'.join(map(str, ctl))}" if ctl else "")
    if c["kind"] == "finetune":
        h, w, ch = (c.get("diffjax", {}).get("setup") or {}).get("image_shape", ("?", "?", 3))
        return f"{s['batch']}x{h}x{w}x{ch} images + 77 ids, remat {s['remat']}"
    tile = (c.get("diffjax", {}).get("setup") or {}).get("tile")
    return f"{s['latent']}x{s['latent']} latents" + (f", tiles {tile}" if tile else ", full")


def report(result: dict[str, Any]) -> str:
    j, t = result.get("jax", {}), result.get("torch")
    lines = [
        f"suite={result['suite']}{' (quick)' if result['quick'] else ''}  "
        f"device={j.get('device_kind')} ({j.get('backend')})  jax {j.get('jax')}"
        + (f"  torch {t['torch']} diffusers {t['diffusers']}" if t else "  diffusers: not run"),
        f"host: {result['host']['cpu']}, {result['host']['cpus_allowed']} CPUs allowed"
        + (f"; {result['threads']} threads each" if result.get("threads") else ""),
        f"load average before {result['load_avg_before'][0]:.2f}, "
        f"after {result.get('load_avg_after', [float('nan')])[0]:.2f} (1-min)",
        "",
    ]
    rows = []
    for c in result["cases"]:
        dj = c.get("diffjax", {})
        if "ms" not in dj:
            rows.append([c["name"], _shape(c), c["spec"].get("dtype", ""), "error"] + [""] * 7)
            continue
        s = dj["setup"]
        ref = c.get("reference")
        r = c.get(ref, {}) if ref else {}
        compile_s = (
            f"{s.get('lower_s', 0.0) + s['compile_s']:.1f}"
            if "compile_s" in s
            else f"~{s['first_run_s'] - dj['ms'] / 1e3:.1f} (1st call)"
        )
        dj_mem = (s.get("memory") or {}).get("total_bytes")
        if dj_mem is not None and s["memory"].get("host_blend_bytes"):
            dj_mem_s = f"{_fmt_bytes(dj_mem)} (+{_fmt_bytes(s['memory']['host_blend_bytes'])} host)"
        else:
            dj_mem_s = _fmt_bytes(dj_mem) if c["kind"] != "t2i" else "-"
        ref_mem = ((r.get("setup") or {}).get("memory") or {}).get("total_bytes")
        rows.append([
            c["name"], _shape(c), c["spec"]["dtype"], f"{c['params'] / 1e6:.1f}M",
            f"{dj['ms']:.1f}", f"{r['ms']:.1f} ({ref})" if ref else "n/a",
            f"{c['ratio']:.2f}x" if "ratio" in c else "",
            compile_s,
            f"{s['load_s']:.1f} / {r['setup']['load_s']:.1f}" if ref else f"{s['load_s']:.1f} / -",
            f"{dj_mem_s} / {_fmt_bytes(ref_mem)}",
            f"{c['max_abs_diff']:.2g}" if "max_abs_diff" in c else "",
        ])  # fmt: skip
    lines.append(_table(
        ["case", "shape", "dtype", "params", "diffjax ms", "diffusers ms", "diffjax/diffusers",
         "diffjax compile s", "load s (dj / df)", "memory (dj / df)", "max |diff|"], rows,
    ))  # fmt: skip
    lines += [
        "",
        "memory: diffjax = XLA's compiled plan (args + outputs + temps); diffusers = "
        "torch.cuda.max_memory_allocated (n/a on a CPU). Both include the weights.",
    ]
    lines += _throughput(result)
    ft = [c for c in result["cases"] if c["kind"] == "finetune" and "ms" in c.get("diffjax", {})]
    if ft:
        rows = []
        for c in ft:
            st, m = c["diffjax"]["setup"], c["diffjax"]["setup"]["memory"]
            rows.append([
                c["name"], _shape(c), c["spec"]["dtype"],
                f"{c['spec']['batch'] / (c['diffjax']['ms'] / 1e3):.2f}",
                _fmt_bytes(m.get("argument_bytes")), _fmt_bytes(m.get("temp_bytes")),
                _fmt_bytes(m.get("total_bytes")), _fmt_bytes(st.get("device_peak_bytes")),
            ])  # fmt: skip
        lines += ["", "configs/sd_finetune.py step (frozen VAE + CLIP inside; trained params "
                  "and AdamW float32), XLA's plan per step; device peak: cumulative over the "
                  "worker (cases run in order)", ""]  # fmt: skip
        lines.append(_table(["case", "shape", "dtype", "img/s", "arguments", "temporaries",
                             "total", "device peak so far"], rows))  # fmt: skip
    lines += _lora_report(result)
    lines += _controlnet_report(result)
    vae = [c for c in result["cases"] if c["kind"] == "vae" and "ms" in c.get("diffjax", {})]
    if vae:
        rows = []
        for c in vae:
            m = c["diffjax"]["setup"]["memory"]
            if m.get("total_bytes") is None:
                continue
            rows.append([
                c["name"], _shape(c), _fmt_bytes(m["argument_bytes"]), _fmt_bytes(m["temp_bytes"]),
                _fmt_bytes(m["output_bytes"]), _fmt_bytes(m["host_blend_bytes"]),
                _fmt_bytes(m.get("device_peak_bytes_in_use_so_far")),
            ])  # fmt: skip
        lines += ["", "diffjax VAE decode, XLA's plan per compiled call (arguments = the "
                  "decoder's weights + the latent; tiled: one tile)", ""]  # fmt: skip
        lines.append(_table(["case", "shape", "arguments", "temporaries", "output",
                             "host blend", "device peak so far"], rows))  # fmt: skip
    for n in result.get("notes", []):
        lines.append(f"note: {n}")
    for err in result.get("errors", []):
        lines.append(f"ERROR: {err.splitlines()[0]}")
    return "\n".join(lines)


def _lora_report(result: dict[str, Any]) -> list[str]:
    """The lora cases: img/s and memory of the LoRA step against the full step, both sides."""
    cases = [c for c in result["cases"] if c["kind"] == "lora" and "ms" in c.get("diffjax", {})]
    if not cases:
        return []
    rows, rates = [], {}
    for c in cases:
        b, st, ref = c["spec"]["batch"], c["diffjax"]["setup"], c.get("reference")
        m, r = st["memory"], c.get(ref, {}) if ref else {}
        rs = r.get("setup") or {}
        rates[c["name"]] = (b * 1e3 / c["diffjax"]["ms"], b * 1e3 / r["ms"] if ref else None)
        rows.append([
            c["name"], _shape(c), c["spec"]["dtype"], f"{c['params'] / 1e6:.3g}M",
            f"{rates[c['name']][0]:.2f}", f"{rates[c['name']][1]:.2f} ({ref})" if ref else "n/a",
            f"{c['ratio']:.2f}x" if "ratio" in c else "",
            _fmt_bytes(m.get("argument_bytes")), _fmt_bytes(m.get("temp_bytes")),
            _fmt_bytes(m.get("total_bytes")),
            f"{_fmt_bytes(st['state_bytes']['opt_state'])} / "
            f"{_fmt_bytes((rs.get('state_bytes') or {}).get('opt_state'))}",
            f"{_fmt_bytes(st.get('device_peak_bytes'))} / "
            f"{_fmt_bytes((rs.get('memory') or {}).get('total_bytes'))}",
        ])  # fmt: skip
    lines = [
        "",
        "LoRA step vs the full fine-tune step (latent-fed sd_unet, the train case's step; "
        "diffjax vs diffusers(+peft)). XLA plan of the diffjax step: arguments = state + "
        "frozen base + batch; optimizer state = AdamW's moments (diffjax / diffusers); "
        "device peak: diffjax's worker (one per case) / torch.cuda.max_memory_allocated; the "
        "cases' timing windows alternate",
        "",
        _table(["case", "shape", "dtype", "trained params", "diffjax img/s", "diffusers img/s",
                "diffjax/diffusers time", "XLA arguments", "XLA temporaries", "XLA total",
                "optimizer state (dj / df)", "device peak (dj / df)"], rows),
    ]  # fmt: skip
    by = {c["name"]: c for c in cases}
    full = by.get("lora_full")
    for c in cases:
        if c is full or full is None:
            continue
        f, lo = full["diffjax"]["setup"], c["diffjax"]["setup"]
        dj = rates[c["name"]][0] / rates["lora_full"][0]
        total = lo["memory"].get("total_bytes"), f["memory"].get("total_bytes")
        mem = f"{total[0] / total[1]:.2f}x" if None not in total else "n/a"
        opt = lo["state_bytes"]["opt_state"] / f["state_bytes"]["opt_state"]
        line = (
            f"{c['name']} / lora_full: diffjax img/s {dj:.2f}x, XLA plan total {mem}, "
            f"optimizer state {opt:.4f}x"
        )
        if rates[c["name"]][1] and rates["lora_full"][1]:
            line += f"; diffusers img/s {rates[c['name']][1] / rates['lora_full'][1]:.2f}x"
        lines += ["", line]
    return lines


def _controlnet_report(result: dict[str, Any]) -> list[str]:
    """The controlnet cases: each model's ControlNet step against its full (and LoRA) step."""
    cases = [
        c for c in result["cases"] if c["kind"] == "controlnet" and "ms" in c.get("diffjax", {})
    ]
    if not cases:
        return []
    rows, by = [], {}
    for c in cases:
        s, st = c["spec"], c["diffjax"]["setup"]
        m, sb = st["memory"], st["state_bytes"]
        rate = s["batch"] * 1e3 / c["diffjax"]["ms"]
        by[s["model"], s["variant"]] = (c, rate)
        rows.append([
            c["name"], _shape(c), s["dtype"], f"{c['params']:,}", f"{st['model_params']:,}",
            f"{rate:.2f}", f"{st['flops'] / s['batch'] / 1e9:.3f}" if st.get("flops") else "n/a",
            _fmt_bytes(m.get("argument_bytes")), _fmt_bytes(m.get("temp_bytes")),
            _fmt_bytes(m.get("total_bytes")), _fmt_bytes(sb["opt_state"]),
            _fmt_bytes(sb["frozen"]), _fmt_bytes(st.get("device_peak_bytes")),
        ])  # fmt: skip
    lines = [
        "",
        "ControlNet step vs the base's full step (and a LoRA step), diffjax, same shapes and "
        "batch; timing windows alternate. XLA plan of the step: arguments = state + frozen "
        "base + batch; optimizer state = AdamW's moments; frozen = the base in frozen['base']",
        "",
        _table(["case", "shape", "dtype", "trained params", "base params", "img/s",
                "XLA GFLOP/img", "XLA arguments", "XLA temporaries", "XLA total", "optimizer state", "frozen",
                "device peak"], rows),
    ]  # fmt: skip
    for model in dict.fromkeys(c["spec"]["model"] for c in cases):
        full = by.get((model, "full"))
        if full is None:
            continue
        fs = full[0]["diffjax"]["setup"]
        for (mod, variant), (c, rate) in by.items():
            if mod != model or variant == "full":
                continue
            st = c["diffjax"]["setup"]
            tot = st["memory"].get("total_bytes"), fs["memory"].get("total_bytes")
            tmp = st["memory"].get("temp_bytes"), fs["memory"].get("temp_bytes")
            opt = st["state_bytes"]["opt_state"] / fs["state_bytes"]["opt_state"]
            flops = (
                f", XLA FLOPs {st['flops'] / fs['flops']:.2f}x"
                if st.get("flops") and fs.get("flops")
                else ""
            )
            line = f"{c['name']} / {full[0]['name']}: img/s {rate / full[1]:.2f}x{flops}, XLA plan total "
            line += f"{tot[0] / tot[1]:.2f}x" if None not in tot else "n/a"
            if None not in tmp:
                line += f" (temporaries {tmp[0] / tmp[1]:.2f}x)"
            line += f", optimizer state {opt:.3f}x, trained params {c['params'] / full[0]['params']:.3f}x"
            lines += ["", line]
        cn = by.get((model, "controlnet"))
        for (mod, variant), (c, rate) in by.items():
            if mod == model and variant.startswith("lora") and cn:
                line = f"{cn[0]['name']} / {c['name']}: img/s {cn[1] / rate:.2f}x"
                fc, fl = cn[0]["diffjax"]["setup"].get("flops"), c["diffjax"]["setup"].get("flops")
                lines += ["", line + (f", XLA FLOPs {fc / fl:.2f}x" if fc and fl else "")]
    return lines


def _throughput(result: dict[str, Any]) -> list[str]:
    """The encode and train cases as rates: img/s (encode), steps/s and img/s (train)."""
    rows = []
    for c in result["cases"]:
        if c["kind"] not in ("encode", "train") or "ms" not in c.get("diffjax", {}):
            continue
        b = c["spec"]["batch"]
        ref = c.get("reference")
        rates = []
        for side in ("diffjax", ref):
            ms = c.get(side, {}).get("ms") if side else None
            if c["kind"] == "encode":
                rates.append(f"{b * 1e3 / ms:.2f} img/s" if ms else "n/a")
            else:
                rates.append(f"{1e3 / ms:.2f} steps/s = {b * 1e3 / ms:.1f} img/s" if ms else "n/a")
        speed = f"{1 / c['ratio']:.2f}x" if "ratio" in c else ""
        rows.append([c["name"], _shape(c), c["spec"]["dtype"], *rates, speed])
    if not rows:
        return []
    return [
        "",
        "encode (VAE, the mode x scaling_factor) and latent train step (fwd + bwd + clip + "
        "AdamW + EMA) as rates",
        "",
        _table(["case", "shape", "dtype", "diffjax", "diffusers", "diffjax speed-up"], rows),
    ]


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny components: the logic in seconds")
    p.add_argument("--no-torch", action="store_true", help="skip the diffusers side")
    p.add_argument("--torch-python", default="",
                   help="interpreter for the diffusers side (default: this one)")  # fmt: skip
    p.add_argument("--cases", default="",
                   help=f"comma-separated subset of {KINDS}, or of case names (cn_sd_full, ...)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0,
                   help="cpu suite: CPUs for each framework (default: all allowed)")  # fmt: skip
    p.add_argument("--windows", type=int, default=0,
                   help="timing rounds (default: the suite's, 3; more on a loaded machine)")  # fmt: skip
    p.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    p.add_argument("--report", metavar="JSON", help="print the table of a saved result and exit")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        if args.threads:
            common.pin_threads(args.threads)
        side = (JaxSide if args.worker == "jax" else TorchSide)(args.threads)
        handlers = {k: getattr(side, k) for k in
                    ("info", "setup", "window", "output", "drop", "write_pipeline")
                    if hasattr(side, k)}  # fmt: skip
        common.serve(handlers)
        return {}
    if args.report:
        with open(args.report) as f:
            result = json.load(f)
        print(report(result))
        return result
    result = Bench(args).run()
    print(report(result))
    common.save_result(result, result_path(result, pathlib.Path(args.out), "pretrained_"))
    if result["errors"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
