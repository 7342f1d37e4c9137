"""A ControlNet on a Stable Diffusion 1.x/2.x pipeline (diffusers' train_controlnet.py).

    python launch/train.py --config=configs/sd_controlnet.py --workdir=runs/sd_cn \
        --config.pretrained=SD_DIR --config.data.data_dir=IMAGES \
        [--config.controlnet.control=edges|sobel|tile|mask|given]
    python launch/sample.py --workdir=runs/sd_cn --control_image=CTRL.npz \
        --prompt="a photo of ..." --num_samples=4 --out=runs/sd_cn/samples/a.npz
    python launch/export.py --workdir=runs/sd_cn --out=CN_DIR --format=diffusers
    python launch/sample.py --pretrained=SD_DIR --controlnet=CN_DIR --control_image=CTRL.npz \
        --prompt="a photo of ..." --out=/tmp/cn.npz

As `configs/sd_finetune.py` (`SD_DIR` a diffusers pipeline directory; its VAE encodes
each batch and its CLIP text encoder embeds the captions inside the train step, both
frozen; `IMAGES/NAME.png` + `IMAGES/NAME.txt` captions), but the pipeline's U-Net is
frozen too (recorded by hash in WORKDIR/frozen.json): only the ControlNet (diffusers'
`ControlNetModel`: a copy of the U-Net's encoder half, joined to it through zero convs,
see `diffjax.models.sd_controlnet`) is trained, checkpointed and in the optimizer. It
starts as diffusers' `ControlNetModel.from_unet`: the U-Net's conv_in, time embedding,
down and mid blocks copied, every zero conv zero, so the first step samples exactly
what the pipeline does.

Each image's control is computed per record (`controlnet.control`: Canny edges by
default, or sobel, tile, mask) at the output image's resolution; with `given` the
controls are files `ROOT/control/NAME.png` beside `ROOT/images/NAME.png` (captions in
`ROOT/images/NAME.txt`; `data.data_dir=ROOT`). Controls are RGB
(`conditioning_channels=3`, what SD ControlNets take); the condition embedding
(16, 32, 96, 256) downsamples them by the VAE's factor, 8.

`CTRL.npz` holds `images` uint8 [N, H, W, 3] at the output image size (or pass a PNG);
`--control_source=IMGS.npz` applies the run's transform to ordinary images instead.
`--format=diffusers` writes `CN_DIR` as a `ControlNetModel` directory (config.json +
diffusion_pytorch_model.safetensors) that diffusers' `ControlNetModel.from_pretrained`
and `StableDiffusionControlNetPipeline` load, beside the base it was trained for.

Learning rate 1e-5 and no EMA, as diffusers' script; bfloat16 compute and full
rematerialisation as `sd_finetune` (params and AdamW moments stay float32). `arg` may be
`quick` (a few steps at batch 8, float32, for tests).
"""

import os

import ml_collections

from diffjax.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "sd_finetune.py"), arg)
    n = c.controlnet
    n.control = "edges"
    n.conditioning_channels = 3  # SD ControlNets take RGB controls (edges replicated)
    n.embedding_channels = ()  # () = diffusers' (16, 32, 96, 256), cut to the VAE's factor
    t = c.train
    t.learning_rate = 1e-5
    t.weight_decay = 1e-2
    t.ema_decay = 0.0  # EMA = the params (diffusers' ControlNet script keeps no EMA)
    return c
