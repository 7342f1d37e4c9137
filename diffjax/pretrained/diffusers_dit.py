"""diffjax's `dit` in diffusers' `DiTTransformer2DModel` layout, both ways.

    kwargs, params = load_dit("DiT-XL-2-256/transformer")   # -> DiT(**kwargs), params
    export_dit(params, kwargs, "out/transformer", sample_size=32)

diffjax's DiT does not mirror diffusers' module tree, so one table (`_TABLE`: Flax
module path -> torch module, with the layout of every leaf) drives both directions.
Facts of diffusers 0.42.1 this relies on:

* Every block's `norm1` (AdaLayerNormZero) owns a time + class embedder
  (`norm1.emb`: `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)`, then
  `timestep_embedder.linear_1/linear_2`, plus `class_embedder.embedding_table` with
  num_classes + 1 rows, the last the null class); published DiT copies one embedder
  into every block and the final layer conditions on block 0's. diffjax has ONE shared
  embedding: the loader takes block 0's and refuses when the blocks' copies differ;
  the exporter writes it into every block. The frequency shift is diffjax's
  `time_freq_shift=1.0`.
* adaLN chunks are (shift, scale, gate) x (attention, MLP) as in diffjax; the final
  `proj_out_1` gives (shift, scale) as diffjax's `FinalLayer`; the MLP is
  `ff.net.0.proj` -> GELU(tanh) -> `ff.net.2` with width 4 D (`mlp_ratio=4`).
* `PatchEmbed` adds a fixed 2D sin-cos table whose FIRST half of the channels encodes
  the column and the second the row (MAE's convention); diffjax's
  `sincos_pos_embed_2d` has the row first. Both halves are otherwise identical, so the
  residual stream of the loaded model is diffusers' with its two channel halves swapped:
  every weight that reads or writes the residual stream is permuted accordingly
  (`_PERMS`). The function computed is the same; only the basis differs.
* diffusers interpolates that table when the input is not `sample_size` x
  `sample_size` (positions scaled by sample_size / size); diffjax never does. The two
  agree exactly at the config's `sample_size` only (DiT-XL-2-256: 32x32 latents).
* The MLP's LayerNorm (`norm3`) uses the config's `norm_eps` (1e-5 by default and in
  the published config); diffjax's uses 1e-6. The loader accepts norm_eps <= 1e-5 (a
  relative difference of about 5e-6 / variance of the hidden states); the exporter
  writes 1e-6, which diffusers then matches exactly.

diffusers' DiT is always class-conditional and has no text conditioning, Fourier time
features or time scaling; models that need them are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffjax.models import dit as dit_lib
from diffjax.pretrained import safetensors_io
from diffjax.pretrained.convert import ConversionError, check_fit, fmt_keys

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # the version whose source these layouts were checked against
CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")  # the second: old DiT configs
TIME_FREQ_SHIFT = 1.0  # diffusers' CombinedTimestepLabelEmbeddings: downscale_freq_shift=1
FREQUENCY_DIM = 256
MAX_NORM_EPS = 1e-5

# ----------------------------------------------------------------------------- shared machinery
# (also used by diffusers_unet2d)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter in both layouts.

    Attributes:
      path: the Flax param path.
      torch_keys: its state-dict key; several when the file holds copies of one tensor
        (DiT's per-block embedders): loading reads the first, export writes them all.
      kind: the layout, see `torch_shape`.
      perm: (Flax axis, chunks) pairs whose axis is the DiT residual channel axis
        (`chunks` stacked copies of it, e.g. 6 for the adaLN outputs), stored with its
        halves swapped.
    """

    path: tuple[str, ...]
    torch_keys: tuple[str, ...]
    kind: str
    perm: tuple[tuple[int, int], ...] = ()


def kind_of(path: tuple[str, ...], ndim: int) -> str:
    """The layout kind of a Flax leaf from its name and rank."""
    leaf, module = path[-1], path[-2] if len(path) > 1 else ""
    if leaf == "kernel":
        if ndim == 4:
            return "conv"
        if ndim == 3:
            return "heads_out" if module == "out" else "heads_in"
        return "linear"
    if leaf == "bias" and ndim == 2:
        return "heads_bias"
    return "same"


