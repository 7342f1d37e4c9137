"""LoRA (Hu et al. 2021) as a parameter-tree delta: W' = W + (alpha / r) * A @ B.

A LoRA is a dict over the *target modules* of a model, named by the module's param path
joined by "." (for the mirror-named ports of pretrained components, `sd_unet` and
`clip_text`, that is the PyTorch module name, e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`):

    {name: {"A": [*in_shape, r], "B": [r, *out_shape]}}

with the kernel's input axes first and output axes last: a Dense kernel [in, out], a
Conv kernel [kh, kw, in | out], a multi-head projection [D | heads, head_dim] or its
output [heads, head_dim | D] (`input_axes`). The delta is `tensordot(A, B, 1)`; for a
conv that is a conv with A followed by a 1x1 conv with B (peft's conv LoRA), which is
linear in the weights and so exactly a conv with the merged kernel.

`merge(params, lora, scale)` is the one way a LoRA reaches a model: the train step merges
inside the compiled step (gradients reach A and B through the merge; the base is the
step's `frozen` argument and never changes), sampling and export merge once. B starts at
zero, so a fresh LoRA leaves the base's outputs bit for bit unchanged.

Torch layout (what diffusers/peft files hold): `lora_A.weight` = down [r, in] (conv:
[r, in, kh, kw]), `lora_B.weight` = up [out, r] (conv: [out, r, 1, 1]); `to_torch` and
`from_torch` convert, folding a scale into B so any loader reproduces the delta.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Default targets per model: the attention projections (q, k, v, out).
DEFAULT_TARGETS = {
    "sd_unet": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "clip_text": r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
    "unet": r"\.(attn|cross_attn)\.(query|key|value|out)$",
    "dit": r"\.(attn|cross_attn)\.(query|key|value|out)$",
}
# Last name of a 3-D (multi-head) kernel whose input is the heads: [heads, head_dim, D].
_HEADS_IN = ("out", "o", "out_proj", "proj")


class LoRAError(ValueError):
    """A LoRA that does not fit its model: names the offending modules."""


def _unbox(tree: Any) -> Any:
    import flax.linen as nn

    return nn.meta.unbox(tree)


def kernel_modules(params: Any) -> dict[str, tuple[int, ...]]:
    """{module name: kernel shape} of every Dense/DenseGeneral/Conv kernel in a tree."""
    flat = traverse_util.flatten_dict(_unbox(params))
    return {
        ".".join(path[:-1]): tuple(x.shape)
        for path, x in flat.items()
        if path[-1] == "kernel" and len(x.shape) in (2, 3, 4)
    }


def input_axes(name: str, shape: tuple[int, ...]) -> int:
    """How many leading axes of a kernel are its input: Dense 1, Conv 3 (kh, kw, in),
    a multi-head projection 1 ([D, heads, head_dim]), its output projection 2."""
    if len(shape) == 4:
        return 3
    if len(shape) == 3:
        return 2 if name.rsplit(".", 1)[-1] in _HEADS_IN else 1
    return 1


def select_targets(params: Any, pattern: str) -> list[str]:
    """The kernel modules whose name matches the regex `pattern` (`re.search`), sorted.

    Raises:
      LoRAError: an invalid pattern, or one that matches nothing (with example names).
    """
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise LoRAError(f"lora.targets={pattern!r} is not a valid regular expression: {e}") from e
    modules = kernel_modules(params)
    found = sorted(m for m in modules if regex.search(m))
    if not found:
        examples = ", ".join(sorted(modules)[:12])
        raise LoRAError(
            f"lora.targets={pattern!r} matches no Dense/Conv module of this model; its modules "
            f"are named like: {examples} ... (set lora.targets to a regex over these names)."
        )
    return found


def init_lora(key: jax.Array, params: Any, targets: list[str], rank: int) -> dict[str, Any]:
    """A fresh LoRA: A ~ N(0, 1/fan_in) (fan_in: the input axes' size), B = 0 (so the
    delta is 0).

    Raises:
      LoRAError: a non-positive rank, or a target that is not a kernel module.
    """
    if rank < 1:
        raise LoRAError(f"lora.rank must be >= 1, got {rank}.")
    modules = kernel_modules(params)
    missing = [t for t in targets if t not in modules]
    if missing:
        raise LoRAError(f"LoRA targets {missing[:5]} are not Dense/Conv modules of this model.")
    out = {}
    for i, name in enumerate(sorted(targets)):
        shape = modules[name]
        n_in = input_axes(name, shape)
        fan_in = int(np.prod(shape[:n_in]))
        k = jax.random.fold_in(key, i)
        a = jax.random.normal(k, (*shape[:n_in], rank), jnp.float32) / np.sqrt(fan_in)
        out[name] = {"A": a, "B": jnp.zeros((rank, *shape[n_in:]), jnp.float32)}
    return out


def delta(entry: Mapping[str, Any]) -> jax.Array:
    """The kernel delta A @ B of one module, in the kernel's shape."""
    return jnp.tensordot(entry["A"], entry["B"], axes=1)


