#!/usr/bin/env bash
# Trains on the GPUs of one machine.
#
#   launch/local_multigpu.sh CONFIG WORKDIR [--config.a.b=v ...]
#   GPUS=0,1,2,3 launch/local_multigpu.sh configs/cifar10_ddpm.py runs/cifar10
#   NUM_PROCESSES=4 launch/local_multigpu.sh configs/digits.py:quick /tmp/mp
#
# By default one process drives every GPU: JAX's model is one process per host, and the
# mesh spans all local devices. NUM_PROCESSES=N starts N processes on localhost instead,
# each with its share of GPUS, joined through --coordinator_address. That is slower, but
# it runs the multi-host code paths (per-process data shards, cross-process collectives,
# multi-process checkpoints) on one machine. With JAX_PLATFORMS=cpu it runs on a machine
# without GPUs too (one CPU device per process).
#
# Environment (all optional):
#   GPUS            comma-separated GPU ids (default: $CUDA_VISIBLE_DEVICES, else every GPU
#                   nvidia-smi lists; with one process, unset means all GPUs)
#   NUM_PROCESSES   processes on localhost, dividing the GPU count (default 1)
#   PORT            coordinator port when NUM_PROCESSES > 1 (default 8476)
#   PYTHON          interpreter (default: the repository's .venv/bin/python, else python3)
#   XLA_PYTHON_CLIENT_MEM_FRACTION  GPU memory share JAX preallocates (default 0.90)
#   XLA_FLAGS       appended after DIFFJAX_GPU_XLA_FLAGS below; the last copy of a flag wins
#
# SIGTERM or Ctrl-C is passed to every process: each saves a checkpoint and exits 0, and
# rerunning the same command resumes.
set -euo pipefail

# Overlap collectives with compute, and fuse gradient all-reduces and FSDP all-gathers /
# reduce-scatters into 128 MiB buckets instead of one collective per parameter. The same
# list is in launch/slurm.sbatch and launch/k8s_jobset.yaml (tests/test_launchers.py
# checks that they agree and that the installed jaxlib knows every flag).
DIFFJAX_GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_all_reduce_combine_threshold_bytes=134217728 --xla_gpu_all_gather_combine_threshold_bytes=134217728 --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"

die() {
  echo "local_multigpu.sh: $*" >&2
  exit 2
}

(($# >= 2)) || die "usage: launch/local_multigpu.sh CONFIG WORKDIR [--config.a.b=v ...]"
config=$1
workdir=$2
shift 2

# Paths on the command line stay relative to the caller's directory.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
num_processes=${NUM_PROCESSES:-1}
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer, got '$num_processes'."

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export XLA_FLAGS="$DIFFJAX_GPU_XLA_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}"

gpus=${GPUS:-${CUDA_VISIBLE_DEVICES:-}}
if ((num_processes == 1)); then
  # exec: the training process itself receives SIGTERM / Ctrl-C.
  if [[ -n $gpus ]]; then export CUDA_VISIBLE_DEVICES=$gpus; fi
  exec "$PYTHON" "$root/launch/train.py" --config="$config" --workdir="$workdir" "$@"
fi

if [[ -z $gpus ]]; then
  command -v nvidia-smi >/dev/null || die "NUM_PROCESSES=$num_processes needs GPUS=0,1,... (nvidia-smi was not found to list them)."
  gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
fi
IFS=, read -r -a gpu_list <<<"$gpus"
num_gpus=${#gpu_list[@]}
((num_gpus % num_processes == 0)) ||
  die "NUM_PROCESSES=$num_processes must divide the number of GPUs ($num_gpus: $gpus)."
per_process=$((num_gpus / num_processes))

pids=()
stop() { # `local`: the trap interrupts the loop below, which uses $pid too.
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
}
trap stop TERM INT
for ((i = 0; i < num_processes; i++)); do
  devices=$(IFS=,; echo "${gpu_list[*]:i*per_process:per_process}")
  CUDA_VISIBLE_DEVICES=$devices "$PYTHON" "$root/launch/train.py" --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:${PORT:-8476}" --num_processes="$num_processes" \
    --process_id="$i" "$@" &
  pids+=($!)
done

# `wait` returns early when a trapped signal arrives; wait again while the process lives
# (it is saving a checkpoint), then take its real exit status.
status=0
for pid in "${pids[@]}"; do
  while :; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  if ((rc > 128)); then # The process may have exited just after a signal cut `wait` short.
    late=0
    wait "$pid" 2>/dev/null || late=$?
    ((late == 127)) || rc=$late
  fi
  if ((rc != 0 && status == 0)); then status=$rc; fi
done
exit "$status"
