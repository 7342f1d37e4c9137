#!/usr/bin/env bash
# Trains on a Cloud TPU VM: one host or a pod slice. The same command runs on every
# worker, and JAX finds its peers itself (worker number and addresses on the metadata
# server, or TPU_WORKER_HOSTNAMES / TPU_WORKER_ID on GKE), so train.py needs no
# --coordinator_address.
#
#   export TPU_NAME=my-v5e-32 ZONE=us-west4-a
#   launch/tpu_vm.sh setup                                    # once, and after code changes
#   launch/tpu_vm.sh train CONFIG WORKDIR [--config.a.b=v ...]
#   DETACH=1 launch/tpu_vm.sh train CONFIG WORKDIR ...         # survives the ssh session
#   launch/tpu_vm.sh stop                                     # checkpoint and stop a detached run
#
# setup  copies this checkout (tracked and untracked files that git does not ignore) to
#        ~/$REMOTE_DIR on every worker and installs it with jax[tpu] into its .venv.
# train  runs launch/train.py on every worker at once, in the foreground (output of all
#        workers interleaved), or with DETACH=1 under nohup (log in ~/$REMOTE_DIR/train.log
#        and pid in train.pid on each worker).
# stop   sends SIGTERM to the detached run on every worker: they save a checkpoint at the
#        same step and exit 0. Rerunning `train` resumes from it.
#
# WORKDIR must be a directory that every worker sees at the same path (a Cloud Storage
# bucket mounted with gcsfuse, a Filestore share): every process reads config.json and
# writes its part of each checkpoint. diffjax uses plain file I/O, so gs:// URLs do not work.
#
# Environment: TPU_NAME and ZONE (required); PROJECT (default: gcloud's configured one);
# REMOTE_DIR (default diffjax, relative to the home directory on the workers); DETACH.
set -euo pipefail

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

usage="usage: launch/tpu_vm.sh setup | train CONFIG WORKDIR [--config.a.b=v ...] | stop"
(($# >= 1)) || die "$usage"
action=$1
shift
[[ -n ${TPU_NAME:-} ]] || die "set TPU_NAME to the TPU VM's name."
[[ -n ${ZONE:-} ]] || die "set ZONE to the TPU VM's zone."
remote_dir=$(printf '%q' "${REMOTE_DIR:-diffjax}")
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

gcloud_tpu() { # gcloud_tpu VERB ARGS...: `gcloud compute tpus tpu-vm VERB` on every worker
  local verb=$1
  shift
  gcloud compute tpus tpu-vm "$verb" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all
}

case $action in
  setup)
    (($# == 0)) || die "$usage"
    archive=$(mktemp "${TMPDIR:-/tmp}/diffjax-src.XXXXXX")
    trap 'rm -f "$archive"' EXIT
    # Tracked files deleted from the checkout are skipped (--ignore-failed-read).
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
      tar --null --files-from=- --ignore-failed-read -czf "$archive")
    gcloud_tpu scp "$archive" "$TPU_NAME:diffjax-src.tar.gz"
    # Ubuntu TPU images may lack python3-venv (ensurepip); install it when venv fails.
    gcloud_tpu ssh "$TPU_NAME" --command="set -euo pipefail
mkdir -p $remote_dir && tar -xzf diffjax-src.tar.gz -C $remote_dir && rm diffjax-src.tar.gz
cd $remote_dir
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || { rm -rf .venv && sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv && python3 -m venv .venv; }
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e . 'jax[tpu]>=0.10.0,<0.11'
.venv/bin/python -c 'import jax, libtpu; print(\"diffjax ready on\", jax.__version__)'"
    ;;
  train)
    (($# >= 2)) || die "$usage"
    config=$1
    workdir=$2
    shift 2
    train="$(printf '%q ' .venv/bin/python launch/train.py "--config=$config" "--workdir=$workdir" "$@")"
    if [[ -n ${DETACH:-} ]]; then
      gcloud_tpu ssh "$TPU_NAME" \
        --command="cd $remote_dir && { nohup $train>train.log 2>&1 </dev/null & echo \$! >train.pid; }"
    else
      gcloud_tpu ssh "$TPU_NAME" --command="cd $remote_dir && exec $train"
    fi
    ;;
  stop)
    (($# == 0)) || die "$usage"
    gcloud_tpu ssh "$TPU_NAME" --command="kill -TERM \"\$(cat $remote_dir/train.pid)\""
    ;;
  *)
    die "$usage"
    ;;
esac
