"""PyTorch state dicts <-> Flax params, for modules whose Flax tree mirrors the torch tree.

The Flax ports of pretrained components (`AutoencoderKL`, the SD U-Net, CLIP, T5) name
their modules after the PyTorch modules, so a Flax parameter path joined by "." is the
torch state-dict key with only the leaf renamed (Flax module names may contain dots):

    torch                                   Flax
    conv `weight` [O, I, kh, kw]            `kernel` [kh, kw, I, O]   transpose (2, 3, 1, 0)
    linear `weight` [O, I]                  `kernel` [I, O]           transpose
    norm `weight` [C]                       `scale` [C]
    embedding `weight` [V, D]               `embedding` [V, D]
    `bias`                                  `bias`

`torch_to_flax` walks the Flax model's abstract params (from `jax.eval_shape` of its
`init`), so every parameter the model needs is looked up, and every tensor of the file
is accounted for; one error names every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


class ConversionError(ValueError):
    """A weights file does not fit the model: names the missing/unexpected/mis-shaped keys."""


def torch_key(path: tuple[str, ...]) -> str:
    """The torch state-dict key of a Flax param path."""
    return ".".join(path[:-1] + (_LEAF_TO_TORCH.get(path[-1], path[-1]),))


def to_flax_layout(leaf: str, x: np.ndarray, want_ndim: int) -> np.ndarray:
    """A torch tensor in the layout of the Flax leaf `leaf` of rank `want_ndim`."""
    if leaf != "kernel":
        return x
    if x.ndim == 4 and want_ndim == 4:
        return x.transpose(2, 3, 1, 0)
    if x.ndim == 4 and want_ndim == 2 and x.shape[2:] == (1, 1):
        return x[:, :, 0, 0].T  # a 1x1 conv stored where the model has a linear layer
    if x.ndim == 2 and want_ndim == 2:
        return x.T
    return x  # rank mismatch: reported as mis-shaped by the caller


def to_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
    """The inverse of `to_flax_layout` (1x1 convs stay linear)."""
    if leaf != "kernel":
        return x
    if x.ndim == 4:
        return x.transpose(3, 2, 0, 1)
    if x.ndim == 2:
        return x.T
    return x


def fmt_keys(keys: Iterable[str], limit: int = 20) -> str:
    """Sorted keys, comma-separated, the first `limit` of them."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_fit(
    headline: str,
    missing: Iterable[str],
    unexpected: Iterable[str],
    misshaped: Iterable[str],
    hint: str = "",
) -> None:
    """Raises one `ConversionError` naming every missing, unexpected and mis-shaped key."""
    missing, unexpected, misshaped = list(missing), list(unexpected), list(misshaped)
    if not (missing or unexpected or misshaped):
        return
    parts = [headline]
    if missing:
        parts.append(f"missing {len(missing)}: {fmt_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {fmt_keys(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped {len(misshaped)}: {fmt_keys(misshaped, 10)}")
    if hint:
        parts.append(hint)
    raise ConversionError("; ".join(parts) + ".")


def torch_to_flax(
    tensors: Mapping[str, np.ndarray],
    abstract_params: Any,
    *,
    what: str,
    rename: Callable[[str], str] | None = None,
    prefixes: tuple[str, ...] = ("",),
    ignore: Callable[[str], bool] | None = None,
    dtype: Any = np.float32,
) -> dict:
    """Torch tensors (by state-dict key) -> a Flax params tree shaped like `abstract_params`.

    Args:
      tensors: state-dict key -> numpy array (`safetensors_io.read_tensors`).
      abstract_params: the model's params tree of `jax.ShapeDtypeStruct`s (or arrays).
      what: the component's name for error messages ('unet', 'vae', ...).
      rename: maps each file key to the key the model expects (old names, prefixes).
      prefixes: key prefixes the file may carry; the first under which the model's keys
        are found is stripped (e.g. ('text_model.', '') for CLIP).
      ignore: file keys that are known and deliberately not loaded (e.g. buffers).
      dtype: dtype of the returned arrays.

    Returns:
      A nested dict of numpy arrays with the tree structure of `abstract_params`.

    Raises:
      ConversionError: naming every missing, unexpected and mis-shaped key.
    """
    if rename is not None:
        renamed: dict[str, np.ndarray] = {}
        for k, v in tensors.items():
            new = rename(k)
            if new in renamed:
                raise ConversionError(f"{what}: two tensors map to the key {new!r}.")
            renamed[new] = v
        tensors = renamed
    flat = traverse_util.flatten_dict(_unbox(abstract_params))
    wanted = {torch_key(p): p for p in flat}
    prefix = _pick_prefix(tensors, wanted, prefixes)
    by_key = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    others = {k for k in tensors if not k.startswith(prefix)}

    out, missing, misshaped = {}, [], []
    for key, path in wanted.items():
        if key not in by_key:
            missing.append(key)
            continue
        want = tuple(flat[path].shape)
        x = to_flax_layout(path[-1], np.asarray(by_key[key]), len(want))
        if tuple(x.shape) != want:
            misshaped.append(f"{key}: file {tuple(by_key[key].shape)}, model wants {want}")
            continue
        out[path] = np.asarray(x, dtype)
    unexpected = (set(by_key) - set(wanted)) | others
    if ignore is not None:
        unexpected = {k for k in unexpected if not ignore(k)}
    check_fit(
        f"{what}: the weights do not fit the model",
        missing,
        unexpected,
        misshaped,
        hint="check that the directory and its config.json belong together (a different "
        "model size or version gives this)",
    )
    return traverse_util.unflatten_dict(out)


def _pick_prefix(
    tensors: Mapping[str, np.ndarray], wanted: Mapping[str, Any], prefixes: tuple[str, ...]
) -> str:
    best, best_hits = prefixes[0], -1
    for p in prefixes:
        hits = sum(1 for k in tensors if k.startswith(p) and k[len(p) :] in wanted)
        if hits > best_hits:
            best, best_hits = p, hits
    return best


def flax_to_torch(params: Any, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params (mirror naming) -> torch state-dict tensors, float32 numpy."""
    flat = traverse_util.flatten_dict(_unbox(params))
    return {
        prefix + torch_key(path): np.ascontiguousarray(
            to_torch_layout(path[-1], np.asarray(jax.device_get(x), np.float32))
        )
        for path, x in flat.items()
    }


def _unbox(tree: Any) -> Any:
    """Drops Flax partitioning boxes and a top-level {'params': ...} wrapper."""
    tree = nn.meta.unbox(tree)
    if isinstance(tree, Mapping) and set(tree) == {"params"}:
        tree = tree["params"]
    return tree
