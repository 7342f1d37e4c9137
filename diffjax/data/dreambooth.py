"""DreamBooth data (Ruiz et al. 2023): instance images with an identifier prompt, and the
base model's own class images for prior preservation.

`data.source='dreambooth'` reads `dreambooth.instance_dir` (a folder of images of the
subject; their own .txt files are ignored: every one is captioned
`dreambooth.instance_prompt`, e.g. "a photo of sks dog") and, with
`dreambooth.prior_loss_weight > 0`, the class images the base generated once
(`CLASS_FILE` in `dreambooth.class_dir`: `images` uint8 [N, H, W, C] and `captions`
[N], written by `diffjax.generate.class_images`). Records alternate instance, class,
instance, ... (the shorter set cycles), so a shuffled batch holds both about equally
(without prior preservation the instances cycle to `num_class_images` records),
and carry `loss_weight`: 1 for instance records, `prior_loss_weight` for class ones; the
train step's loss is the weighted mean, DreamBooth's L_instance + w * L_prior up to a
factor 2.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from diffjax.data.folder import FolderSource
from diffjax.data.tokens import tokenize
from diffjax.images import uint8_to_float

CLASS_FILE = "class_images.npz"


class DreamBoothSource:
    """Instance records (+ class records for prior preservation); see the module docstring."""

    def __init__(
        self,
        instance_dir: str,
        instance_prompt: str,
        *,
        image_size: int,
        channels: int,
        max_text_len: int,
        tokenizer: str = "",
        class_dir: str = "",
        prior_loss_weight: float = 0.0,
        min_length: int = 0,
    ):
        instance_prompt = instance_prompt or ""
        if not instance_prompt.strip():
            raise ValueError(
                "dreambooth.instance_prompt is empty; give the prompt that binds the subject "
                "to an identifier, e.g. 'a photo of sks dog'."
            )
        self._instances = FolderSource(instance_dir, image_size=image_size, channels=channels)
        if self._instances.class_names:
            raise ValueError(
                f"dreambooth.instance_dir={instance_dir} has sub-folders; put the instance "
                "images directly in it."
            )
        ids, mask = tokenize([instance_prompt], max_text_len, tokenizer)
        self._instance_ids, self._instance_mask = ids[0], mask[0]
        self._weight = float(prior_loss_weight)
        self._min_length = int(min_length)
        self._class_images = None
        if self._weight > 0:
            path = os.path.join(class_dir, CLASS_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: the class images of prior preservation are generated "
                    "by the base when training starts (launch/train.py); or set "
                    "dreambooth.prior_loss_weight=0."
                )
            with np.load(path) as f:
                images, captions = f["images"], [str(c) for c in f["captions"]]
            if images.shape[1:] != (image_size, image_size, channels):
                raise ValueError(
                    f"{path} holds images of shape {images.shape[1:]}, the model trains on "
                    f"{(image_size, image_size, channels)}; delete {class_dir} to regenerate."
                )
            self._class_images = images
            self._class_ids, self._class_mask = tokenize(captions, max_text_len, tokenizer)

    def __len__(self) -> int:
        n = len(self._instances)
        if self._class_images is None:  # the instances, cycled to min_length
            return max(n, self._min_length)
        return 2 * max(n, len(self._class_images))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._class_images is None or index % 2 == 0:
            i = (index if self._class_images is None else index // 2) % len(self._instances)
            return {
                "image": self._instances[i]["image"],
                "context": self._instance_ids,
                "context_mask": self._instance_mask,
                "loss_weight": np.float32(1.0),
            }
        j = (index // 2) % len(self._class_images)
        return {
            "image": uint8_to_float(self._class_images[j]),
            "context": self._class_ids[j],
            "context_mask": self._class_mask[j],
            "loss_weight": np.float32(self._weight),
        }

    def __repr__(self) -> str:
        n_class = 0 if self._class_images is None else len(self._class_images)
        return (
            f"DreamBoothSource(instances={len(self._instances)}, class_images={n_class}, "
            f"prior_loss_weight={self._weight})"
        )


def make_dreambooth_source(
    *,
    image_size: int,
    channels: int,
    max_text_len: int = 16,
    tokenizer: str = "",
    dreambooth: dict[str, Any] | None = None,
    **unused: Any,
) -> DreamBoothSource:
    """`data.source='dreambooth'` from `config.data` fields plus `dreambooth` (the
    config's `dreambooth` section, added by the caller)."""
    del unused
    db = dreambooth or {}
    if not db.get("instance_dir"):
        raise ValueError("data.source='dreambooth' needs dreambooth.instance_dir=<image folder>.")
    return DreamBoothSource(
        db["instance_dir"],
        db.get("instance_prompt", ""),
        image_size=image_size,
        channels=channels,
        max_text_len=max_text_len,
        tokenizer=tokenizer,
        class_dir=db.get("class_dir", ""),
        prior_loss_weight=float(db.get("prior_loss_weight", 0.0)),
        # Without prior images the few instances are cycled as far as the class images
        # would have reached (DreamBooth's epoch), so any batch size fits.
        min_length=int(db.get("num_class_images", 0)),
    )
