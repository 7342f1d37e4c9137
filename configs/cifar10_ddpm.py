"""The DDPM paper's CIFAR-10 setup (Ho et al. 2020): unconditional, 35.7M-param U-Net.

From tfds (prepared as ArrayRecord; nothing is downloaded at run time):

    tfds build cifar10 --file_format=array_record --data_dir=$DATA    # once, with network
    python launch/train.py --config=configs/cifar10_ddpm.py --workdir=runs/cifar10 \
        --config.data.data_dir=$DATA

From an image folder (class sub-folders or a flat folder of 32x32 PNGs):

    python launch/train.py --config=configs/cifar10_ddpm.py --workdir=runs/cifar10 \
        --config.data.source=folder --config.data.data_dir=/path/to/cifar10/train

`arg` may be `quick` (a tiny model for a few steps, for tests).
"""

import ml_collections

from diffjax.config import get_base_config
from diffjax.models import preset_kwargs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = get_base_config()
    c.data.source = "tfds"
    c.data.name = "cifar10"
    c.data.image_size = 32
    c.data.channels = 3
    c.data.num_classes = 0  # Unconditional, as in the paper (labels are ignored).
    c.data.random_flip = True

    c.model.name = "unet"
    c.model.kwargs = ml_collections.ConfigDict(preset_kwargs("ddpm_cifar10"))

    c.diffusion.schedule = "discrete_vp"
    c.diffusion.beta_schedule = "linear"
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.prediction = "epsilon"
    c.diffusion.loss_weighting = "eps_mse"
    c.diffusion.cond_dropout = 0.0

    c.train.num_steps = 800_000
    c.train.batch_size = 128
    c.train.learning_rate = 2e-4
    c.train.warmup_steps = 5000
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.9999
    c.train.log_every_steps = 100
    c.train.checkpoint_every_steps = 10_000
    c.train.sample_every_steps = 20_000

    c.sample.method = "dpmpp_2m"
    c.sample.num_steps = 20
    c.sample.num_images = 64
    c.eval.num_samples = 50_000
    c.eval.batch_size = 500

    if arg == "quick":
        c.model.kwargs.update(
            dict(
                base_channels=16,
                channel_mult=(1, 2),
                num_res_blocks=1,
                attention_resolutions=(16,),
                num_groups=8,
            )
        )
        c.train.num_steps = 4
        c.train.batch_size = 8
        c.train.warmup_steps = 1
        c.train.log_every_steps = 2
        c.train.checkpoint_every_steps = 2
        c.train.sample_every_steps = 0
        c.sample.num_steps = 3
        c.sample.num_images = 4
    elif arg:
        raise ValueError(f"configs/cifar10_ddpm.py takes no argument or 'quick', got {arg!r}.")
    return c