def merge(params: Any, lora: Mapping[str, Any], scale: float | jax.Array = 1.0) -> Any:
    """`params` with `scale * A @ B` added to every LoRA module's kernel.

    Works on numpy or jax trees, inside or outside `jit`; the kernels keep their dtype.

    Raises:
      LoRAError: a LoRA module the params do not have, or whose shape does not fit.
    """
    if not lora:
        return params
    flat = traverse_util.flatten_dict(_unbox(params))
    index = {".".join(p[:-1]): p for p in flat if p[-1] == "kernel"}
    unknown = sorted(set(lora) - set(index))
    if unknown:
        raise LoRAError(
            f"LoRA modules {unknown[:8]}{' ...' if len(unknown) > 8 else ''} are not in the "
            "model (a LoRA made for another model?)."
        )
    flat = dict(flat)
    for name, entry in lora.items():
        path = index[name]
        w = flat[path]
        d = delta(entry)
        if tuple(d.shape) != tuple(w.shape):
            raise LoRAError(
                f"LoRA module {name}: delta shape {tuple(d.shape)} does not fit the kernel "
                f"{tuple(w.shape)}."
            )
        flat[path] = (w + scale * d).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def runtime(lora: Mapping[str, Any], scale: float, rate: float = 0.0, key: Any = None):
    """A Flax method interceptor that adds `scale * dropout(x) A B` beside every LoRA
    module's output (peft's LoRA with `lora_dropout`); use it around `model.apply` on the
    *base* params: `with nn.intercept_methods(runtime(lora, scale, rate, key)): ...`.

    With `rate = 0` this equals `apply` on `merge(params, lora, scale)` up to float
    rounding (the delta is linear in x, and for a conv a conv with A then a 1x1 conv with
    B, tested); `merge` is what sampling and exports use. Dropout keeps each input entry
    with probability 1 - rate and scales it by 1 / (1 - rate), independently per module
    (keys `fold_in(key, i)` in sorted module order).

    Raises:
      LoRAError: (when the model runs) a LoRA module that is not a plain Dense,
        trailing-axis DenseGeneral or 2-D Conv.
    """
    import flax.linen as nn
    from flax.linen.linear import canonicalize_padding

    if not 0.0 <= rate < 1.0:
        raise LoRAError(f"lora.dropout must lie in [0, 1), got {rate}.")
    index = {name: i for i, name in enumerate(sorted(lora))}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(
            mod, (nn.Dense, nn.DenseGeneral, nn.Conv)
        ):
            return next_fun(*args, **kwargs)
        name = ".".join(mod.path)
        entry = lora.get(name)
        if entry is None:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        if rate > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, index[name]), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
        a, b = entry["A"].astype(y.dtype), entry["B"].astype(y.dtype)
        x = x.astype(y.dtype)
        if isinstance(mod, nn.Conv):
            if x.ndim != 4 or mod.feature_group_count != 1:
                raise LoRAError(f"LoRA module {name}: only 2-D ungrouped convs are supported.")
            strides = mod.strides or 1
            strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
            dilation = mod.kernel_dilation or 1
            dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
            padding = mod.padding
            if not isinstance(padding, str) or padding not in ("SAME", "VALID"):
                padding = canonicalize_padding(padding, 2)
            h = jax.lax.conv_general_dilated(
                x, a, strides, padding, rhs_dilation=dilation,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )  # fmt: skip
        else:
            if isinstance(mod, nn.DenseGeneral) and mod.batch_dims:
                raise LoRAError(f"LoRA module {name}: DenseGeneral with batch_dims.")
            h = jnp.tensordot(x, a, axes=a.ndim - 1)
        return y + scale * jnp.tensordot(h, b, axes=1)

    return interceptor


