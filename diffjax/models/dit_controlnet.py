"""ControlNet for the DiT (issue 15): a trainable copy of the first N DiT blocks.

The control image (`control`, NHWC float in [0, 1], at the OUTPUT image resolution)
goes through a small condition embedding (diffusers' `ControlNetConditioningEmbedding`:
conv_in, SiLU, then per downsampling stage a 3x3 conv and a stride-2 3x3 conv, each
followed by SiLU; `control_downsample` = 2^stages pixels per model pixel: 8 for a
latent DiT with SD's VAE, 1 for a pixel DiT) and a ZERO-initialised patch embedding
('control_patch_embed') to D channels at the base's patch grid. That is added to the
ControlNet's own copy of the base's patch tokens of x; the fixed positions are added as
in the base. N copies of the base's blocks (same time/class/text conditioning) follow,
each followed by a zero-initialised Dense(D) 'control_proj{i}' whose output is residual
i. `DiT(..., control_residuals=residuals)` adds residual i to block i's output, so at
initialisation (zero projections) the base's output is unchanged bit for bit.

Params (names shared with the DiT are identical, so `init_from_base` copies them):
  patch_embed, time_embed, label_emb (num_classes > 0), text_encoder (text_vocab_size > 0),
  block0 .. block{N-1}                                   <- copied from the base
  controlnet_cond_embedding/{conv_in, blocks.0 ..}       random (diffusers' init scheme)
  control_patch_embed, control_proj0 .. control_proj{N-1}  zero

The ControlNet's blocks are never scanned: its `scan_layers` field only mirrors the
base's fields (the base may be scanned; `init_from_base` unstacks its blocks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models import layers as L
from diffjax.models.controlnet import ConditionEmbedding, control_stages, embedding_widths
from diffjax.models.dit import (
    CONTROL_PATCH_EMBED_KEY,
    STACKED_KEY,
    DiTFields,
    add_positions,
    block_factory,
    embed_condition,
    embed_patches,
    prepare_inputs,
    unstack_block_params,
)

Array = jax.Array

COND_EMBEDDING_KEY = "controlnet_cond_embedding"
_SHARED_KEYS = ("patch_embed", "time_embed", "label_emb", "text_encoder")


def _proj_name(i: int) -> str:
    return f"control_proj{i}"


class DiTControlNet(DiTFields):
    """A DiT ControlNet: returns the residuals for the first N blocks of a `DiT`.

    Build it with the base DiT's fields (`DiTFields`; `learn_sigma`, `out_channels` and
    `scan_layers` are not used) plus the control fields below.

    Attributes:
      control_depth: N, the controlled blocks (0 = depth // 2, at least 1).
      conditioning_channels: channels of the control image (0 = the input x's channels).
      control_downsample: control pixels per x pixel (a power of two): 8 for a latent
        DiT with an 8x VAE, 1 for a pixel DiT.
      embedding_channels: the condition embedding's widths (see
        `diffjax.models.controlnet.ConditionEmbedding`).
    """

    control_depth: int = 0
    conditioning_channels: int = 0
    control_downsample: int = 1
    embedding_channels: tuple[int, ...] = (16, 32)

    @property
    def num_control_blocks(self) -> int:
        """N: the number of residuals returned."""
        n = self.control_depth or max(1, self.depth // 2)
        if not 1 <= n <= self.depth:
            raise ValueError(
                f"DiTControlNet: control_depth={self.control_depth} must be in [1, depth="
                f"{self.depth}] (or 0 for depth // 2)."
            )
        return n

    def _check_control(self, control: Array, x: Array) -> None:
        b, hh, ww, cin = x.shape
        k = self.control_downsample
        control_stages(k)
        want_c = self.conditioning_channels or cin
        want = (b, hh * k, ww * k, want_c)
        if getattr(control, "ndim", 0) != 4 or tuple(control.shape) != want:
            raise ValueError(
                f"DiTControlNet: control must be [B, H*{k}, W*{k}, Cc] = {want} for x of shape "
                f"{tuple(x.shape)} (control_downsample={k}: the control image is at the "
                f"output image resolution; Cc = conditioning_channels or x's channels), got "
                f"{getattr(control, 'shape', None)}. Resize the control image or set "
                "control_downsample / conditioning_channels to match."
            )

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        labels: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        train: bool = False,
        *,
        control: Array,
    ) -> tuple[Array, ...]:
        """Computes the control residuals.

        Args:
          x, t, labels, context, context_mask, train: as for `DiT.__call__`.
          control: [B, H * control_downsample, W * control_downsample, Cc] float in [0, 1].

        Returns:
          N raw (unscaled) residuals [B, T, D] in the compute dtype, for
          `DiT(..., control_residuals=...)`.
        """
        del train
        n = self.num_control_blocks
        labels, context, context_mask = prepare_inputs(self, x, t, labels, context, context_mask)
        self._check_control(control, x)
        _, hh, ww, _ = x.shape
        p, d = self.patch_size, self.hidden_size
        dt = L.get_dtype(self.dtype)

        feat = ConditionEmbedding(
            0,
            embedding_widths(self.embedding_channels, self.control_downsample),
            control_stages(self.control_downsample),
            dt,
            name=COND_EMBEDDING_KEY,
        )(control)
        cond_tokens = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dt,
            param_dtype=jnp.float32,
            kernel_init=L.partitioned(
                nn.initializers.zeros_init(), (None, None, "conv_in", "conv_out")
            ),
            bias_init=L.partitioned(nn.initializers.zeros_init(), ("conv_out",)),
            name=CONTROL_PATCH_EMBED_KEY,
        )(feat)
        gh, gw = hh // p, ww // p
        h = embed_patches(self, x) + cond_tokens.reshape(-1, gh * gw, d)
        h = add_positions(h, gh, gw)
        c = embed_condition(self, t, labels)

        block = block_factory(self)
        residuals = []
        for i in range(n):
            h = block(name=f"block{i}")(h, c, context, context_mask)
            r = L.dense(d, ("embed", "mlp"), dtype=dt, kernel_init=nn.initializers.zeros_init(),
                        name=_proj_name(i))(h)  # fmt: skip
            residuals.append(L.constrain(r, L.TOKEN_AXES))
        return tuple(residuals)

    @staticmethod
    def init_from_base(base_params: Mapping[str, Any], controlnet_params: Mapping[str, Any]):
        """See the module-level `init_from_base`."""
        return init_from_base(base_params, controlnet_params)


def _shapes(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]
    return [(jax.tree_util.keystr(path), tuple(leaf.shape)) for path, leaf in leaves]


def init_from_base(
    base_params: Mapping[str, Any], controlnet_params: Mapping[str, Any]
) -> dict[str, Any]:
    """A DiT ControlNet's params with every shared part copied from its base DiT.

    Copied (the same subtrees, by name): 'patch_embed', 'time_embed', 'label_emb' (a
    class-conditional model), 'text_encoder' (a model with its own text encoder) and
    'block0' .. 'block{N-1}' (N = the ControlNet's control_proj count). A scanned base
    (`scan_layers=True`, blocks stacked under 'blocks') is unstacked first and its first
    N blocks are copied. Kept as initialised: 'controlnet_cond_embedding' (random),
    'control_patch_embed' and 'control_proj{i}' (zero), so the residuals are exactly
    zero and the base's output is unchanged.

    Args:
      base_params: the base DiT's params (the 'params' collection, boxed or not).
      controlnet_params: the ControlNet's initialised params (same boxing as the base's).

    Returns:
      A new params dict (the inputs are not modified).

    Raises:
      ValueError: a shared part missing from the base, or of another shape (the
        ControlNet was built with other fields than the base).
    """
    base = dict(base_params)
    if STACKED_KEY in base:
        base = dict(unstack_block_params(base))
    out = dict(controlnet_params)
    if CONTROL_PATCH_EMBED_KEY not in out:
        raise ValueError(
            "init_from_base: controlnet_params are not a DiTControlNet's params (no "
            f"'{CONTROL_PATCH_EMBED_KEY}'); pass (base_params, controlnet_params) in that order."
        )
    n = sum(1 for k in out if k.startswith("control_proj"))
    keys = [k for k in _SHARED_KEYS if k in out] + [f"block{i}" for i in range(n)]
    for k in keys:
        if k not in base:
            raise ValueError(
                f"init_from_base: the base DiT has no '{k}' params (it has {sorted(base)}); "
                "build the ControlNet with the base's fields (num_classes, text_vocab_size, "
                "depth >= control_depth)."
            )
        want, got = _shapes(out[k]), _shapes(base[k])
        if want != got:
            raise ValueError(
                f"init_from_base: '{k}' differs between base and ControlNet ({got} vs "
                f"{want}); build the ControlNet with the base's fields."
            )
        out[k] = base[k]
    return out
