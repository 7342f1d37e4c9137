"""Logical axis names -> mesh shardings that respect divisibility.

Flax's `nn.logical_to_mesh_sharding` applies `LOGICAL_AXIS_RULES` by name only,
so a small dimension (a 3-channel output conv, a 1-channel input) gets an 'fsdp'
spec it cannot be split by, and `device_put`/`jit` then refuse the array. Here a
rule is used only where the dimension divides evenly by the mesh axis; otherwise
the next rule in priority order is tried, and a parameter with no fitting
dimension is replicated.

Activations are constrained by logical names too (`layers.constrain` at the models'
block boundaries, `layers.TOKEN_AXES` / `FEATURE_MAP_AXES`). Those constraints bind
only where both a mesh and the rules are set, which `sharding_context(mesh)` does;
traced outside it they are no-ops.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffjax.models.layers import ACTIVATION_MESH, LOGICAL_AXIS_RULES

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def partition_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    axis_sizes: Mapping[str, int],
    rules: Rules = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The mesh PartitionSpec of one array from its logical axis names.

    Args:
      names: logical name per dimension (None = never sharded).
      shape: the array's shape.
      axis_sizes: mesh axis name -> size (e.g. `dict(mesh.shape)`).
      rules: (logical name, mesh axis, tuple of mesh axes, or None) pairs in
        priority order.

    Returns:
      A PartitionSpec using each mesh axis at most once, only on dimensions it divides.
    """
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} logical names {tuple(names)} for a {len(shape)}-d array.")
    out: list[str | tuple[str, ...] | None] = [None] * len(shape)
    used: set[str] = set()
    for logical, mesh_axis in rules:
        if mesh_axis is None or logical not in names:
            continue
        axes = (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis)
        if used.intersection(axes):
            continue
        size = math.prod(int(axis_sizes.get(a, 1)) for a in axes)
        i = list(names).index(logical)
        if out[i] is None and shape[i] % size == 0:
            out[i] = mesh_axis
            used.update(axes)
    return PartitionSpec(*out)


def param_partition_specs(
    boxed_params: Any,
    axis_sizes: Mapping[str, int],
    rules: Rules = LOGICAL_AXIS_RULES,
) -> Any:
    """PartitionSpecs for a (possibly abstract) tree of logically boxed params.

    The result has the structure of the *unboxed* tree; leaves without logical
    names are replicated (`PartitionSpec()`).
    """

    def one(leaf: Any) -> PartitionSpec:
        if _is_box(leaf):
            value = leaf.unbox()
            return partition_spec(leaf.names, value.shape, axis_sizes, rules)
        return PartitionSpec()

    return jax.tree.map(one, boxed_params, is_leaf=_is_box)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings on `mesh` for a tree of logically boxed params (see module docstring)."""
    specs = param_partition_specs(boxed_params, dict(mesh.shape), rules)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        specs,
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Binds the models' activation constraints (`layers.constrain`) to `mesh` while tracing.

    Sets the logical-axis rules (`nn.logical_axis_rules`) and the mesh the
    constraints use (`layers.ACTIVATION_MESH`; deliberately not `jax.set_mesh`, see
    there). Wrap the tracing of a jitted function (its first call, or `.lower(...)`)
    in it, `model.init` included; the compiled function runs without it. Outside it
    the constraints trace to nothing and XLA's sharding propagation alone decides
    how activations are laid out. JAX's trace cache does not see this context: a
    `jax.jit` object traced outside it keeps that trace for the same input types, so
    trace inside it first (or use a fresh `jax.jit`).

    Activation constraints follow Flax's rules by name (a batch that does not divide
    by the device count is padded, not refused), unlike `param_shardings`.
    """
    token = ACTIVATION_MESH.set(mesh)
    try:
        with nn.logical_axis_rules(tuple(rules)):
            yield
    finally:
        ACTIVATION_MESH.reset(token)
