"""Converts LPIPS (VGG16) weights for the autoencoder's perceptual loss to safetensors.

    python launch/convert_lpips.py --vgg=vgg16-397923af.pth --lin=vgg.pth \
        --out=lpips_vgg16.safetensors

then train with `--config.autoencoder.perceptual_weight=1.0
--config.autoencoder.perceptual_weights=lpips_vgg16.safetensors`.

`--vgg` is torchvision's ImageNet `vgg16` state dict (torchvision's release file
`vgg16-397923af.pth`, what `torchvision.models.vgg16(weights="IMAGENET1K_V1")`
downloads); only `features.N.weight/bias` are kept (the classifier is dropped). `--lin`
is the lpips package's `lpips/weights/v0.1/vgg.pth` (`lin0.model.1.weight` ...
`lin4.model.1.weight`). diffjax downloads neither. Both are torch pickles: this command
needs torch (`pip install torch`) and loads them with `weights_only=True`, so no pickled
code runs. The output holds the tensors under their torch names and layouts; training
reads it with `diffjax.models.lpips.load_params`.
"""

from __future__ import annotations

import os

from absl import flags

from diffjax.cli.common import run

_VGG = flags.DEFINE_string("vgg", None, "torchvision's vgg16 state dict (.pth).", required=True)
_LIN = flags.DEFINE_string("lin", None, "lpips' v0.1 vgg.pth (the lin layers).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output .safetensors path.", required=True)


def read_torch_state_dict(path: str) -> dict:
    """A .pth state dict as float32 numpy arrays (torch imported only here)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found.")
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"Reading {path!r} (a torch pickle) needs PyTorch, which only this converter "
            "uses: pip install torch"
        ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file.
        raise ValueError(f"Cannot read {path!r} as a PyTorch state dict: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(hasattr(v, "numpy") for v in state.values()):
        raise ValueError(f"{path!r} does not hold a flat state dict of tensors.")
    return {k: v.detach().cpu().float().numpy() for k, v in state.items()}


def lpips_tensors(vgg: dict, lin: dict) -> dict:
    """The tensors LPIPS needs from the two state dicts (checked; see `lpips.torch_to_flax`).

    Keeps `features.*` of `vgg` (dropping `classifier.*`) and `lin*` of `lin`; anything
    else is refused by name, so a vgg16_bn or a whole-model lpips file fails clearly.
    """
    from diffjax.models import lpips

    tensors = {k: v for k, v in vgg.items() if not k.startswith("classifier.")}
    tensors.update(lin)
    lpips.torch_to_flax(tensors)  # raises naming every missing/unexpected/mis-shaped key
    return tensors


def main(argv):
    del argv
    from diffjax.models import lpips

    tensors = lpips_tensors(read_torch_state_dict(_VGG.value), read_torch_state_dict(_LIN.value))
    lpips.save_params(_OUT.value, tensors)
    params = lpips.load_params(_OUT.value)  # validates the written file end to end
    widths = lpips.module_for(params).widths
    n = sum(v.size for v in tensors.values())
    print(f"Wrote {_OUT.value}: {len(tensors)} tensors, {n:,} values, VGG widths {widths}.")


def entry() -> None:
    """Console-script entry point (`diffjax-convert-lpips`)."""
    run(main)
