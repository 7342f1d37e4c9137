"""Reading and writing the weight files of diffusers / Hugging Face directories.

A component directory (`unet/`, `vae/`, `text_encoder/`, `transformer/`) holds its
weights as one safetensors file (`diffusion_pytorch_model.safetensors` or
`model.safetensors`), or as shards listed by a `*.safetensors.index.json`
(`weight_map`: tensor name -> shard file). diffusers also writes variants
(`diffusion_pytorch_model.fp16.safetensors`). Tensors come back as float32 numpy
arrays whatever their stored dtype (float16, bfloat16, float32); integer tensors keep
their dtype. PyTorch pickles (`.bin`, `.ckpt`, `.pt`) are not read: they execute code
on load and need torch; the error says how to convert them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def _weight_files(directory: str, variant: str | None) -> list[str]:
    """The safetensors file(s) of a component directory, shards in index order."""
    names = os.listdir(directory)
    tail = f".{variant}.safetensors" if variant else ".safetensors"
    for stem in WEIGHT_NAMES:
        single = stem + tail
        if single in names:
            return [os.path.join(directory, single)]
        index = single + ".index.json"
        if index in names:
            return _shards(os.path.join(directory, index))
    candidates = sorted(
        n for n in names if n.endswith(".safetensors") and (variant is None) == (n.count(".") == 1)
    )
    if len(candidates) == 1:
        return [os.path.join(directory, candidates[0])]
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise FileNotFoundError(
            f"{directory} holds PyTorch pickles {pickles} but no safetensors weights. diffjax "
            "reads safetensors only (pickles run code and need torch): convert once with "
            "`Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`."
        )
    want = " or ".join(f"{s}{tail}" for s in WEIGHT_NAMES)
    raise FileNotFoundError(
        f"no weights in {directory}: expected {want} (or a sharded *.index.json)"
        + (f"; found {sorted(candidates)}" if candidates else "")
        + (f" (variant {variant!r})" if variant else "")
        + "."
    )


def _shards(index_path: str) -> list[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{index_path} is not a safetensors index (a JSON object with a 'weight_map'): {e}"
        ) from e
    folder = os.path.dirname(index_path)
    files = list(dict.fromkeys(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{index_path} lists shards that are not there: {missing}.")
    return [os.path.join(folder, f) for f in files]


def weight_files(path: str, variant: str | None = None) -> list[str]:
    """The safetensors file(s) behind `path` (a file, or a component directory)."""
    if os.path.isdir(path):
        return _weight_files(path, variant)
    if path.endswith(".index.json"):
        return _shards(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such weights file or directory: {path}")
    if path.endswith(PICKLE_SUFFIXES):
        raise ValueError(
            f"{path} is a PyTorch pickle; diffjax reads safetensors only. Convert it with "
            "safetensors.torch.save_file(torch.load(path), 'model.safetensors')."
        )
    return [path]


def weights_sha256(path: str, variant: str | None = None) -> str:
    """SHA-256 over the weight file(s) behind `path` (shards in index order): what a run
    records of a frozen pretrained component, to refuse a changed one on resume."""
    h = hashlib.sha256()
    for file in weight_files(path, variant):
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_tensors(path: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors behind `path` as numpy arrays, floating ones as float32.

    Args:
      path: a `.safetensors` file, a `*.safetensors.index.json`, or a component
        directory holding either.
      variant: a diffusers weight variant (e.g. 'fp16') to read instead of the default.

    Raises:
      FileNotFoundError / ValueError naming the file and what was expected.
    """
    out: dict[str, np.ndarray] = {}
    for file in weight_files(path, variant):
        try:
            with safe_open(file, framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key in out:
                        raise ValueError(f"tensor {key!r} appears in two shards ({file}).")
                    x = f.get_tensor(key)
                    if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16":
                        x = x.astype(np.float32)
                    out[key] = x
        except (OSError, SafetensorError) as e:
            raise ValueError(f"cannot read {file} as safetensors: {e}") from e
    return out


def write_tensors(tensors: Mapping[str, np.ndarray], path: str, metadata: dict | None = None):
    """Writes tensors (C-contiguous numpy copies) to one safetensors file.

    The file gets the permissions of any file the user creates (0666 less the umask):
    safetensors itself creates it readable by its owner only, which hides exported
    weights from the other users of a shared cluster.
    """
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    save_file(arrays, path, metadata={"format": "pt", **(metadata or {})})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_config(directory: str, name: str = "config.json") -> dict:
    """A component's JSON config, with a clear error when it is missing or malformed."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: a diffusers/HF component needs its {name}.")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}.")
    return cfg
