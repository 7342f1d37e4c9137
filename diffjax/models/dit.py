"""Diffusion Transformer (Peebles & Xie 2023) with optional text cross-attention.

Patchify -> fixed 2D sin-cos positions -> adaLN-Zero blocks conditioned on
(time + class) -> adaLN final layer -> unpatchify. Every residual gate and the
final projection start at zero, so the network outputs exactly zero at
initialisation. With `context_dim > 0` each block gets a (PixArt-alpha style)
masked cross-attention to the text tokens between self-attention and the MLP.

`scan_layers=True` runs the `depth` blocks as one `nn.scan` over a single block:
XLA compiles the block once instead of `depth` times (compile time, not speed,
is the point; BENCHMARKS.md, `scan_layers`). The params of the blocks are then
stacked along a leading axis (logical name 'layers', never sharded) under
`params['blocks']` instead of `params['block0']` ... `params['block{depth-1}']`;
the network computes the same function. The layouts convert both ways with
`stack_block_params(tree, depth)` / `unstack_block_params(tree)`, which take any
pytree holding DiT params (params, EMA params, a whole TrainState with its optax
moments). `scan_layers` is a model kwarg and so part of a run's model fingerprint:
a workdir trained with one layout is refused when resumed with the other (resume
it with the setting it was trained with). To carry a run over, restore its state
(`diffjax.rundir.load_state` with its own config), convert it with these
functions and save it into a new workdir whose config has the other setting;
there is no command for that yet.

ControlNet (`diffjax.models.dit_controlnet`): `DiT(..., control_residuals=rs)` adds
`rs[i]` ([B, T, D]) to the output of block i for the first N = len(rs) blocks; the
ControlNet builds its copies of the embeddings and blocks with this module's
`DiTFields`, `prepare_inputs`, `embed_patches`, `add_positions`, `embed_condition` and
`block_factory`, so its params carry the DiT's names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import layers as L
from diffjax.models import text as T

Array = jax.Array

_XAVIER = nn.initializers.xavier_uniform()
_ZERO = nn.initializers.zeros_init()


@functools.lru_cache(maxsize=16)
def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2D sin-cos position table (MAE/DiT).

    Half the channels encode the row, half the column, each as
    `[sin(pos * w_i), cos(pos * w_i)]` with w_i = 10000^(-i / (dim/4)).

    Returns:
      [grid_h * grid_w, dim] float32, row-major over (row, column).
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs dim % 4 == 0, got {dim}.")

    def one_d(pos: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([one_d(rows, dim // 2), one_d(cols, dim // 2)], axis=1)
    return emb.astype(np.float32)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN: x [B, T, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def patchify(x: Array, p: int) -> Array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]; token (i, j) holds pixels [i*p:(i+1)*p, j*p:(j+1)*p]."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Array, p: int, grid_h: int, grid_w: int) -> Array:
    """Inverse of `patchify`: [B, grid_h*grid_w, p*p*C] -> [B, grid_h*p, grid_w*p, C]."""
    b, _, f = x.shape
    c = f // (p * p)
    x = x.reshape(b, grid_h, grid_w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid_h * p, grid_w * p, c)


# ----------------------------------------------------------------------------- block layouts

STACKED_KEY = "blocks"  # params key of the scanned (stacked) blocks
# params key of a DiT ControlNet's control patch embedding (dit_controlnet): marks its
# params, whose blocks are never stacked, so the layout converters leave them alone.
CONTROL_PATCH_EMBED_KEY = "control_patch_embed"


def _block_name(i: int) -> str:
    return f"block{i}"


def _is_dit_params(node: Any, key: str) -> bool:
    # A DiT's own params mapping (not the "block{i}"s of its text encoder, nor a DiT
    # ControlNet's, whose blocks stay unstacked).
    return (
        hasattr(node, "keys")
        and "patch_embed" in node
        and key in node
        and CONTROL_PATCH_EMBED_KEY not in node
    )


def _stack_one(node: Any, depth: int) -> dict[str, Any]:
    names = [_block_name(i) for i in range(depth)]
    missing = [n for n in names if n not in node]
    extra = sorted(k for k in node if k.startswith("block") and k[5:].isdigit() and k not in names)
    if missing or extra or STACKED_KEY in node:
        raise ValueError(
            f"stack_block_params(depth={depth}) needs exactly the unscanned blocks "
            f"block0..block{depth - 1}; missing {missing}, unexpected {extra}"
            + (f", and '{STACKED_KEY}' is already there" if STACKED_KEY in node else "")
            + "."
        )

    def stack(*leaves):
        if all(isinstance(x, np.ndarray) for x in leaves):
            return np.stack(leaves)
        return jnp.stack(leaves)

    out = {k: v for k, v in node.items() if k not in names}
    out[STACKED_KEY] = jax.tree.map(stack, *[node[n] for n in names])
    return out


def _unstack_one(node: Any) -> dict[str, Any]:
    stacked = node[STACKED_KEY]
    depths = {int(x.shape[0]) for x in jax.tree.leaves(stacked)}
    if len(depths) != 1:
        raise ValueError(f"'{STACKED_KEY}' leaves have different leading (layer) sizes {depths}.")
    (depth,) = depths
    clash = [_block_name(i) for i in range(depth) if _block_name(i) in node]
    if clash:
        raise ValueError(f"unstack_block_params: {clash} already present beside '{STACKED_KEY}'.")
    out = {k: v for k, v in node.items() if k != STACKED_KEY}
    for i in range(depth):
        out[_block_name(i)] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def stack_block_params(tree: Any, depth: int) -> Any:
    """Unscanned -> scanned DiT layout: `block0..block{depth-1}` become `blocks`.

    Every DiT params mapping inside `tree` is converted (found by its 'patch_embed'
    key), so this works on params, EMA params, gradients, optax states (Adam's
    moments mirror the params) and a whole `TrainState`; everything else is left as
    it is. Leaves are stacked along a new leading axis (numpy stays numpy).

    Args:
      tree: a pytree holding unscanned DiT params ([...] leaves per block).
      depth: the model's `depth`.

    Returns:
      The same tree with each DiT mapping's blocks stacked under 'blocks' ([depth, ...]).
    """
    found = []

    def one(node):
        if _is_dit_params(node, "patch_embed"):
            found.append(True)
            return _stack_one(node, depth)
        return node

    out = jax.tree.map(one, tree, is_leaf=lambda n: _is_dit_params(n, "patch_embed"))
    if not found:
        raise ValueError("stack_block_params: no DiT params (a mapping with 'patch_embed') found.")
    return out


def unstack_block_params(tree: Any) -> Any:
    """Scanned -> unscanned DiT layout: the inverse of `stack_block_params`.

    The depth is read from the leading axis of the stacked leaves.
    """
    found = []

    def one(node):
        if _is_dit_params(node, STACKED_KEY):
            found.append(True)
            return _unstack_one(node)
        return node

    out = jax.tree.map(one, tree, is_leaf=lambda n: _is_dit_params(n, STACKED_KEY))
    if not found:
        raise ValueError(
            f"unstack_block_params: no scanned DiT params (a mapping with 'patch_embed' "
            f"and '{STACKED_KEY}') found."
        )
    return out


class Mlp(nn.Module):
    """Dense -> GELU (tanh) -> Dense."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        h = L.dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, kernel_init=_XAVIER)(x)
        h = nn.gelu(h, approximate=True)
        return L.dense(d, ("mlp", "embed"), dtype=self.dtype, kernel_init=_XAVIER)(h)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (+ optional masked cross-attention)."""

    num_heads: int
    mlp_ratio: float = 4.0
    cross_attention: bool = False
    attention_impl: str = ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, c: Array, context: Array | None, context_mask: Array | None
    ) -> Array:
        """x [B, T, D], c [B, D], context [B, S, Dc], mask [B, S] -> [B, T, D]."""
        d = x.shape[-1]
        heads, head_dim = L.num_heads_for(d, self.num_heads, 0)
        mod = L.dense(6 * d, ("embed", "mlp"), dtype=self.dtype, kernel_init=_ZERO, name="adaLN")(
            nn.silu(c)
        )
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        norm = functools.partial(L.layer_norm, dtype=self.dtype, affine=False, epsilon=1e-6)

        h = modulate(norm(name="norm1")(x), shift1, scale1)
        h = L.MultiHeadAttention(
            heads,
            head_dim,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            kernel_init=_XAVIER,
            name="attn",
        )(h)
        x = x + gate1[:, None, :] * h

        if self.cross_attention:
            h = L.layer_norm(dtype=self.dtype, epsilon=1e-6, name="norm_cross")(x)
            x = x + L.MultiHeadAttention(
                heads,
                head_dim,
                zero_out=True,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                kernel_init=_XAVIER,
                name="cross_attn",
            )(h, context, context_mask)

        h = modulate(norm(name="norm2")(x), shift2, scale2)
        h = Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(h)
        return L.constrain(x + gate2[:, None, :] * h, L.TOKEN_AXES)


def _scan_blocks(
    block: nn.Module,
    depth: int,
    x: Array,
    c: Array,
    context,
    context_mask,
    control_residuals: tuple[Array, ...] | None = None,
) -> Array:
    """Applies `block` `depth` times as one `nn.scan`, params stacked on axis 0 ('layers').

    With `control_residuals` (N <= depth arrays [B, T, D]) they are zero-padded to
    `depth`, stacked and scanned with the blocks: step i returns `block(x) + r_i`.
    """
    if control_residuals:

        def body_res(mdl, x, r, c, context, context_mask):
            return mdl(x, c, context, context_mask) + r, None

        res = jnp.stack([r.astype(x.dtype) for r in control_residuals])
        if res.shape[0] < depth:
            pad = jnp.zeros((depth - res.shape[0], *res.shape[1:]), res.dtype)
            res = jnp.concatenate([res, pad])
        scan = nn.scan(
            body_res,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scan(block, x, res, c, context, context_mask)[0]

    def body(mdl, x, c, context, context_mask):
        return mdl(x, c, context, context_mask), None

    scan = nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scan(block, x, c, context, context_mask)[0]


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a zero-initialised projection to patch pixels."""

    out_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        """x [B, T, D], c [B, D] -> [B, T, out_features]."""
        d = x.shape[-1]
        shift, scale = jnp.split(
            L.dense(2 * d, ("embed", "mlp"), dtype=self.dtype, kernel_init=_ZERO, name="adaLN")(
                nn.silu(c)
            ),
            2,
            axis=-1,
        )
        x = modulate(L.layer_norm(dtype=self.dtype, affine=False, name="norm")(x), shift, scale)
        return L.dense(
            self.out_features, ("embed", "mlp"), dtype=self.dtype, kernel_init=_ZERO, name="proj"
        )(x)


