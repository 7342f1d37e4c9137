"""Logical axis names -> mesh shardings that respect divisibility.

Flax's `nn.logical_to_mesh_sharding` applies `LOGICAL_AXIS_RULES` by name only,
so a small dimension (a 3-channel output conv, a 1-channel input) gets an 'fsdp'
spec it cannot be split by, and `device_put`/`jit` then refuse the array. Here a
rule is used only where the dimension divides evenly by the mesh axis; otherwise
the next rule in priority order is tried, and a parameter with no fitting
dimension is replicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffjax.models.layers import LOGICAL_AXIS_RULES


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def partition_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    axis_sizes: Mapping[str, int],
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The mesh PartitionSpec of one array from its logical axis names.

    Args:
      names: logical name per dimension (None = never sharded).
      shape: the array's shape.
      axis_sizes: mesh axis name -> size (e.g. `dict(mesh.shape)`).
      rules: (logical name, mesh axis or None) pairs in priority order.

    Returns:
      A PartitionSpec using each mesh axis at most once, only on dimensions it divides.
    """
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} logical names {tuple(names)} for a {len(shape)}-d array.")
    out: list[str | None] = [None] * len(shape)
    used: set[str] = set()
    for logical, mesh_axis in rules:
        if mesh_axis is None or mesh_axis in used or logical not in names:
            continue
        size = int(axis_sizes.get(mesh_axis, 1))
        i = list(names).index(logical)
        if out[i] is None and shape[i] % size == 0:
            out[i] = mesh_axis
            used.add(mesh_axis)
    return PartitionSpec(*out)


def param_partition_specs(
    boxed_params: Any,
    axis_sizes: Mapping[str, int],
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
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


def param_shardings(
    boxed_params: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES
) -> Any:
    """NamedShardings on `mesh` for a tree of logically boxed params (see module docstring)."""
    specs = param_partition_specs(boxed_params, dict(mesh.shape), rules)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        specs,
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )
