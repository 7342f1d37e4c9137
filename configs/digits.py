"""The embedded default: class-conditional DDPM on scikit-learn's 8x8 digits.

Nothing is downloaded: the 1,797 digits ship inside scikit-learn.

    python launch/train.py --config=configs/digits.py --workdir=runs/digits
    python launch/train.py --config=configs/digits.py:quick --workdir=/tmp/q   # CI-sized

`arg` may be `quick` (a few steps of a tiny model, for tests).
"""

import ml_collections

from diffjax.config import get_base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = get_base_config()
    c.data.source = "digits"
    c.data.image_size = 8
    c.data.channels = 1
    c.data.num_classes = 10

    c.model.name = "unet"
    c.model.kwargs = ml_collections.ConfigDict(
        dict(
            base_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(4,),
            mid_attention=True,
            num_heads=4,
            dropout=0.1,
            scale_shift_norm=True,
            num_groups=16,
            num_classes=10,
        )
    )

    c.diffusion.schedule = "discrete_vp"
    c.diffusion.beta_schedule = "linear"
    c.diffusion.prediction = "epsilon"
    c.diffusion.loss_weighting = "min_snr"  # Min-SNR-5: converges faster than plain eps-MSE.
    c.diffusion.cond_dropout = 0.1

    c.train.num_steps = 1300
    c.train.batch_size = 128
    c.train.learning_rate = 2e-3
    c.train.lr_schedule = "cosine"
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.999
    c.train.log_every_steps = 100
    c.train.checkpoint_every_steps = 250
    c.train.sample_every_steps = 0  # A grid at the end only.

    c.sample.method = "dpmpp_2m"
    c.sample.num_steps = 20
    c.sample.guidance = 1.5
    c.sample.num_images = 100

    c.eval.num_samples = 1000
    c.eval.batch_size = 500
    c.eval.digits_metrics = True
    c.eval.memorization = True  # nearest training digits, copy fraction (digits features)
    c.eval.cas = True  # classification accuracy score beside the real-data baseline

    if arg == "quick":
        c.model.kwargs.base_channels = 16
        c.model.kwargs.num_heads = 2
        c.model.kwargs.num_groups = 8
        c.train.num_steps = 8
        c.train.batch_size = 32
        c.train.warmup_steps = 2
        c.train.log_every_steps = 2
        c.train.checkpoint_every_steps = 4
        c.train.sample_every_steps = 0
        c.sample.num_steps = 5
        c.sample.num_images = 20
        c.eval.num_samples = 100
        c.eval.batch_size = 100
        # Tests evaluate tiny runs many times; the memorization search and CAS fits are
        # tested on their own (tests/test_memorization.py).
        c.eval.memorization = False
        c.eval.cas = False
    elif arg:
        raise ValueError(f"configs/digits.py takes no argument or 'quick', got {arg!r}.")
    return c