class DiTFields(nn.Module):
    """The fields of a DiT, shared by `DiT` and its ControlNet (`dit_controlnet.DiTControlNet`).

    Attributes:
      patch_size: p; H and W must be multiples of p.
      hidden_size: token width D.
      depth: number of blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / D.
      num_classes: class count (0 = unconditional); the table has a null row more.
      learn_sigma: output 2C channels (epsilon and the variance interpolation v).
      out_channels: output channels before learn_sigma doubling (0 = input channels).
      time_scale: t is multiplied by this before the time embedding.
      time_embedding: 'sinusoidal' | 'fourier'.
      frequency_dim: width of the fixed time features (256 in DiT).
      time_freq_shift: frequency shift of the sinusoidal time features (0 as in
        DiT; 1 for weights from diffusers' `DiTTransformer2DModel`, whose
        `Timesteps` use `downscale_freq_shift=1`; see diffjax.pretrained.diffusers_dit).
      context_dim: text embedding width (0 = no text); > 0 adds cross-attention.
      text_vocab_size: > 0 gives the model its own trainable `TextEncoder`
        (width context_dim); `context` is then int token ids [B, L] (see
        diffjax.models.text), not embeddings.
      text_depth: TextEncoder blocks.
      text_heads: TextEncoder attention heads.
      attention_impl: '' (auto) | 'xla' | 'cudnn'.
      dtype: compute dtype string; params stay float32.
      remat_policy: per-block rematerialisation ('none', 'full', or a
        jax.checkpoint_policies name).
      scan_layers: run the blocks as one `nn.scan` (params stacked under
        'blocks'; see the module docstring); remat applies inside the scanned body.
    """

    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    out_channels: int = 0
    time_scale: float = 1.0
    time_embedding: str = "sinusoidal"
    frequency_dim: int = 256
    time_freq_shift: float = 0.0
    context_dim: int = 0
    text_vocab_size: int = 0
    text_depth: int = 2
    text_heads: int = 4
    attention_impl: str = ""
    dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False


