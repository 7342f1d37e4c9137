"""Fine-tune a Stable Diffusion 1.x/2.x U-Net on an image folder with .txt captions.

    python launch/train.py --config=configs/sd_finetune.py --workdir=runs/sd_ft \
        --config.pretrained=SD_DIR --config.data.data_dir=IMAGES
    python launch/sample.py --workdir=runs/sd_ft --prompt="a photo of ..." --num_samples=4 \
        --out=runs/sd_ft/samples/a.npz
    python launch/export.py --workdir=runs/sd_ft --out=SD_FT_DIR --format=diffusers

`SD_DIR` is a diffusers pipeline directory (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/). The U-Net starts from its weights and architecture; the
schedule and prediction are its scheduler's; its VAE encodes each batch to latents and
its CLIP text encoder embeds the captions inside the train step, both frozen (outside
the optimizer, the EMA and the checkpoints; recorded by hash in WORKDIR/frozen.json and
checked on resume). `IMAGES/NAME.png` + `IMAGES/NAME.txt` (the caption); images are
resized and center-cropped to the U-Net's resolution (`data.image_size=0`: its
`sample_size`, 64 latents = 512 pixels for SD 1.5). 10% of captions are dropped to ""
(classifier-free guidance, SD's convention). The export is the whole pipeline with the
fine-tuned U-Net, loadable by diffusers' `StableDiffusionPipeline.from_pretrained`.

Memory: bfloat16 compute, full rematerialisation of the U-Net blocks, and frozen
components that never enter the optimizer. The trained params and AdamW moments stay
float32: at the learning rates of fine-tuning (1e-5) most updates are smaller than
bfloat16's resolution of a weight (2^-8 relative) and would be lost.

`arg` may be `quick` (a few steps at batch 8, for tests).
"""

import ml_collections
from ml_collections import config_dict

from diffjax.config import get_base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = get_base_config()
    c.pretrained = config_dict.placeholder(str)  # required: --config.pretrained=SD_DIR
    c.data.source = "folder"
    c.data.data_dir = config_dict.placeholder(str)  # required: images + .txt captions
    c.data.image_size = 0  # 0 = the pipeline U-Net's sample_size
    c.data.num_classes = 0
    c.data.random_flip = True
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.diffusion.cond_dropout = 0.1

    t = c.train
    t.num_steps = 10_000
    t.batch_size = 16
    t.learning_rate = 1e-5
    t.warmup_steps = 500
    t.weight_decay = 1e-2
    t.grad_clip = 1.0
    t.ema_decay = 0.9999
    t.log_every_steps = 50
    t.checkpoint_every_steps = 1000
    t.keep_checkpoints = 2
    t.sample_every_steps = 1000

    s = c.sample
    s.method = "ddim"
    s.num_steps = 50
    s.guidance = 7.5
    s.num_images = 4
    c.eval.num_samples = 0
    c.eval.every_steps = 0

    if arg == "quick":
        t.num_steps = 4
        t.batch_size = 8
        t.warmup_steps = 1
        t.log_every_steps = 2
        t.checkpoint_every_steps = 2
        t.sample_every_steps = 4
        s.num_steps = 2
        s.num_images = 2
        c.model.dtype = "float32"
    return c