def to_torch(
    lora: Mapping[str, Any], scale: float = 1.0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (down, up)} in torch layout, `scale` folded into up (so up @ down = the
    delta a loader with alpha = rank, i.e. scale 1, adds)."""
    out = {}
    for name, entry in lora.items():
        a = np.asarray(entry["A"], np.float32)
        b = np.asarray(entry["B"], np.float32) * np.float32(scale)
        if b.ndim != 2 or a.ndim not in (2, 4):
            raise LoRAError(
                f"LoRA module {name}: only Dense and Conv kernels have a torch layout (A "
                f"{a.shape}, B {b.shape}); diffjax's own multi-head projections do not."
            )
        if a.ndim == 2:  # Dense: A [in, r], B [r, out] -> down [r, in], up [out, r]
            out[name] = (np.ascontiguousarray(a.T), np.ascontiguousarray(b.T))
        else:  # Conv: A [kh, kw, in, r] -> down [r, in, kh, kw]; up [out, r, 1, 1]
            out[name] = (
                np.ascontiguousarray(a.transpose(3, 2, 0, 1)),
                np.ascontiguousarray(b.T[:, :, None, None]),
            )
    return out


def from_torch(
    modules: Mapping[str, tuple[np.ndarray, np.ndarray, float]], kernels: Mapping[str, tuple]
) -> dict[str, Any]:
    """A LoRA tree from torch-layout `{module: (down, up, scale)}` for a model with
    `kernels` ({module: kernel shape}, `kernel_modules`); `scale` (alpha / r, times any
    user scale) is folded into B. A torch 1x1 conv where the model has a Dense (or the
    reverse) is reshaped.

    Raises:
      LoRAError: naming the modules the model lacks or whose shapes do not fit.
    """
    out, problems = {}, []
    missing = sorted(set(modules) - set(kernels))
    if missing:
        raise LoRAError(
            f"LoRA modules not in the model: {missing[:8]}{' ...' if len(missing) > 8 else ''}."
        )
    for name, (down, up, scale) in modules.items():
        shape = kernels[name]
        down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
        if up.ndim == 4:
            up = up[:, :, 0, 0]
        b = (up.T * np.float32(scale)).astype(np.float32)  # [r, out]
        if len(shape) == 2:
            if down.ndim == 4:
                down = down[:, :, 0, 0] if down.shape[2:] == (1, 1) else down
            a = down.T if down.ndim == 2 else None
        else:
            if down.ndim == 2 and shape[:2] == (1, 1):
                down = down[:, :, None, None]
            a = down.transpose(2, 3, 1, 0) if down.ndim == 4 else None
        if a is None or (*a.shape[:-1], b.shape[-1]) != tuple(shape) or a.shape[-1] != b.shape[0]:
            problems.append(
                f"{name}: down {tuple(down.shape)} / up {tuple(up.shape)} vs kernel {tuple(shape)}"
            )
            continue
        out[name] = {"A": np.ascontiguousarray(a), "B": b}
    if problems:
        raise LoRAError("LoRA shapes do not fit the model: " + "; ".join(problems[:8]) + ".")
    return out
