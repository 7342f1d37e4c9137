"""DreamBooth on a Stable Diffusion 1.x/2.x pipeline: bind a subject to an identifier.

    python launch/train.py --config=configs/sd_dreambooth.py --workdir=runs/dog \
        --config.pretrained=SD_DIR --config.dreambooth.instance_dir=DOG_IMAGES \
        --config.dreambooth.instance_prompt="a photo of sks dog" \
        --config.dreambooth.class_prompt="a photo of a dog" [--config.lora.rank=4]
    python launch/sample.py --workdir=runs/dog --prompt="a photo of sks dog on the beach" ...

As `configs/sd_finetune.py` (frozen VAE + CLIP in the step, bfloat16 compute, remat),
trained on the instance images and, for prior preservation, on `num_class_images`
images the pipeline generates once for the class prompt (diffjax's DDIM, 50 steps,
guidance 7.5; cached in WORKDIR/class_images). The whole U-Net trains by default, as in
the paper (lr 5e-6, 400 steps); `--config.lora.rank=4` (lr 1e-4) trains a LoRA instead,
`--config.lora.text_encoder=True` one on CLIP too. `arg` may be `quick` (for tests).
"""

import os

import ml_collections
from ml_collections import config_dict

from diffjax.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "sd_finetune.py"), arg)
    c.data.source = "dreambooth"
    c.data.data_dir = ""
    db = c.dreambooth
    db.instance_dir = config_dict.placeholder(str)  # required
    db.instance_prompt = config_dict.placeholder(str)  # required, e.g. "a photo of sks dog"
    db.class_prompt = config_dict.placeholder(str)  # required, e.g. "a photo of a dog"
    db.num_class_images = 200
    db.prior_loss_weight = 1.0
    c.diffusion.cond_dropout = 0.0  # DreamBooth trains every caption as given
    t = c.train
    t.learning_rate = 5e-6
    t.warmup_steps = 0
    t.ema_decay = 0.0  # as the paper's script: sample the trained weights
    if arg != "quick":
        t.num_steps = 400
        t.checkpoint_every_steps = 200
    else:
        db.num_class_images = 8
    return c