# The embedding step of a DiT as functions of the calling module: each must be called
# from inside the compact `__call__` of a `DiTFields` module (a `DiT` or its ControlNet),
# whose scope the submodules bind to, so both get the same param names.


def prepare_inputs(
    model: DiTFields,
    x: Array,
    t: Array,
    labels: Array | None,
    context: Array | None,
    context_mask: Array | None,
) -> tuple[Array | None, Array | None, Array | None]:
    """Checks a DiT's inputs and runs its text encoder (when `text_vocab_size > 0`).

    Returns:
      (labels [B] int32 or None, context [B, L, context_dim] or None, mask [B, L] or None).
    """
    L.check_inputs(x, t)
    L.check_remat_policy(model.remat_policy)
    b, hh, ww, _ = x.shape
    p = model.patch_size
    if hh % p or ww % p:
        raise ValueError(f"DiT with patch_size={p} needs H, W divisible by {p}, got {hh}x{ww}.")
    labels = L.check_labels(labels, model.num_classes, b)
    if model.text_vocab_size > 0:
        context, context_mask = T.encode_context(model, context, context_mask, b)
    context, context_mask = L.check_context(context, context_mask, model.context_dim, b)
    return labels, context, context_mask


def embed_patches(model: DiTFields, x: Array) -> Array:
    """The 'patch_embed' projection: [B, H, W, C] -> tokens [B, (H/p)(W/p), D], no positions."""
    b, hh, ww, _ = x.shape
    p, d = model.patch_size, model.hidden_size
    dt = L.get_dtype(model.dtype)
    x = nn.Conv(
        d,
        (p, p),
        strides=(p, p),
        padding="VALID",
        dtype=dt,
        param_dtype=jnp.float32,
        # Glorot over the flattened (p*p*C -> D) patch projection, as in DiT.
        kernel_init=L.partitioned(
            nn.initializers.variance_scaling(
                1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1
            ),
            (None, None, "conv_in", "conv_out"),
        ),
        bias_init=L.partitioned(_ZERO, ("conv_out",)),
        name="patch_embed",
    )(x.astype(dt))
    return x.reshape(b, (hh // p) * (ww // p), d)


def add_positions(tokens: Array, grid_h: int, grid_w: int) -> Array:
    """Adds the fixed 2D sin-cos positions to tokens [B, grid_h * grid_w, D]."""
    d = tokens.shape[-1]
    tokens = tokens + jnp.asarray(sincos_pos_embed_2d(d, grid_h, grid_w), tokens.dtype)
    return L.constrain(tokens, L.TOKEN_AXES)


def embed_condition(model: DiTFields, t: Array, labels: Array | None) -> Array:
    """The block conditioning c [B, D]: 'time_embed'(t) + 'label_emb'(labels) if conditional."""
    d = model.hidden_size
    dt = L.get_dtype(model.dtype)
    c = L.TimestepEmbedding(
        d,
        model.frequency_dim,
        kind=model.time_embedding,
        time_scale=model.time_scale,
        freq_shift=model.time_freq_shift,
        dtype=dt,
        kernel_init=nn.initializers.normal(0.02),
        name="time_embed",
    )(t)
    if labels is not None:
        c = c + L.class_embedding(model.num_classes, d, init=nn.initializers.normal(0.02))(
            labels
        ).astype(c.dtype)
    return c


def block_factory(model: DiTFields, *, scanned: bool = False) -> Callable[..., nn.Module]:
    """`DiTBlock` with the model's settings (and remat policy); call it with `name=`."""
    return functools.partial(
        L.maybe_remat(DiTBlock, model.remat_policy, prevent_cse=not scanned),
        model.num_heads,
        model.mlp_ratio,
        model.context_dim > 0,
        model.attention_impl,
        L.get_dtype(model.dtype),
    )


def check_control_residuals(
    residuals: Sequence[Array], depth: int, batch: int, tokens: int, width: int
) -> tuple[Array, ...]:
    """Validates a DiT's `control_residuals`: N <= depth arrays [B, T, D].

    Returns:
      The residuals as a tuple.
    """
    if not isinstance(residuals, (tuple, list)):
        raise ValueError(
            "DiT: control_residuals must be a tuple/list of arrays [B, T, D] (one per "
            f"controlled block, as DiTControlNet returns), got {type(residuals).__name__}."
        )
    if len(residuals) > depth:
        raise ValueError(
            f"DiT: got {len(residuals)} control residuals but the model has depth={depth} "
            f"blocks; a DiT ControlNet for it needs control_depth <= {depth}."
        )
    want = (batch, tokens, width)
    for i, r in enumerate(residuals):
        if tuple(getattr(r, "shape", ())) != want:
            raise ValueError(
                f"DiT: control residual {i} has shape {getattr(r, 'shape', None)}, expected "
                f"[B, T, D] = {want} (T = (H/p)(W/p) tokens, D = hidden_size); build the "
                "ControlNet with the base's patch_size and hidden_size and the same input size."
            )
    return tuple(residuals)


class DiT(DiTFields):
    """Diffusion Transformer (fields: `DiTFields`).

    `control_residuals` (from `diffjax.models.dit_controlnet.DiTControlNet`) adds
    residual i to the output of block i, for the first N blocks.
    """

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        labels: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        train: bool = False,
        control_residuals: Sequence[Array] | None = None,
    ) -> Array:
        """Predicts the configured target.

        Args:
          x: [B, H, W, C] noisy images or latents.
          t: [B] float time in the schedule's convention (scaled by `time_scale`).
          labels: [B] int32 in [0, num_classes]; `num_classes` is the null class;
            None = null class for a class-conditional model.
          context: [B, L, context_dim] text embeddings, or [B, L] int token ids
            when text_vocab_size > 0 (None = null caption).
          context_mask: [B, L] bool, True = real token.
          train: unused (DiT has no dropout); kept for the common signature.
          control_residuals: None (no control: the plain DiT) or N <= depth arrays
            [B, T, D] (T = (H/p)(W/p) tokens, D = hidden_size): block i's output
            becomes `block_i(x) + r_i` for i < N. Cast to the compute dtype. With
            `scan_layers` they are zero-padded to `depth` and scanned with the blocks.

        Returns:
          [B, H, W, C_out] float32, C_out = (out_channels or C) * (2 if learn_sigma else 1).
        """
        del train
        labels, context, context_mask = prepare_inputs(self, x, t, labels, context, context_mask)
        b, hh, ww, cin = x.shape
        p = self.patch_size
        gh, gw = hh // p, ww // p
        dt = L.get_dtype(self.dtype)
        out_ch = (self.out_channels or cin) * (2 if self.learn_sigma else 1)
        if control_residuals is not None:
            control_residuals = check_control_residuals(
                control_residuals, self.depth, b, gh * gw, self.hidden_size
            )

        x = add_positions(embed_patches(self, x), gh, gw)
        c = embed_condition(self, t, labels)

        block = block_factory(self, scanned=self.scan_layers)
        if self.scan_layers:
            x = _scan_blocks(
                block(name=STACKED_KEY), self.depth, x, c, context, context_mask, control_residuals
            )
        else:
            for i in range(self.depth):
                x = block(name=_block_name(i))(x, c, context, context_mask)
                if control_residuals is not None and i < len(control_residuals):
                    x = x + control_residuals[i].astype(x.dtype)

        x = FinalLayer(p * p * out_ch, dt, name="final")(x, c)
        return unpatchify(x, p, gh, gw).astype(jnp.float32)
