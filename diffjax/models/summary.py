"""Parameter counts, forward cost and activation memory of a model, computed abstractly.

Nothing here allocates parameters: shapes come from `jax.eval_shape(model.init)`
and costs from XLA's analyses of the lowered (or compiled) program, so the
largest presets can be inspected on a laptop. Benchmarks use
`model_summary(...)['forward_gflops']` to turn throughput into MFU.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def abstract_inputs(
    model: nn.Module,
    *,
    batch_size: int,
    image_size: int,
    channels: int,
    text_len: int = 0,
) -> dict[str, Any]:
    """Abstract model inputs (`jax.ShapeDtypeStruct`s) matching the model's conditioning.

    Labels are included when the model has `num_classes > 0`; a context of
    `text_len` tokens (at least 1) when it has `context_dim > 0`: embeddings
    [B, L, context_dim], or token ids [B, L] for a model with its own text encoder.

    Returns:
      {'x': [B, S, S, C], 't': [B], 'labels': [B] | None, 'context': [B, L, D] | None,
       'context_mask': [B, L] | None}.
    """
    b = batch_size
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    context_dim = int(getattr(model, "context_dim", 0) or 0)
    sds = jax.ShapeDtypeStruct
    inputs: dict[str, Any] = {
        "x": sds((b, image_size, image_size, channels), jnp.float32),
        "t": sds((b,), jnp.float32),
        "labels": sds((b,), jnp.int32) if num_classes > 0 else None,
        "context": None,
        "context_mask": None,
    }
    if context_dim > 0:
        length = max(int(text_len), 1)
        if int(getattr(model, "text_vocab_size", 0) or 0) > 0:
            inputs["context"] = sds((b, length), jnp.int32)  # token ids for the own encoder
        else:
            inputs["context"] = sds((b, length, context_dim), jnp.float32)
        inputs["context_mask"] = sds((b, length), jnp.bool_)
    return inputs


def abstract_variables(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """`jax.eval_shape` of `model.init`: boxed (logically partitioned) abstract variables."""

    def init(x, t, labels, context, context_mask):
        return model.init(jax.random.key(0), x, t, labels, context, context_mask)

    return jax.eval_shape(init, **inputs)


def count_params(params: Any) -> int:
    """Total number of scalars in a (possibly boxed or abstract) parameter tree."""
    return int(
        sum(np.prod(a.shape, dtype=np.int64) for a in jax.tree.leaves(nn.meta.unbox(params)))
    )


def _forward(model: nn.Module, train: bool = False):
    def f(params, x, t, labels, context, context_mask, rng):
        return model.apply(
            {"params": params},
            x,
            t,
            labels,
            context,
            context_mask,
            train=train,
            rngs={"dropout": rng} if train else None,
        )

    return f


def forward_flops(model: nn.Module, params: Any, inputs: dict[str, Any]) -> float:
    """XLA's flop count of one forward pass over `inputs` (a whole batch).

    XLA counts a multiply-add as 2 flops, plus elementwise work. The count comes
    from the lowered, unoptimised program (no compile), so it is the same on every
    backend.
    """
    f = _forward(model)
    lowered = jax.jit(f).lower(
        nn.meta.unbox(params), **inputs, rng=jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    )
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older JAX returned one dict per device.
        cost = cost[0]
    return float(cost["flops"])


def train_step_memory(model: nn.Module, params: Any, inputs: dict[str, Any]) -> dict[str, int]:
    """Memory of a compiled forward+backward (gradient of a mean-square loss) on this backend.

    Returns:
      {'activation_memory_bytes': XLA temp buffers (saved activations and
       workspace; excludes params and gradients), 'argument_bytes', 'output_bytes'}.
    """
    f = _forward(model, train=True)

    def loss(params, x, t, labels, context, context_mask, rng):
        return jnp.mean(f(params, x, t, labels, context, context_mask, rng) ** 2)

    compiled = (
        jax.jit(jax.grad(loss))
        .lower(
            nn.meta.unbox(params),
            **inputs,
            rng=jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
        )
        .compile()
    )
    mem = compiled.memory_analysis()
    return {
        "activation_memory_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
    }


def model_summary(
    model: nn.Module,
    *,
    image_size: int,
    channels: int,
    text_len: int = 0,
    batch_size: int = 1,
    memory: bool = True,
) -> dict[str, Any]:
    """Parameter count, forward cost per image and training activation memory.

    Args:
      model: an unbound model from `build_model`.
      image_size: H = W of the input.
      channels: C of the input.
      text_len: caption length for text-conditioned models.
      batch_size: batch for the activation-memory estimate.
      memory: compile the forward+backward for `activation_memory_bytes` (slow
        for large models on CPU); False reports -1.

    Returns:
      {'params': int, 'forward_gflops': per image, XLA flops / 1e9 (multiply-adds x 2),
       'forward_gmacs': per image (half of that), 'activation_memory_bytes': int,
       'batch_size': int, 'param_bytes': float32 params}.
    """
    one = abstract_inputs(
        model, batch_size=1, image_size=image_size, channels=channels, text_len=text_len
    )
    params = abstract_variables(model, one)["params"]
    n = count_params(params)
    flops = forward_flops(model, params, one)
    out: dict[str, Any] = {
        "params": n,
        "param_bytes": 4 * n,
        "forward_gflops": flops / 1e9,
        "forward_gmacs": flops / 2e9,
        "batch_size": int(batch_size),
        "activation_memory_bytes": -1,
    }
    if memory:
        batch = abstract_inputs(
            model,
            batch_size=batch_size,
            image_size=image_size,
            channels=channels,
            text_len=text_len,
        )
        out["activation_memory_bytes"] = train_step_memory(model, params, batch)[
            "activation_memory_bytes"
        ]
    return out