def torch_shape(kind: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The torch tensor shape of a Flax leaf of `kind` and `shape`.

    Kinds: 'conv' [kh, kw, I, O] <- [O, I, kh, kw]; 'linear' [I, O] <- [O, I];
    'heads_in' (q/k/v DenseGeneral) [D, N, H] <- [N*H, D]; 'heads_out' [N, H, D] <-
    [D, N*H]; 'heads_bias' [N, H] <- [N*H]; 'same' (norm scales, biases, embeddings).
    """
    s = tuple(shape)
    if kind == "conv":
        return (s[3], s[2], s[0], s[1])
    if kind == "linear":
        return (s[1], s[0])
    if kind == "heads_in":
        return (s[1] * s[2], s[0])
    if kind == "heads_out":
        return (s[2], s[0] * s[1])
    if kind == "heads_bias":
        return (s[0] * s[1],)
    return s


def to_flax(kind: str, x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A torch tensor (already of `torch_shape(kind, shape)`) in the Flax layout."""
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    if kind == "linear":
        return x.T
    if kind in ("heads_in", "heads_out"):
        return x.T.reshape(shape)
    return x.reshape(shape)


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    """The inverse of `to_flax`."""
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    if kind == "linear":
        return x.T
    if kind == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if kind == "heads_out":
        return x.reshape(-1, x.shape[-1]).T
    if kind == "heads_bias":
        return x.reshape(-1)
    return x


def _half_swap(size: int, chunks: int) -> np.ndarray:
    """Gather indices swapping the two halves of each of `chunks` blocks of size/chunks."""
    d = size // chunks
    one = (np.arange(d) + d // 2) % d
    return np.concatenate([c * d + one for c in range(chunks)])


def _permute(x: np.ndarray, perm: tuple[tuple[int, int], ...], inverse: bool) -> np.ndarray:
    for axis, chunks in perm:
        idx = _half_swap(x.shape[axis], chunks)
        x = np.take(x, np.argsort(idx) if inverse else idx, axis=axis)
    return x


def flat_params(tree: Any) -> dict[tuple[str, ...], Any]:
    """A params tree (boxed or not, optionally under 'params') as a flat dict."""
    tree = nn.meta.unbox(tree)
    if isinstance(tree, Mapping) and set(tree) == {"params"}:
        tree = tree["params"]
    return traverse_util.flatten_dict(dict(tree))


def entries_to_flax(
    tensors: Mapping[str, np.ndarray],
    entries: Sequence[Entry],
    abstract: Any,
    *,
    what: str,
) -> dict:
    """Torch tensors -> a nested dict of float32 numpy params shaped like `abstract`.

    Raises:
      ConversionError naming every missing, unexpected and mis-shaped key.
    """
    flat = flat_params(abstract)
    out, missing, misshaped, used = {}, [], [], set()
    for e in entries:
        want = tuple(flat[e.path].shape)
        tshape = torch_shape(e.kind, want)
        gone = [k for k in e.torch_keys if k not in tensors]
        missing += gone
        used.update(e.torch_keys)
        if gone:
            continue
        x = np.asarray(tensors[e.torch_keys[0]])
        if tuple(x.shape) != tshape:
            misshaped.append(f"{e.torch_keys[0]}: file {tuple(x.shape)}, model wants {tshape}")
            continue
        x = _permute(to_flax(e.kind, x, want), e.perm, inverse=False)
        out[e.path] = np.ascontiguousarray(x, np.float32)
    unexpected = set(tensors) - used
    check_fit(
        f"{what}: the weights do not fit the model its config.json describes",
        missing,
        unexpected,
        misshaped,
    )
    return traverse_util.unflatten_dict(out)


def entries_to_torch(
    params: Any, entries: Sequence[Entry], abstract: Any, *, what: str
) -> dict[str, np.ndarray]:
    """Flax params -> torch state-dict tensors (float32 numpy), after checking their shapes."""
    flat = {p: np.asarray(jax.device_get(v), np.float32) for p, v in flat_params(params).items()}
    want = {p: tuple(v.shape) for p, v in flat_params(abstract).items()}
    missing = sorted("/".join(p) for p in want if p not in flat)
    unexpected = sorted("/".join(p) for p in flat if p not in want)
    misshaped = sorted(
        f"{'/'.join(p)}: params {flat[p].shape}, model wants {s}"
        for p, s in want.items()
        if p in flat and tuple(flat[p].shape) != s
    )
    check_fit(
        f"{what}: the params do not fit the model the kwargs describe",
        missing,
        unexpected,
        misshaped,
    )
    out: dict[str, np.ndarray] = {}
    for e in entries:
        x = to_torch(e.kind, _permute(flat[e.path], e.perm, inverse=True))
        for k in e.torch_keys:
            out[k] = np.ascontiguousarray(x)
    return out


def write_component(out_dir: str, config: dict, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes `out_dir/config.json` and `out_dir/diffusion_pytorch_model.safetensors`."""
    os.makedirs(out_dir, exist_ok=True)
    safetensors_io.write_tensors(tensors, os.path.join(out_dir, WEIGHTS_NAME))
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def resolved_fields(module_cls: type, model_kwargs: Mapping[str, Any], what: str) -> Any:
    """`module_cls(**model_kwargs)`: every field with its default filled in."""
    try:
        return module_cls(**dict(model_kwargs))
    except TypeError as e:
        raise ValueError(f"{what}: model_kwargs do not fit {module_cls.__name__}: {e}") from e


def refuse(what: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems) + ".")


# ----------------------------------------------------------------------------- the DiT table

_EMB = "transformer_blocks.{i}.norm1.emb."
# Flax module path (regex over "/"-joined names) -> torch module (templates: {b} the
# block index of the match, {i} every block: a shared tensor copied into each).
_TABLE: tuple[tuple[str, str], ...] = (
    (r"patch_embed", "pos_embed.proj"),
    (r"time_embed/Dense_0", _EMB + "timestep_embedder.linear_1"),
    (r"time_embed/Dense_1", _EMB + "timestep_embedder.linear_2"),
    (r"label_emb", _EMB + "class_embedder.embedding_table"),
    (r"block(?P<b>\d+)/adaLN", "transformer_blocks.{b}.norm1.linear"),
    (r"block(?P<b>\d+)/attn/query", "transformer_blocks.{b}.attn1.to_q"),
    (r"block(?P<b>\d+)/attn/key", "transformer_blocks.{b}.attn1.to_k"),
    (r"block(?P<b>\d+)/attn/value", "transformer_blocks.{b}.attn1.to_v"),
    (r"block(?P<b>\d+)/attn/out", "transformer_blocks.{b}.attn1.to_out.0"),
    (r"block(?P<b>\d+)/mlp/Dense_0", "transformer_blocks.{b}.ff.net.0.proj"),
    (r"block(?P<b>\d+)/mlp/Dense_1", "transformer_blocks.{b}.ff.net.2"),
    (r"final/adaLN", "proj_out_1"),
    (r"final/proj", "proj_out_2"),
)

# Residual-stream axes (see the module docstring): (module regex, leaf) -> ((axis, chunks), ...).
_PERMS: tuple[tuple[str, str, tuple[tuple[int, int], ...]], ...] = (
    (r"patch_embed", "kernel", ((3, 1),)),
    (r"patch_embed", "bias", ((0, 1),)),
    (r"block\d+/adaLN", "kernel", ((1, 6),)),
    (r"block\d+/adaLN", "bias", ((0, 6),)),
    (r"block\d+/attn/(query|key|value)", "kernel", ((0, 1),)),
    (r"block\d+/attn/out", "kernel", ((2, 1),)),
    (r"block\d+/attn/out", "bias", ((0, 1),)),
    (r"block\d+/mlp/Dense_0", "kernel", ((0, 1),)),
    (r"block\d+/mlp/Dense_1", "kernel", ((1, 1),)),
    (r"block\d+/mlp/Dense_1", "bias", ((0, 1),)),
    (r"final/adaLN", "kernel", ((1, 2),)),
    (r"final/adaLN", "bias", ((0, 2),)),
    (r"final/proj", "kernel", ((0, 1),)),
)

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _entries(abstract: Any, depth: int) -> list[Entry]:
    """The table applied to the (unscanned) DiT params tree."""
    entries = []
    for path, leaf in flat_params(abstract).items():
        module = "/".join(path[:-1])
        found = [(re.fullmatch(pat, module), tpl) for pat, tpl in _TABLE]
        found = [(m, tpl) for m, tpl in found if m]
        if len(found) != 1:
            raise AssertionError(f"diffusers_dit: no single torch name for DiT param {path}")
        ((m, template),) = found
        blocks = range(depth) if "{i}" in template else (None,)
        keys = tuple(
            template.format(i=i, b=m.groupdict().get("b")) + "." + _LEAF[path[-1]] for i in blocks
        )
        perm = next(
            (p for pat, lf, p in _PERMS if lf == path[-1] and re.fullmatch(pat, module)), ()
        )
        entries.append(Entry(path, keys, kind_of(path, len(leaf.shape)), perm))
    return entries


def _abstract(model_kwargs: Mapping[str, Any], in_channels: int) -> Any:
    """eval_shape'd params of the UNSCANNED DiT (the layout the table names)."""
    kw = {**dict(model_kwargs), "scan_layers": False}
    model = dit_lib.DiT(**kw)
    p = model.patch_size
    x = jnp.zeros((1, 2 * p, 2 * p, in_channels), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if model.num_classes > 0 else None
    variables = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,)), labels)
    return nn.meta.unbox(variables["params"])


# ----------------------------------------------------------------------------- config <-> kwargs


def dit_kwargs_from_config(config: Mapping[str, Any], *, what: str = "DiT") -> dict[str, Any]:
    """diffjax `DiT` kwargs from a diffusers `DiTTransformer2DModel` config.json.

    Raises:
      ValueError naming every option diffjax's DiT cannot express.
    """
    c = dict(config)
    get = c.get
    problems = []
    cls = get("_class_name", CLASS_NAMES[0])
    if cls not in CLASS_NAMES:
        problems.append(
            f"_class_name={cls!r} is not a DiT transformer ({' or '.join(CLASS_NAMES)})"
        )
    if cls == "Transformer2DModel" and c.get("patch_size") is None:
        problems.append("a Transformer2DModel config without patch_size is not a DiT")
    checks = (  # (key, the only supported value = diffusers' DiT default, why)
        ("norm_type", "ada_norm_zero", "only adaLN-Zero DiTs exist in diffjax"),
        ("activation_fn", "gelu-approximate", "diffjax's DiT MLP uses GELU (tanh)"),
        ("attention_bias", True, "diffjax's DiT attention has q/k/v biases"),
        ("norm_elementwise_affine", False, "diffjax's DiT norms have no affine parameters"),
        ("cross_attention_dim", None, "no text cross-attention in this layout"),
        ("num_vector_embeds", None, "discrete (VQ) inputs are not supported"),
        ("only_cross_attention", False, "blocks self-attend"),
        ("double_self_attention", False, "one self-attention per block"),
    )
    for key, want, why in checks:
        have = get(key, want)
        if have != want:
            problems.append(f"{key}={have!r} (needs {want!r}: {why})")
    ncls = get("num_embeds_ada_norm", 1000)
    if not isinstance(ncls, int) or ncls <= 0:
        problems.append(f"num_embeds_ada_norm={ncls!r} (needs the class count, > 0)")
    eps = get("norm_eps", 1e-5)
    if not isinstance(eps, (int, float)) or eps > MAX_NORM_EPS:
        problems.append(
            f"norm_eps={eps!r} (diffjax's DiT uses 1e-6 in its MLP LayerNorm; values up to "
            f"{MAX_NORM_EPS:g} agree to ~1e-5 relative, larger ones do not)"
        )
    heads, head_dim = get("num_attention_heads", 16), get("attention_head_dim", 72)
    patch, size = get("patch_size", 2), get("sample_size", 32)
    cin = get("in_channels", 4)
    cout = get("out_channels") or cin
    for key, v in (
        ("num_attention_heads", heads),
        ("attention_head_dim", head_dim),
        ("patch_size", patch),
        ("in_channels", cin),
        ("out_channels", cout),
        ("num_layers", get("num_layers", 28)),
    ):
        if not isinstance(v, int) or v <= 0:
            problems.append(f"{key}={v!r} (needs a positive integer)")
    if not problems and (heads * head_dim) % 4:
        problems.append(
            f"hidden size {heads}x{head_dim}={heads * head_dim} (the 2D sin-cos positions "
            "need a multiple of 4)"
        )
    if not problems and (not isinstance(size, int) or size % patch):
        problems.append(f"sample_size={size!r} (needs an integer multiple of patch_size={patch})")
    refuse(what, problems)
    learn_sigma = cout == 2 * cin
    return dict(
        patch_size=patch,
        hidden_size=heads * head_dim,
        depth=get("num_layers", 28),
        num_heads=heads,
        mlp_ratio=4.0,
        num_classes=ncls,
        learn_sigma=learn_sigma,
        out_channels=0 if learn_sigma or cout == cin else cout,
        time_freq_shift=TIME_FREQ_SHIFT,
    )


def dit_config(model_kwargs: Mapping[str, Any], *, in_channels: int, sample_size: int) -> dict:
    """The diffusers `DiTTransformer2DModel` config.json of a diffjax `DiT`.

    Raises:
      ValueError naming every DiT setting diffusers' layout cannot express.
    """
    what = "export_dit"
    m = resolved_fields(dit_lib.DiT, model_kwargs, what)
    problems = []
    if m.num_classes <= 0:
        problems.append(
            "num_classes=0 (diffusers' DiTTransformer2DModel is always class-conditional)"
        )
    if m.context_dim or m.text_vocab_size:
        problems.append("context_dim/text_vocab_size > 0 (no text cross-attention in this layout)")
    if m.time_embedding != "sinusoidal":
        problems.append(f"time_embedding={m.time_embedding!r} (diffusers uses sinusoidal)")
    if m.frequency_dim != FREQUENCY_DIM:
        problems.append(f"frequency_dim={m.frequency_dim} (diffusers uses {FREQUENCY_DIM})")
    if m.time_scale != 1.0:
        problems.append(f"time_scale={m.time_scale} (diffusers feeds t unscaled; needs 1.0)")
    if m.time_freq_shift != TIME_FREQ_SHIFT:
        problems.append(
            f"time_freq_shift={m.time_freq_shift} (diffusers' DiT time features use "
            f"downscale_freq_shift=1: train with time_freq_shift={TIME_FREQ_SHIFT} to export)"
        )
    if m.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio={m.mlp_ratio} (diffusers' DiT MLP is 4x wide)")
    if m.num_heads <= 0 or m.hidden_size % m.num_heads:
        problems.append(f"hidden_size={m.hidden_size} is not divisible by num_heads={m.num_heads}")
    if not isinstance(sample_size, int) or sample_size <= 0 or sample_size % m.patch_size:
        problems.append(
            f"sample_size={sample_size!r} (the side of the inputs the model runs at, a "
            f"multiple of patch_size={m.patch_size}; diffusers' positions match diffjax's "
            "only there)"
        )
    refuse(what, problems)
    cout = (m.out_channels or in_channels) * (2 if m.learn_sigma else 1)
    return {
        "_class_name": CLASS_NAMES[0],
        "_diffusers_version": DIFFUSERS_VERSION,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": m.hidden_size // m.num_heads,
        "dropout": 0.0,
        "in_channels": in_channels,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "norm_num_groups": 32,
        "norm_type": "ada_norm_zero",
        "num_attention_heads": m.num_heads,
        "num_embeds_ada_norm": m.num_classes,
        "num_layers": m.depth,
        "out_channels": cout,
        "patch_size": m.patch_size,
        "sample_size": sample_size,
        "upcast_attention": False,
    }


# ----------------------------------------------------------------------------- load / export


def _check_shared_embedder(tensors: Mapping[str, np.ndarray], depth: int) -> None:
    """Refuses files whose blocks hold different time/class embedders."""
    differ = []
    for key in sorted(k for k in tensors if k.startswith("transformer_blocks.0.norm1.emb.")):
        tail = key[len("transformer_blocks.0.") :]
        for i in range(1, depth):
            other = f"transformer_blocks.{i}.{tail}"
            if other in tensors and not np.array_equal(tensors[other], tensors[key]):
                differ.append(other)
    if differ:
        raise ConversionError(
            f"DiT: the blocks' time/class embedders differ from block 0's ({fmt_keys(differ)}); "
            "diffjax's DiT has ONE shared time + class embedding (published DiT copies the "
            "same one into every block), so this checkpoint cannot be loaded exactly."
        )


def load_dit(directory: str, *, scan_layers: bool = False) -> tuple[dict[str, Any], dict]:
    """A diffusers `DiTTransformer2DModel` directory -> (DiT kwargs, params).

    Args:
      directory: holds config.json and the safetensors weights (e.g. a DiT pipeline's
        `transformer/`).
      scan_layers: return the scanned layout (params stacked under 'blocks') and
        `scan_layers=True` in the kwargs.

    Returns:
      (kwargs for `diffjax.models.dit.DiT`, params as float32 numpy). The model computes
      diffusers' function on sample_size x sample_size inputs (see the module docstring),
      with t the diffusers timestep and label `num_classes` the null class.

    Raises:
      ValueError / ConversionError naming what does not fit.
    """
    config = safetensors_io.read_config(directory)
    kwargs = dit_kwargs_from_config(config, what=f"DiT config {directory}")
    tensors = safetensors_io.read_tensors(directory)
    key = "pos_embed.proj.weight"
    if key not in tensors or tensors[key].ndim != 4:
        raise ConversionError(f"DiT {directory}: no 4D {key} (the patch embedding) in the weights.")
    in_channels = int(tensors[key].shape[1])
    if in_channels != config.get("in_channels", 4):
        raise ConversionError(
            f"DiT {directory}: {key} has {in_channels} input channels, config.json says "
            f"in_channels={config.get('in_channels', 4)}."
        )
    _check_shared_embedder(tensors, kwargs["depth"])
    abstract = _abstract(kwargs, in_channels)
    params = entries_to_flax(
        tensors, _entries(abstract, kwargs["depth"]), abstract, what=f"DiT {directory}"
    )
    if scan_layers:
        params = dit_lib.stack_block_params(params, kwargs["depth"])
    return {**kwargs, "scan_layers": scan_layers}, params


def export_dit(
    params: Any, model_kwargs: Mapping[str, Any], out_dir: str, *, sample_size: int
) -> None:
    """diffjax DiT params -> a diffusers `DiTTransformer2DModel` directory.

    Writes `out_dir/config.json` and `out_dir/diffusion_pytorch_model.safetensors`
    (float32), loadable with `DiTTransformer2DModel.from_pretrained(out_dir)`.

    Args:
      params: the DiT's params (scanned or unscanned layout; EMA params work too).
      model_kwargs: the kwargs the DiT was built with (`config.model.kwargs`).
      out_dir: the component directory to write (created if needed).
      sample_size: the side of the (latent) inputs the model runs at; diffusers' position
        table equals diffjax's at that size only.

    Raises:
      ValueError naming the settings diffusers cannot express, or the params that do not
      fit `model_kwargs`.
    """
    flat = flat_params(params)
    if any(p[0] == dit_lib.STACKED_KEY for p in flat):
        params = dit_lib.unstack_block_params(traverse_util.unflatten_dict(flat))
        flat = flat_params(params)
    if ("patch_embed", "kernel") not in flat:
        raise ValueError("export_dit: params have no patch_embed/kernel; are these DiT params?")
    in_channels = int(np.shape(flat[("patch_embed", "kernel")])[2])
    config = dit_config(model_kwargs, in_channels=in_channels, sample_size=sample_size)
    kw = {k: v for k, v in dict(model_kwargs).items() if k != "scan_layers"}
    abstract = _abstract(kw, in_channels)
    depth = dit_lib.DiT(**kw).depth
    tensors = entries_to_torch(params, _entries(abstract, depth), abstract, what="export_dit")
    write_component(out_dir, config, tensors)


__all__ = ["dit_config", "dit_kwargs_from_config", "export_dit", "load_dit"]
