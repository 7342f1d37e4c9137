"""Device mesh, shardings and multi-host set-up.

The mesh has two axes, `data` and `fsdp`. Batches are split over both (every device
sees a distinct slice of the global batch); parameters and optimizer state are split
over `fsdp` by logical-axis rules (`diffjax.models.param_shardings`), so `fsdp=1` is
pure data parallelism.
"""

from __future__ import annotations

import functools
import logging
import os
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


def gather(tree: Any) -> Any:
    """numpy copies of whole (possibly sharded, multi-process) arrays, on every process.

    Every process must call it (a collective when arrays span processes).
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
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


# Dense bf16 tensor-core peaks (FLOP/s) by substring of `device.device_kind`, first match
# wins, from NVIDIA's and Google's data sheets (no sparsity). Used for MFU.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
    """A device's dense bf16 peak FLOP/s from its `device_kind`, None when unknown (CPU)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_kind.lower():
            return flops
    return None


# XLA:CPU in jaxlib 0.10 hands single dots, single convolutions and reductions to
# YNNPACK by default. Its convolutions are slower than XLA's own on diffusion U-Nets:
# without them the digits U-Net's train step ran 1.25x and its sampler 1.33x faster,
# the DiT (one convolution) unchanged. YNNPACK's reductions are worth 1.1-1.5x on the
# DiT train step but cost the U-Net sampler 10% (no effect on the DiT sampler), so the
# train step keeps them and the samplers do not. BENCHMARKS.md, experiment `cpu_fusions`.
_YNN = "xla_cpu_experimental_ynn_fusion_type"
CPU_COMPILER_OPTIONS = {
    "train": {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"},
    "sample": {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


@functools.cache
def compiler_options(platform: str | None = None, program: str = "train") -> dict[str, str]:
    """XLA options for the train step (`program='train'`) or a sampler (`'sample'`).

    `CPU_COMPILER_OPTIONS[program]` when `platform` (default: the default backend) is
    a CPU, nothing elsewhere. An option the user set in `XLA_FLAGS` is left to them,
    and options this jaxlib does not know are dropped with a warning (checked once
    per process and program by compiling a tiny function).
    """
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return {}
    user_flags = os.environ.get("XLA_FLAGS", "")
    wanted = CPU_COMPILER_OPTIONS[program]
    options = {k: v for k, v in wanted.items() if f"--{k}" not in user_flags}
    if not options:
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except Exception as e:  # noqa: BLE001 - any rejection means "not supported here"
        logging.getLogger(__name__).warning(
            "XLA options %s not accepted by this jaxlib (%s); using XLA's defaults.",
            sorted(options),
            str(e).splitlines()[0],
        )
        return {}
    return options


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int = 300,
) -> None:
    """Calls `jax.distributed.initialize` when running as several processes.

    Explicit arguments win: given any of them, all three must be known (the address may
    come from `JAX_COORDINATOR_ADDRESS`), and JAX's cluster detection is switched off so
    nothing in the environment overrides them. Without them, JAX's own detection runs
    when `_cluster_environment_detected()` finds a cluster that JAX will recognise (an
    `srun` step of several tasks, an Open MPI 4 `mpirun`, a Cloud TPU VM, an indexed
    Kubernetes Job with the `kubernetes` package); otherwise nothing happens.

    Under SLURM and Open MPI, JAX shows each process only the GPU numbered by its local
    rank. That suits one process per GPU; with one process per host (diffjax's
    launchers) it would hide every GPU but the first, so there all local GPUs stay
    visible. `JAX_LOCAL_DEVICE_IDS`, when set, is left to JAX.

    Args:
        coordinator_address: `host:port` of process 0.
        num_processes: the total number of processes.
        process_id: this process's index, in `[0, num_processes)`.
        initialization_timeout: seconds to wait for every process to connect.

    Raises:
        ValueError: incomplete or inconsistent explicit arguments, or several processes
            started by a launcher that JAX cannot detect.
    """
    import logging
    import os

    env = os.environ
    if coordinator_address or num_processes is not None or process_id is not None:
        coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
        missing = [
            name
            for name, value in (
                ("--coordinator_address (or JAX_COORDINATOR_ADDRESS)", coordinator_address),
                ("--num_processes", num_processes),
                ("--process_id", process_id),
            )
            if value is None or value == ""
        ]
        if missing:
            raise ValueError(
                "A multi-process run set up by flags needs --coordinator_address=HOST:PORT, "
                f"--num_processes and --process_id together; missing: {', '.join(missing)}."
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} must be in [0, {num_processes}) for "
                f"--num_processes={num_processes}."
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout,
            cluster_detection_method="deactivate",
        )
        return

    if not _cluster_environment_detected():
        return
    # JAX tries Open MPI before SLURM, so the layout is read from the one it will use.
    if "OMPI_MCA_orte_hnp_uri" in env:
        one_per_host = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") == "1"
    elif "SLURM_STEP_NODELIST" in env:
        one_per_host = env.get("SLURM_NTASKS") == env.get("SLURM_STEP_NUM_NODES")
    else:  # TPU and Kubernetes: JAX restricts no devices.
        one_per_host = False
    names = ("jax_cuda_visible_devices", "jax_rocm_visible_devices")
    before = {name: jax.config.read(name) for name in names}
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
    if one_per_host and not env.get("JAX_LOCAL_DEVICE_IDS"):
        for name, value in before.items():
            if jax.config.read(name) != value:
                logging.getLogger(__name__).info(
                    "One process per host: %s back to %r (JAX had set %r, its local rank).",
                    name,
                    value,
                    jax.config.read(name),
                )
                jax.config.update(name, value)


def _cluster_environment_detected() -> bool:
    """Whether `jax.distributed.initialize()` without arguments will find several processes.

    Follows JAX 0.10's detectors (`jax._src.clusters`) in their order and reads the same
    variables, so initialisation is attempted exactly when it can succeed:

    - Open MPI 4 and older (`OmpiCluster`): `OMPI_MCA_orte_hnp_uri` is set (by `mpirun`
      / `mpiexec` only); several processes when `OMPI_COMM_WORLD_SIZE` > 1.
    - SLURM (`SlurmCluster`): `SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS`,
      `SLURM_PROCID` and `SLURM_LOCALID` are all set, which holds inside an `srun` step
      only; several processes when `SLURM_NTASKS` > 1. A batch script or `salloc` shell
      has no `SLURM_STEP_NODELIST`: run there, a multi-task job is one process (with a
      warning), as JAX would not detect it.
    - Cloud TPU (`GkeTpuCluster`, `GceTpuCluster`): JAX found libtpu and TPU chips when
      it was imported (`running_in_cloud_tpu_vm`), and GKE's `TPU_PROCESS_ADDRESSES` or
      `TPU_WORKER_HOSTNAMES` is set or the GCE metadata server may be asked
      (`TPU_SKIP_MDS_QUERY` unset). True on a one-host TPU VM too, where JAX starts a
      one-process runtime (the worker count is on the metadata server, not in the
      environment).
    - Kubernetes (`K8sCluster`): `KUBERNETES_SERVICE_HOST` is set, the `kubernetes`
      package is importable, and the pod belongs to an indexed Job
      (`JOB_COMPLETION_INDEX`, which JAX reads as the process id).

    Raises:
        ValueError: several processes were started by a launcher that JAX 0.10 does not
            detect (Open MPI 5, MPICH / Intel MPI, MVAPICH, an indexed Kubernetes Job
            without the `kubernetes` package), or `JAX_COORDINATOR_ADDRESS` is set with
            nothing to give the process count and id. Each process would otherwise
            train alone into the same workdir.
    """
    import importlib.util
    import logging
    import os

    from jax._src import cloud_tpu_init

    env = os.environ

    def integer(name: str, default: str = "1") -> int:
        value = env.get(name, default)
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"Environment variable {name}={value!r} is not an integer.") from None

    if "OMPI_MCA_orte_hnp_uri" in env:
        return integer("OMPI_COMM_WORLD_SIZE") > 1
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in env for name in slurm):
        return integer("SLURM_NTASKS") > 1
    if "SLURM_JOB_ID" in env and integer("SLURM_NTASKS") > 1:
        logging.getLogger(__name__).warning(
            "SLURM job %s has %d tasks, but this process was not started by srun, so it "
            "trains alone. Launch it with srun (see launch/slurm.sbatch) to use them all.",
            env["SLURM_JOB_ID"],
            integer("SLURM_NTASKS"),
        )
    if getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False) and (
        "TPU_PROCESS_ADDRESSES" in env
        or "TPU_WORKER_HOSTNAMES" in env
        or "TPU_SKIP_MDS_QUERY" not in env
    ):
        return True
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        if importlib.util.find_spec("kubernetes") is not None:
            return True
        index = integer("JOB_COMPLETION_INDEX")
        if index > 0:
            raise ValueError(
                f"This pod is index {index} of an indexed Kubernetes Job, but no "
                "--coordinator_address/--num_processes/--process_id were given and JAX's "
                "Kubernetes detection needs the `kubernetes` package (pip install "
                "'jax[k8s]') and permission to read pods and jobs. Pass the flags, as "
                "launch/k8s_jobset.yaml does."
            )
    for size, rank, launcher in (
        ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "Open MPI 5 (no OMPI_MCA_orte_hnp_uri)"),
        ("PMI_SIZE", "PMI_RANK", "MPICH / Intel MPI"),
        ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MVAPICH"),
    ):
        n = integer(size)
        if n > 1:
            raise ValueError(
                f"{launcher} started {n} processes ({size}={n}), but JAX {jax.__version__} "
                "cannot detect this launcher, so each would train alone into the same "
                f"workdir. Pass --coordinator_address=RANK0_HOST:PORT --num_processes={n} "
                f"--process_id=${rank}, or launch with srun."
            )
    if env.get("JAX_COORDINATOR_ADDRESS"):
        raise ValueError(
            "JAX_COORDINATOR_ADDRESS is set, but no cluster environment gives the process "
            "count and id: pass --num_processes and --process_id as well."
        )
    return False
