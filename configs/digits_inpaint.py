"""An inpainting model of the embedded 8x8 digits: class-conditional, trained on random masks.

    python launch/train.py --config=configs/digits_inpaint.py --workdir=runs/digits_inpaint
    python launch/sample.py --workdir=runs/digits_inpaint --init_images=IMGS.npz \
        --mask=MASKS.npz --num_samples=100 --out=/tmp/inpainted.npz

configs/digits.py's U-Net, diffusion and sampler, with `inpainting.enabled`: every
training digit gets a random mask (a box, brush strokes, outpainting borders, or all of
it; `diffjax.data.masks`) and the network sees `[x_t, mask, masked digit]` (1 + 1 + 1
input channels, 1 output). Masks in `MASKS.npz` are uint8 [N, 8, 8], 255 = regenerate;
without `--mask` the model draws whole digits (the `full` masks). Label dropout (CFG)
keeps the mask and masked digit. On 8x8 images the smallest box or border is one pixel
(`min_size` 1/8) and strokes are one or two pixels wide. `arg` may be `quick` (a few
steps of a tiny model, for tests).
"""

import os

import ml_collections

from diffjax.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "digits.py"), arg)
    p = c.inpainting
    p.enabled = True
    p.masks = "box:0.35,brush:0.3,outpaint:0.15,full:0.2"
    p.min_size = 0.125  # one pixel of eight
    p.max_size = 0.625
    p.max_strokes = 3
    p.brush_width = 0.25
    c.model.kwargs.out_channels = 1  # the input has 3 channels: x_t, mask, masked digit
    if arg != "quick":
        c.train.num_steps = 2000  # a harder task than plain digits: a few more steps
    return c
