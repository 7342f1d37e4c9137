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
import jax.extend.core as jex_core
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
    def f(params, x, t, labels, context, context_mask, rng, **extra):
        return model.apply(
            {"params": params},
            x,
            t,
            labels,
            context,
            context_mask,
            train=train,
            rngs={"dropout": rng} if train else None,
            **extra,
        )

    return f


def _unscanned(model: nn.Module, params: Any) -> tuple[nn.Module, Any]:
    """The unscanned twin of a `scan_layers` DiT and its (abstract) params; else unchanged.

    XLA's cost analysis counts a loop body once, not once per iteration, so a scanned
    model's cost is read off the same network written out block by block.
    """
    if not getattr(model, "scan_layers", False):
        return model, params
    from diffjax.models.dit import unstack_block_params

    return model.clone(scan_layers=False), jax.eval_shape(
        unstack_block_params, nn.meta.unbox(params)
    )


def forward_flops(model: nn.Module, params: Any, inputs: dict[str, Any], **extra: Any) -> float:
    """XLA's flop count of one forward pass over `inputs` (a whole batch); `extra` are
    more abstract model keywords (a ControlNet's `control`).

    XLA counts a multiply-add as 2 flops, plus elementwise work. The count comes
    from the lowered, unoptimised program (no compile), so it is the same on every
    backend. A DiT with `scan_layers` is counted on its unscanned twin (the same
    arithmetic; XLA would count the scanned body once).
    """
    model, params = _unscanned(model, params)
    f = _forward(model)
    lowered = jax.jit(f).lower(
        nn.meta.unbox(params),
        **inputs,
        rng=jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
        **extra,
    )
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older JAX returned one dict per device.
        cost = cost[0]
    return float(cost["flops"])


def saved_activation_bytes(model: nn.Module, params: Any, inputs: dict[str, Any]) -> int:
    """Bytes of the activations a training forward keeps for the backward pass.

    These are the residuals of `jax.vjp` of the (train-mode) forward with respect
    to the params, not counting the params and inputs themselves: exactly what
    `remat_policy` trades against recomputation. Computed from the jaxpr (no
    compile, no allocation), so it is the same on every backend. It is an upper
    bound on what XLA keeps (fusion may recompute cheap elementwise residuals)
    and leaves out transient workspace inside the backward pass.

    Args:
      model: the model.
      params: (abstract) params.
      inputs: (abstract) inputs from `abstract_inputs`, at the batch of interest.
    """
    f = _forward(model, train=True)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    p_leaves, p_tree = jax.tree.flatten(nn.meta.unbox(params))
    in_leaves, in_tree = jax.tree.flatten((inputs, rng))

    def residuals(*leaves):
        p = jax.tree.unflatten(p_tree, leaves[: len(p_leaves)])
        args, key = jax.tree.unflatten(in_tree, leaves[len(p_leaves) :])
        _, vjp_fn = jax.vjp(lambda p: f(p, **args, rng=key), p)
        return jax.tree.leaves(vjp_fn)

    jaxpr = jax.make_jaxpr(residuals)(*p_leaves, *in_leaves).jaxpr
    known = set(jaxpr.invars) | set(jaxpr.constvars)
    seen: set[Any] = set()
    total = 0
    for v in jaxpr.outvars:
        # Literals (constants) and vars that are params/inputs cost nothing extra.
        if not isinstance(v, jex_core.Var) or v in known or v in seen:
            continue
        seen.add(v)
        total += int(np.prod(v.aval.shape, dtype=np.int64)) * v.aval.dtype.itemsize
    return total


def compiled_train_memory(model: nn.Module, params: Any, inputs: dict[str, Any]) -> dict[str, int]:
    """XLA's memory analysis of a compiled forward+backward on this backend.

    Backend specific: XLA:CPU, for one, drops the optimisation barriers that keep
    rematerialisation from being undone, so remat savings show up on GPU/TPU only.

    Returns:
      {'temp_bytes': temp buffers (activations and workspace), 'argument_bytes',
       'output_bytes'}.
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
        "temp_bytes": int(mem.temp_size_in_bytes),
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
    compile_memory: bool = False,
) -> dict[str, Any]:
    """Parameter count, forward cost per image and training activation memory.

    Args:
      model: an unbound model from `build_model`.
      image_size: H = W of the input.
      channels: C of the input.
      text_len: caption length for text-conditioned models.
      batch_size: batch of the activation-memory estimate.
      compile_memory: also compile the forward+backward and report XLA's temp
        buffer size on this backend (slow for big models on CPU).

    Returns:
      {'params': int, 'param_bytes': float32 params,
       'forward_gflops': per image, XLA flops / 1e9 (multiply-adds x 2 plus elementwise),
       'forward_gmacs': per image, half of that,
       'activation_memory_bytes': activations saved for the backward pass at
         `batch_size` (see `saved_activation_bytes`),
       'batch_size': int, and with compile_memory 'xla_temp_bytes'}.
    """
    kw = dict(image_size=image_size, channels=channels, text_len=text_len)
    one = abstract_inputs(model, batch_size=1, **kw)
    params = abstract_variables(model, one)["params"]
    n = count_params(params)
    flops = forward_flops(model, params, one)
    batch = abstract_inputs(model, batch_size=batch_size, **kw)
    out: dict[str, Any] = {
        "params": n,
        "param_bytes": 4 * n,
        "forward_gflops": flops / 1e9,
        "forward_gmacs": flops / 2e9,
        "batch_size": int(batch_size),
        "activation_memory_bytes": saved_activation_bytes(model, params, batch),
    }
    if compile_memory:
        out["xla_temp_bytes"] = compiled_train_memory(model, params, batch)["temp_bytes"]
    return out
