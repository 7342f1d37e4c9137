"""ADM ImageNet 64x64, class-conditional (Dhariwal & Nichol 2021): ~296M-param U-Net.

Cosine schedule, learned sigma (hybrid loss), scale-shift norm, BigGAN up/down blocks.
ImageNet needs a manual download for tfds (see docs/README: `tfds build imagenet2012
--manual_dir=... --file_format=array_record`); images are resized and center-cropped
to 64x64 on the fly. Or point an image folder (one sub-folder per class) at it.

    python launch/train.py --config=configs/imagenet64_adm.py --workdir=runs/in64 \
        --config.data.data_dir=$DATA --config.mesh.fsdp=8
"""

import ml_collections

from diffjax.config import get_base_config
from diffjax.models import preset_kwargs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/imagenet64_adm.py takes no argument, got {arg!r}.")
    c = get_base_config()
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.image_size = 64
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.random_flip = True
    c.data.worker_count = 8

    c.model.name = "unet"
    c.model.kwargs = ml_collections.ConfigDict(preset_kwargs("adm_imagenet64"))
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "dots_saveable"

    c.diffusion.schedule = "discrete_vp"
    c.diffusion.beta_schedule = "cosine"
    c.diffusion.prediction = "epsilon"
    c.diffusion.loss_weighting = "eps_mse"
    c.diffusion.cond_dropout = 0.1

    c.train.num_steps = 540_000
    c.train.batch_size = 2048
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 1000
    c.train.ema_decay = 0.9999
    c.train.log_every_steps = 100
    c.train.checkpoint_every_steps = 5000
    c.train.sample_every_steps = 20_000

    c.sample.method = "dpmpp_2m"
    c.sample.num_steps = 25
    c.sample.guidance = 1.5
    c.eval.num_samples = 50_000
    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c
