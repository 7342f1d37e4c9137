"""A LoRA on a Stable Diffusion 1.x/2.x U-Net (and optionally its text encoder).

    python launch/train.py --config=configs/sd_lora.py --workdir=runs/sd_lora \
        --config.pretrained=SD_DIR --config.data.data_dir=IMAGES [--config.lora.rank=4]
    python launch/export.py --workdir=runs/sd_lora --out=LORA_DIR --format=lora
    python launch/sample.py --pretrained=SD_DIR --lora=LORA_DIR --prompt="..." ...

As `configs/sd_finetune.py` (frozen VAE + CLIP in the step, `IMAGES` with .txt
captions), but only the LoRA of the U-Net's attention projections (`lora.targets`) is
trained, checkpointed and in the optimizer; the U-Net's weights are the step's frozen
base. `--format=lora` writes `pytorch_lora_weights.safetensors` that diffusers'
`load_lora_weights` reads; `--format=diffusers` the merged pipeline.
`lora.text_encoder=True` trains a LoRA on CLIP's attention too. `arg` may be `quick`.
"""

import os

import ml_collections

from diffjax.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "sd_finetune.py"), arg)
    c.lora.rank = 4
    c.lora.alpha = 4.0
    c.model.remat_policy = "none"  # the activations of a LoRA step are the base's forward
    t = c.train
    t.learning_rate = 1e-4
    t.weight_decay = 1e-2
    t.ema_decay = 0.0  # EMA = the params (diffusers' LoRA script keeps no EMA)
    return c
