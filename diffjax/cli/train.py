"""Trains a diffusion model.

    python launch/train.py --config=configs/digits.py --workdir=runs/digits \
        [--config.train.num_steps=2000 ...]

Resumes automatically from WORKDIR/checkpoints. On several hosts, pass
--coordinator_address/--num_processes/--process_id, or let JAX read the cluster's
environment (under srun, Open MPI 4's mpirun, or on Cloud TPU VMs); see docs/cluster.md.
"""

from absl import flags

from diffjax.cli.common import config_flag, load_config, run, setup_logging

_CONFIG = config_flag()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics, samples).", required=True
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def main(argv):
    del argv
    setup_logging()
    from diffjax import parallel

    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = load_config(_CONFIG)

    from diffjax.train import train_and_evaluate

    train_and_evaluate(config, _WORKDIR.value)


def entry() -> None:
    """Console-script entry point (`diffjax-train`)."""
    run(main)
