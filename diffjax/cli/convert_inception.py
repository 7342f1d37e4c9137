"""Converts pytorch-fid's Inception weights (.pth) to safetensors for diffjax.

    python launch/convert_inception.py \
        --pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.safetensors

The .pth is pytorch-fid's release file
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
(the TF 2015-12-05 Inception used by the original FID code, ported to PyTorch). Its
SHA-256 starts with 6726825d (the file-name suffix, which torch.hub checks); the full
digest recorded in `inception.FID_WEIGHTS_SHA256` comes from a third-party record of the
same file, not from pytorch-fid itself. A file whose digest does not start with
6726825d is refused unless --allow_unknown_checksum is given. This is
the only place diffjax reads a torch file: it needs torch (`pip install
'diffjax[torch]'`) and loads with `weights_only=True`, so no pickled code runs. The
output holds flat Flax names (`params/Mixed_5b/branch1x1/conv/kernel`, ...) with conv
kernels in HWIO; load it with `diffjax.eval.inception.load_params`.
"""

import hashlib
import os
import sys

from absl import flags

from diffjax.cli.common import run

_PTH = flags.DEFINE_string(
    "pth", None, "pytorch-fid's pt_inception-2015-12-05-*.pth.", required=True
)
_OUT = flags.DEFINE_string("out", None, "Output .safetensors path.", required=True)
_ALLOW_OTHER = flags.DEFINE_bool(
    "allow_unknown_checksum",
    False,
    "Convert even if the file's SHA-256 is not the standard file's (e.g. a re-saved copy).",
)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_torch_state_dict(path: str) -> dict:
    """The .pth state dict as numpy arrays (torch imported only here)."""
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            "Converting a .pth needs PyTorch, an optional extra: pip install 'diffjax[torch]' "
            "(or pip install torch). Only this converter uses it."
        ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — torch raises many types for a bad file.
        raise ValueError(f"Cannot read {path!r} as a PyTorch state dict: {e}") from e
    if not isinstance(state, dict) or not all(hasattr(v, "numpy") for v in state.values()):
        raise ValueError(f"{path!r} does not hold a flat state dict of tensors.")
    return {k: v.detach().cpu().float().numpy() for k, v in state.items()}


def main(argv):
    del argv
    from diffjax.eval import inception

    pth, out = _PTH.value, _OUT.value
    if not os.path.isfile(pth):
        raise FileNotFoundError(
            f"{pth!r} not found. Download pytorch-fid's weights from {inception.FID_WEIGHTS_URL}."
        )
    digest = sha256_of(pth)
    print(f"{pth}: sha256 {digest}")
    if not digest.startswith(inception.FID_WEIGHTS_SHA256_PREFIX):
        message = (
            f"{pth!r} is not pytorch-fid's standard file: its SHA-256 does not start with "
            f"{inception.FID_WEIGHTS_SHA256_PREFIX} (the suffix of the release file name), so "
            "FIDs computed with it are not comparable to published ones."
        )
        if not _ALLOW_OTHER.value:
            raise ValueError(message + " Pass --allow_unknown_checksum to convert it anyway.")
        print("warning: " + message, file=sys.stderr)
    elif digest != inception.FID_WEIGHTS_SHA256:
        print(
            f"warning: SHA-256 starts like the standard file's but differs from the recorded "
            f"{inception.FID_WEIGHTS_SHA256}.",
            file=sys.stderr,
        )

    flat = inception.torch_to_flax(read_torch_state_dict(pth))
    inception.save_params(out, flat)
    variables = inception.load_params(out)  # Validates the written file end to end.
    n = sum(v.size for v in flat.values())
    head = "with" if inception.has_logits(variables) else "without"
    print(f"Wrote {out}: {len(flat)} tensors, {n:,} values, {head} the 1008-way fc head.")


def entry() -> None:
    """Console-script entry point (`diffjax-convert-inception`)."""
    run(main)
