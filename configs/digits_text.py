"""Digits through the text path: captions such as "a handwritten seven".

A small word-level text encoder is trained with the U-Net (cross-attention); caption
dropout gives classifier-free guidance. Sampling asks for "a handwritten {digit}".

    python launch/train.py --config=configs/digits_text.py --workdir=runs/digits_text
    python launch/evaluate.py --workdir=runs/digits_text

`arg` may be `quick` (a few steps of a tiny model, for tests).
"""

import os

import ml_collections

from diffjax.config import load_config_file
from diffjax.models import preset_kwargs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "digits.py"), arg)
    c.data.source = "digits_text"
    c.data.caption_template = "a handwritten {name}"
    c.data.max_text_len = 4
    # Labels stay in the data (for evaluation and the sample grid); the model sees text.
    c.data.num_classes = 10
    c.model.kwargs = ml_collections.ConfigDict(preset_kwargs("unet_digits_text"))
    if arg == "quick":
        c.model.kwargs.update(
            dict(base_channels=16, num_res_blocks=1, num_heads=2, context_dim=32, text_depth=1)
        )
    return c
