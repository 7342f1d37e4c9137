"""Device mesh, shardings and multi-host set-up.

The mesh has two axes, `data` and `fsdp`. Batches are split over both (every device
sees a distinct slice of the global batch); parameters and optimizer state are split
over `fsdp` by logical-axis rules (`diffjax.models.param_shardings`), so `fsdp=1` is
pure data parallelism.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolves -1 entries of (data, fsdp) so that their product is `num_devices`."""
    sizes = [data, fsdp]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError("At most one of mesh.data and mesh.fsdp may be -1.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got data={data}, fsdp={fsdp}.")
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"Cannot fill the mesh: {num_devices} devices are not divisible by {known}."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if sizes[0] * sizes[1] != num_devices:
        raise ValueError(
            f"mesh.data={sizes[0]} x mesh.fsdp={sizes[1]} = {sizes[0] * sizes[1]} devices, "
            f"but {num_devices} are available; set one of them to -1 to fill."
        )
    return sizes[0], sizes[1]


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: all, every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices))
    # Auto axis types (the plain Mesh constructor): GSPMD propagates shardings through
    # the model, so an FSDP-sharded kernel next to a batch-sharded activation just works.
    try:
        from jax.experimental import mesh_utils

        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # Irregular topologies: plain order is still correct, only slower.
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-process batches into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def host_value(tree: Any) -> Any:
    """numpy copies of (replicated or process-local) arrays, on every process.

    A replicated output of a multi-process computation is not fully addressable, so
    `jax.device_get` refuses it; any local shard holds the whole value.
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> int:
    """Validates the global batch against devices and processes; returns the per-process size."""
    n = mesh.devices.size * grad_accum_steps
    if global_batch_size % n:
        raise ValueError(
            f"train.batch_size={global_batch_size} must be divisible by the device count "
            f"({mesh.devices.size}) x train.grad_accum_steps ({grad_accum_steps}) = {n}."
        )
    return global_batch_size // jax.process_count()


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int = 300,
) -> None:
    """Calls `jax.distributed.initialize` when running on several hosts.

    Explicit flags win. Without them JAX's own cluster detection reads the environment
    of SLURM, TPU VMs, Kubernetes (JobSet / Open MPI) when any is present; on a single
    host nothing happens.
    """
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                "--coordinator_address needs --num_processes and --process_id as well."
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout,
        )
        return
    if _cluster_environment_detected():
        jax.distributed.initialize(initialization_timeout=initialization_timeout)


def _cluster_environment_detected() -> bool:
    import os

    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        return True
    return False
