"""Building blocks shared by the U-Net, the DiT and the text encoder.

Every parameter is created float32 and carries logical axis names
(`nn.with_logical_partitioning`) so that `diffjax.parallel` can shard it by the
rules in `LOGICAL_AXIS_RULES`. Computation runs in a configurable dtype; norms
reduce in float32 and attention softmax runs in float32 even in bfloat16.

Logical axis names:
  embed     model width of a token / channel vector (DiT hidden, text width)
  mlp       hidden width of an MLP or of a conditioning projection
  heads     attention heads
  kv        per-head channels
  conv_in   input channels of a convolution kernel
  conv_out  output channels of a convolution kernel
  vocab     rows of an embedding table (classes, tokens)
  norm      scale/bias of a normalisation layer
  layers    the stacking axis of blocks run as one `nn.scan` (DiT `scan_layers`)

and of activations (sharding constraints at block boundaries, `TOKEN_AXES` and
`FEATURE_MAP_AXES`):
  batch     examples; split over every mesh axis, like the input batch
  length    tokens of a sequence
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Large param dims go to the 'fsdp' mesh axis, nothing else (no tensor parallelism).
# Flax assigns rules in order and never maps two dims of one array to the same
# mesh axis, so the order is the priority: the first listed name found in a
# parameter's axes is the one sharded. 'batch' comes first and takes both mesh axes
# (the batch split of `diffjax.parallel.BATCH_AXES`), so an activation keeps its
# width whole: FSDP gathers a block's weights, it never splits its activations by
# width. No parameter has a 'batch' axis, so the rule changes no parameter's sharding.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("mlp", "fsdp"),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", "fsdp"),
    ("vocab", "fsdp"),
    ("heads", None),
    ("kv", None),
    ("norm", None),
    ("layers", None),
    ("length", None),
)

# Logical names of the activations constrained at block boundaries (`constrain`).
TOKEN_AXES = ("batch", "length", "embed")  # DiT token stream [B, T, D]
FEATURE_MAP_AXES = ("batch", None, None, None)  # U-Net stream [B, H, W, C]

# The mesh that activation constraints bind to, set by `partitioning.sharding_context`.
# Not the global mesh of `jax.set_mesh`: under a global mesh with logical rules, Flax
# (0.12.8) re-applies a DenseGeneral kernel's logical constraint to the kernel
# flattened to 2-D (in init, and in the shape check of every apply), and the
# attention projections here then fail to trace.
ACTIVATION_MESH: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "diffjax_activation_mesh", default=None
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

ATTENTION_IMPLS = ("", "xla", "cudnn")

# Names accepted by `remat_policy`: 'none' (no rematerialisation), 'full'
# (recompute everything inside a block), or any plain policy of
# jax.checkpoint_policies (the factories that need arguments are excluded).
REMAT_POLICIES = (
    "none",
    "full",
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)


def get_dtype(name: str | Any) -> Any:
    """Maps a compute-dtype string ('float32' | 'bfloat16' | 'float16') to a jnp dtype."""
    if not isinstance(name, str):
        name = jnp.dtype(name).name
    if name not in DTYPES:
        raise ValueError(f"Unknown compute dtype {name!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[name]


def check_remat_policy(name: str) -> None:
    """Raises a clear error for an unknown `remat_policy` string."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat_policy {name!r}; use one of {list(REMAT_POLICIES)}.")


def maybe_remat(
    module_cls: type[nn.Module],
    policy: str,
    static_argnums: tuple[int, ...] = (),
    prevent_cse: bool = True,
):
    """Wraps a block class in `nn.remat` with a named checkpoint policy.

    Args:
      module_cls: the block class.
      policy: one of `REMAT_POLICIES`; 'none' returns the class unchanged.
      static_argnums: positions of Python-valued call arguments (such as `train`),
        counting `self` as 0.
      prevent_cse: keep XLA from merging the recomputation with the forward pass.
        A block that is the body of a scan does not need it (the loop already keeps
        them apart), and it costs optimisations there: pass False.
    """
    check_remat_policy(policy)
    if policy == "none":
        return module_cls
    fn = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
    return nn.remat(module_cls, policy=fn, static_argnums=static_argnums, prevent_cse=prevent_cse)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
    """Sharding constraint on an activation by logical axis names (`nn.with_logical_constraint`).

    Binds inside `diffjax.models.partitioning.sharding_context(mesh)`, or wherever
    `nn.logical_axis_rules` and a global mesh are both set; traced anywhere else it
    is a no-op (the program is unchanged).

    Args:
      x: the activation.
      axes: one logical name (or None) per dimension, e.g. `TOKEN_AXES`.
    """
    return nn.with_logical_constraint(x, tuple(axes), mesh=ACTIVATION_MESH.get())


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
    """An initializer whose parameter carries the logical axis `names`."""
    return nn.with_logical_partitioning(init, tuple(names))


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    dtype: Any,
    use_bias: bool = True,
    kernel_init: Callable = nn.initializers.lecun_normal(),
    name: str | None = None,
) -> nn.Dense:
    """A float32-parameter Dense layer computing in `dtype`, with logical axes (in, out)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(kernel_init, axes),
        bias_init=partitioned(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    dtype: Any,
    strides: int = 1,
    kernel_init: Callable = nn.initializers.lecun_normal(),
    name: str | None = None,
) -> nn.Conv:
    """A 'SAME'-padded square convolution with float32 params and logical axes."""
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding="SAME",
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=partitioned(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def group_norm(num_groups: int, channels: int, *, dtype: Any, name: str | None = None):
    """GroupNorm (eps 1e-5 as in DDPM/ADM) with a clear error for indivisible widths."""
    if channels % num_groups:
        raise ValueError(
            f"GroupNorm: {channels} channels are not divisible by num_groups={num_groups}; "
            "choose channel widths that are multiples of num_groups."
        )
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def layer_norm(
    *,
    dtype: Any,
    affine: bool = True,
    epsilon: float = 1e-6,
    fast_variance: bool = True,
    name: str | None = None,
) -> nn.LayerNorm:
    """LayerNorm; `affine=False` gives the parameter-free norm of adaLN blocks.

    `fast_variance=False` computes the variance in two passes, as PyTorch does: the
    one-pass E[x^2] - E[x]^2 loses precision on the large-magnitude channels of
    pretrained checkpoints (CLIP's), so the ports of pretrained models use it.
    """
    return nn.LayerNorm(
        epsilon=epsilon,
        use_scale=affine,
        use_bias=affine,
        use_fast_variance=fast_variance,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def rms_norm(*, dtype: Any, epsilon: float = 1e-6, name: str | None = None) -> nn.RMSNorm:
    """RMSNorm with a learned scale."""
    return nn.RMSNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
        name=name,
    )


def make_norm(kind: str, channels: int, *, dtype: Any, num_groups: int = 32, name=None):
    """Norm by name: 'group' | 'layer' | 'rms'."""
    if kind == "group":
        return group_norm(num_groups, channels, dtype=dtype, name=name)
    if kind == "layer":
        return layer_norm(dtype=dtype, name=name)
    if kind == "rms":
        return rms_norm(dtype=dtype, name=name)
    raise ValueError(f"Unknown norm {kind!r}; use 'group', 'layer' or 'rms'.")


# ----------------------------------------------------------------------------- time embeddings


def sinusoidal_embedding(
    t: Array,
    dim: int,
    max_period: float = 10000.0,
    *,
    freq_shift: float = 0.0,
    flip_sin_to_cos: bool = True,
) -> Array:
    """Transformer sinusoidal features of a scalar per example (ADM/DiT convention).

    Args:
      t: [B] float (already multiplied by the model's `time_scale`).
      dim: output width (even).
      max_period: the lowest frequency is about 1/max_period.
      freq_shift: f_i = max_period^(-i/(dim/2 - freq_shift)); 0 in ADM/DiT/Stable
        Diffusion, 1 in diffusers' DiT (`downscale_freq_shift`).
      flip_sin_to_cos: `[cos, sin]` (True, ADM/DiT/SD) or `[sin, cos]` (False).

    Returns:
      [B, dim] float32, `[cos(t f_i), sin(t f_i)]` (or `[sin, cos]`).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal_embedding needs an even dim, got {dim}.")
    half = dim // 2
    freqs = jnp.exp(
        -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    )
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    return jnp.concatenate(parts, axis=-1)


@functools.lru_cache(maxsize=32)
def _fourier_frequencies(half: int, scale: float) -> np.ndarray:
    # Fixed (not trained, not in params) so weight decay and EMA never touch it;
    # a fixed seed keeps every model with the same (half, scale) identical.
    return (np.random.default_rng(0).standard_normal(half) * scale).astype(np.float32)


def fourier_embedding(t: Array, dim: int, scale: float = 16.0) -> Array:
    """Random Fourier features of a scalar (Tancik et al.; score-SDE NCSN++).

    Args:
      t: [B] float (typically log-sigma or continuous time, times `time_scale`).
      dim: output width (even).
      scale: std of the Gaussian frequencies.

    Returns:
      [B, dim] float32, `[sin(2 pi w t), cos(2 pi w t)]` with w ~ N(0, scale^2) fixed.
    """
    if dim % 2:
        raise ValueError(f"fourier_embedding needs an even dim, got {dim}.")
    w = jnp.asarray(_fourier_frequencies(dim // 2, float(scale)))
    args = 2.0 * jnp.pi * t.astype(jnp.float32)[:, None] * w[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


TIME_EMBEDDINGS = ("sinusoidal", "fourier")


class TimestepEmbedding(nn.Module):
    """t -> (time_scale * t) -> sinusoidal/Fourier features -> Dense, SiLU, Dense.

    Attributes:
      features: output width.
      frequency_dim: width of the fixed feature vector.
      kind: 'sinusoidal' | 'fourier'.
      time_scale: multiplies t before the features (e.g. 1000 for t in [0, 1]).
      freq_shift: `sinusoidal_embedding`'s frequency shift (0 = ADM/DiT; 1 =
        diffusers' DiT, `downscale_freq_shift=1`).
      dtype: compute dtype.
      kernel_init: init of both Dense kernels.
    """

    features: int
    frequency_dim: int
    kind: str = "sinusoidal"
    time_scale: float = 1.0
    freq_shift: float = 0.0
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, t: Array) -> Array:
        """[B] float -> [B, features]."""
        t = t.astype(jnp.float32) * self.time_scale
        if self.kind == "sinusoidal":
            e = sinusoidal_embedding(t, self.frequency_dim, freq_shift=self.freq_shift)
        elif self.kind == "fourier":
            e = fourier_embedding(t, self.frequency_dim)
        else:
            raise ValueError(f"Unknown time embedding {self.kind!r}; use one of {TIME_EMBEDDINGS}.")
        e = dense(self.features, ("embed", "mlp"), dtype=self.dtype, kernel_init=self.kernel_init)(
            e
        )
        e = nn.silu(e)
        return dense(
            self.features,
            ("mlp", "embed"),
            dtype=self.dtype,
            kernel_init=self.kernel_init,
        )(e)


# ----------------------------------------------------------------------------- attention


def attention(
    q: Array, k: Array, v: Array, mask: Array | None = None, implementation: str = ""
) -> Array:
    """Scaled dot-product attention through `jax.nn.dot_product_attention`.

    A query row whose keys are all masked out (an empty caption) attends to
    nothing: its output is exactly zero, with zero (not NaN) gradients.

    Args:
      q: [B, T, N, H] queries (batch, sequence, heads, head_dim).
      k: [B, S, N, H] keys.
      v: [B, S, N, H] values.
      mask: optional [B, S] bool, True = real key.
      implementation: '' or None (let JAX choose), 'xla' or 'cudnn' (fused flash
        attention on NVIDIA GPUs; needs bfloat16/float16 and head_dim <= 128, a
        multiple of 8).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    implementation = implementation or ""  # None (JAX's own default) is the same as ''.
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects [batch, seq, heads, head_dim] arrays, got "
            f"q{q.shape} k{k.shape} v{v.shape}."
        )
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(
            f"Unknown attention_impl {implementation!r}; use '' (auto), 'xla' or 'cudnn'."
        )
    if implementation == "cudnn" and q.dtype == jnp.float32:
        raise ValueError(
            "attention_impl='cudnn' needs a bfloat16/float16 compute dtype; "
            "set dtype='bfloat16' or attention_impl='xla'."
        )
    impl = implementation or None
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)
    if mask.shape != (k.shape[0], k.shape[1]):
        raise ValueError(f"attention mask must be [B, S]={k.shape[:2]}, got {mask.shape}.")
    mask = mask.astype(bool)
    has_key = jnp.any(mask, axis=-1)  # [B]
    # Rows without any real key get a dummy full mask so no implementation sees
    # an all -inf softmax; their output is then replaced by zeros.
    safe = mask | ~has_key[:, None]
    mask4 = safe[:, None, None, :]  # [B, 1, 1, S], broadcast over heads and queries
    if implementation == "cudnn":
        # cuDNN turns the mask into a bias and requires its query length to be T.
        mask4 = jnp.broadcast_to(mask4, (q.shape[0], 1, q.shape[1], k.shape[1]))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask4, implementation=impl)
    return jnp.where(has_key[:, None, None, None], out, jnp.zeros_like(out))


class MultiHeadAttention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention to `context`.

    Attributes:
      num_heads: heads N.
      head_dim: channels per head H; the inner width is N * H.
      out_features: output width (defaults to the query width).
      qkv_bias: bias on the q/k/v projections.
      zero_out: zero-initialise the output projection (residual branches).
      attention_impl: '' | 'xla' | 'cudnn'.
      dtype: compute dtype.
      kernel_init: init of the projections.
    """

    num_heads: int
    head_dim: int
    out_features: int = 0
    qkv_bias: bool = True
    zero_out: bool = False
    attention_impl: str = ""
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(
        self, x: Array, context: Array | None = None, context_mask: Array | None = None
    ) -> Array:
        """x [B, T, D], context [B, S, Dc] (None = self-attention), mask [B, S] -> [B, T, D']."""
        kv_in = x if context is None else context

        def proj(name: str):
            return nn.DenseGeneral(
                (self.num_heads, self.head_dim),
                use_bias=self.qkv_bias,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=partitioned(self.kernel_init, ("embed", "heads", "kv")),
                bias_init=partitioned(nn.initializers.zeros_init(), ("heads", "kv")),
                name=name,
            )

        q = proj("query")(x)
        k = proj("key")(kv_in)
        v = proj("value")(kv_in)
        out = attention(q, k, v, context_mask, self.attention_impl)
        out_init = nn.initializers.zeros_init() if self.zero_out else self.kernel_init
        return nn.DenseGeneral(
            self.out_features or x.shape[-1],
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=partitioned(out_init, ("heads", "kv", "embed")),
            bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)),
            name="out",
        )(out)


def num_heads_for(channels: int, num_heads: int, head_channels: int) -> tuple[int, int]:
    """(heads, head_dim) from either a fixed head count or a fixed head width (ADM)."""
    if head_channels > 0:
        if channels % head_channels:
            raise ValueError(
                f"{channels} channels are not divisible by head_channels={head_channels}."
            )
        return channels // head_channels, head_channels
    if num_heads <= 0 or channels % num_heads:
        raise ValueError(f"{channels} channels are not divisible by num_heads={num_heads}.")
    return num_heads, channels // num_heads


def check_context(
    context: Array | None, context_mask: Array | None, context_dim: int, batch: int
) -> tuple[Array | None, Array | None]:
    """Validates text conditioning; returns (context, mask) with a null caption for None.

    A model built with `context_dim > 0` called without context gets one
    all-masked token (the null caption), so init and apply create the same params.
    """
    if context_dim <= 0:
        if context is not None:
            raise ValueError(
                "context was given but the model has context_dim=0; build it with "
                "context_dim=<text embedding width> for text conditioning."
            )
        return None, None
    if context is None:
        return null_context(batch, context_dim)
    if context.ndim != 3 or context.shape[-1] != context_dim or context.shape[0] != batch:
        raise ValueError(f"context must be [{batch}, L, {context_dim}], got {context.shape}.")
    if context_mask is None:
        context_mask = jnp.ones(context.shape[:2], bool)
    if context_mask.shape != context.shape[:2]:
        raise ValueError(
            f"context_mask must be [B, L]={context.shape[:2]}, got {context_mask.shape}."
        )
    return context, context_mask.astype(bool)


def null_context(batch: int, context_dim: int) -> tuple[Array, Array]:
    """One all-masked zero token per example: the null caption."""
    return jnp.zeros((batch, 1, context_dim), jnp.float32), jnp.zeros((batch, 1), bool)


def check_labels(labels: Array | None, num_classes: int, batch: int) -> Array | None:
    """Validates class labels; None means the null class for a conditional model.

    Args:
      labels: [B] int, values in [0, num_classes]; `num_classes` is the null class.
      num_classes: number of real classes (0 = unconditional model).
      batch: B.

    Returns:
      [B] int32 labels, or None for an unconditional model.
    """
    if num_classes <= 0:
        if labels is not None:
            raise ValueError(
                "labels were given but the model has num_classes=0; build it with "
                "num_classes=K for class conditioning."
            )
        return None
    if labels is None:
        return jnp.full((batch,), num_classes, jnp.int32)
    if labels.shape != (batch,):
        raise ValueError(f"labels must be [B]=({batch},), got {labels.shape}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
    return labels.astype(jnp.int32)


def class_embedding(num_classes: int, features: int, *, init: Callable, name: str = "label_emb"):
    """An embedding table of num_classes + 1 rows; the last row is the null class."""
    return nn.Embed(
        num_classes + 1,
        features,
        param_dtype=jnp.float32,
        embedding_init=partitioned(init, ("vocab", "embed")),
        name=name,
    )


def check_inputs(x: Array, t: Array) -> None:
    """Shape checks shared by every model: x [B, H, W, C], t [B]."""
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}.")
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be [B]=({x.shape[0]},), got shape {t.shape}.")
