"""Cluster launchers (launch/*.sh, *.sbatch, *.yaml) and multi-host environment detection.

The launchers run here for real, with stand-ins on PATH for what a cluster provides
(`srun`, `scancel`, `scontrol`, `gcloud`) and a stand-in interpreter for
`launch/train.py` that records its arguments and environment and, like the training
loop, exits 0 on SIGTERM.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import jax
import pytest
import yaml
from jax._src import cloud_tpu_init
from jax._src import clusters as jax_clusters
from jax._src.clusters import cloud_tpu_cluster
from jax._src.clusters import cluster as jax_cluster_module

from diffjax import parallel

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SHELL_SCRIPTS = ("local_multigpu.sh", "slurm.sbatch", "tpu_vm.sh")

# A stand-in for the training process: writes its arguments and environment to
# $FAKE_OUT/<pid>.txt; with FAKE_MODE=wait it runs until SIGTERM, then records the
# checkpoint and exits 0 (as diffjax's loop does); else it exits with $FAKE_RC.
FAKE_TRAIN = r"""#!/usr/bin/env bash
out="$FAKE_OUT/$$.txt"
{
  echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}"
  echo "XLA_FLAGS=${XLA_FLAGS-}"
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION-}"
  printf 'ARG %s\n' "$@"
} >"$out"
echo $$ >>"$FAKE_OUT/pids"
if [[ ${FAKE_MODE:-} == wait ]]; then
  trap 'echo SAVED >>"$out"; exit 0' TERM
  while :; do sleep 0.02; done
fi
exit "${FAKE_RC:-0}"
"""

# A stand-in `srun`: records its arguments, then behaves as the one training task.
FAKE_SRUN = r"""#!/usr/bin/env bash
printf '%s\n' "$@" >"$FAKE_OUT/srun.args"
echo $$ >"$FAKE_OUT/task.pid"
if [[ ${FAKE_MODE:-} == wait ]]; then
  trap 'echo SAVED >"$FAKE_OUT/saved"; exit 0' TERM
  while :; do sleep 0.02; done
fi
exit "${FAKE_RC:-0}"
"""

# `scancel --signal=TERM JOBID` signals the job's steps: here, the one task.
FAKE_SCANCEL = r"""#!/usr/bin/env bash
printf '%s\n' "$@" >"$FAKE_OUT/scancel.args"
kill -TERM "$(cat "$FAKE_OUT/task.pid")"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
printf '%s\n' "$@" >"$FAKE_OUT/scontrol.args"
"""

# A stand-in `gcloud`: each call's argv, NUL-separated, in $FAKE_OUT/gcloud.N; `scp`
# keeps a copy of the file it would send.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
n=$(cat "$FAKE_OUT/count" 2>/dev/null || echo 0)
echo $((n + 1)) >"$FAKE_OUT/count"
printf '%s\0' "$@" >"$FAKE_OUT/gcloud.$n"
if [[ $4 == scp ]]; then cp "$5" "$FAKE_OUT/sent.tar.gz"; fi
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fakes(tmp_path):
    """A bin/ directory of stand-ins, an output directory, and a clean environment."""
    bin_dir = tmp_path / "bin"
    out = tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    for name, text in {
        "train": FAKE_TRAIN,
        "srun": FAKE_SRUN,
        "scancel": FAKE_SCANCEL,
        "scontrol": FAKE_SCONTROL,
        "gcloud": FAKE_GCLOUD,
        "python": FAKE_TRAIN,  # The Kubernetes pod runs `python launch/train.py`.
    }.items():
        _write_exe(bin_dir / name, text)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "FAKE_OUT": str(out),
        "PYTHON": str(bin_dir / "train"),
    }
    return env, out


def _records(out: Path) -> list[dict]:
    """The stand-in training processes' records, in start order."""
    pids = (out / "pids").read_text().split()
    records = []
    for pid in pids:
        lines = (out / f"{pid}.txt").read_text().splitlines()
        record = {"args": [x[4:] for x in lines if x.startswith("ARG ")]}
        record["saved"] = "SAVED" in lines
        for line in lines:
            if "=" in line and not line.startswith("ARG "):
                key, value = line.split("=", 1)
                record[key] = value
        records.append(record)
    return records


def _wait_for(path: Path, count: int = 1, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().split()) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def _script_flags(name: str) -> list[str]:
    text = (LAUNCH / name).read_text()
    line = next(x for x in text.splitlines() if x.startswith("DIFFJAX_GPU_XLA_FLAGS="))
    [value] = shlex.split(line.split("=", 1)[1])
    return value.split()


def _jobset_docs():
    return list(yaml.safe_load_all((LAUNCH / "k8s_jobset.yaml").read_text()))


def _pod_spec():
    jobset = next(d for d in _jobset_docs() if d["kind"] == "JobSet")
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    return jobset, job, job["template"]["spec"]


# ---------------------------------------------------------------------------- all launchers


@pytest.mark.parametrize("name", SHELL_SCRIPTS)
def test_shell_scripts_parse(name):
    subprocess.run(["bash", "-n", str(LAUNCH / name)], check=True)


def test_every_launcher_runs_train_py_with_a_workdir():
    for name in SHELL_SCRIPTS:
        text = (LAUNCH / name).read_text()
        # The behaviour tests below check the exact command each one runs.
        assert "launch/train.py" in text and "--workdir=" in text and "$workdir" in text, name
    _, _, pod = _pod_spec()
    script = pod["containers"][0]["args"][0]
    assert "python launch/train.py" in script and '--workdir="/runs/${RUN_NAME}"' in script


def test_gpu_xla_flags_agree_and_the_installed_jaxlib_knows_them():
    flags = _script_flags("local_multigpu.sh")
    assert flags == _script_flags("slurm.sbatch")
    _, _, pod = _pod_spec()
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["XLA_FLAGS"].split() == flags
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags

    probe = "import jax.numpy as jnp; jnp.ones(2).block_until_ready()"

    def run(xla_flags):
        env = {**os.environ, "XLA_FLAGS": " ".join(xla_flags), "JAX_PLATFORMS": "cpu"}
        return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True)

    assert run(flags).returncode == 0
    # XLA aborts on a flag it does not know, which is what the check above relies on.
    bad = run([*flags, "--xla_gpu_no_such_flag=true"])
    assert bad.returncode != 0 and b"Unknown flag" in bad.stderr


# ---------------------------------------------------------------------------- local


def test_local_single_process_sees_the_chosen_gpus(fakes):
    env, out = fakes
    env = {**env, "GPUS": "2,3", "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"}
    cmd = [str(LAUNCH / "local_multigpu.sh"), "configs/digits.py", "runs/x", "--config.seed=3"]
    subprocess.run(cmd, env=env, check=True, timeout=30)
    [record] = _records(out)
    assert record["args"] == [
        str(LAUNCH / "train.py"),
        "--config=configs/digits.py",
        "--workdir=runs/x",
        "--config.seed=3",
    ]
    assert record["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert record["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    flags = record["XLA_FLAGS"].split()
    assert flags[: len(_script_flags("local_multigpu.sh"))] == _script_flags("local_multigpu.sh")
    assert flags[-1] == "--xla_gpu_enable_latency_hiding_scheduler=false"  # Last one wins.


def test_local_processes_split_the_gpus_and_all_save_on_sigterm(fakes):
    env, out = fakes
    env = {**env, "GPUS": "0,1,2,3", "NUM_PROCESSES": "2", "PORT": "9999", "FAKE_MODE": "wait"}
    cmd = [str(LAUNCH / "local_multigpu.sh"), "configs/digits.py", "/shared/w", "--config.seed=1"]
    proc = subprocess.Popen(cmd, env=env)
    _wait_for(out / "pids", count=2)
    time.sleep(0.2)  # Let both stand-ins install their SIGTERM trap.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0

    records = sorted(_records(out), key=lambda r: r["args"])
    assert [r["CUDA_VISIBLE_DEVICES"] for r in records] == ["0,1", "2,3"]
    for i, record in enumerate(records):
        assert record["saved"], (records, (out / "pids").read_text())
        assert record["args"] == [
            str(LAUNCH / "train.py"),
            "--config=configs/digits.py",
            "--workdir=/shared/w",
            "--coordinator_address=127.0.0.1:9999",
            "--num_processes=2",
            f"--process_id={i}",
            "--config.seed=1",
        ]


def test_local_reports_the_first_failure(fakes):
    env, _ = fakes
    env = {**env, "GPUS": "0,1", "NUM_PROCESSES": "2", "FAKE_RC": "3"}
    cmd = [str(LAUNCH / "local_multigpu.sh"), "c.py", "w"]
    assert subprocess.run(cmd, env=env, timeout=30).returncode == 3


def test_local_rejects_a_process_count_that_does_not_divide_the_gpus(fakes):
    env, out = fakes
    env = {**env, "GPUS": "0,1,2,3", "NUM_PROCESSES": "3"}
    cmd = [str(LAUNCH / "local_multigpu.sh"), "c.py", "w"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "must divide the number of GPUs (4" in result.stderr
    assert not (out / "pids").exists()


# ---------------------------------------------------------------------------- slurm


def _sbatch_options() -> dict[str, str]:
    options = {}
    for line in (LAUNCH / "slurm.sbatch").read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.split()[1].partition("=")
            options[key] = value
    return options


def test_sbatch_header_one_task_per_node_requeue_and_warning_signal():
    options = _sbatch_options()
    assert options["--ntasks-per-node"] == "1" and "--gpus-per-node" in options
    assert "--requeue" in options and options["--open-mode"] == "append"
    # The warning goes to the batch shell only (B:) and is not TERM: see the script.
    signal_name, _, seconds = options["--signal"].partition("@")
    assert signal_name == "B:USR1"
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert f"GRACE_SECONDS={seconds}\n" in text
    # sbatch reads #SBATCH lines only before the first command.
    lines = [x for x in text.splitlines() if x.strip()]
    first_command = next(i for i, x in enumerate(lines) if not x.startswith("#"))
    assert all(not x.startswith("#SBATCH") for x in lines[first_command:])


def _sbatch(env, out, *, mode=None, rc=None):
    env = {**env, "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_CPUS_ON_NODE": "64"}
    if mode:
        env["FAKE_MODE"] = mode
    if rc is not None:
        env["FAKE_RC"] = str(rc)
    cmd = [
        "bash",
        str(LAUNCH / "slurm.sbatch"),
        "configs/digits.py",
        "/shared/w",
        "--config.seed=2",
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sbatch_checkpoints_and_requeues_before_the_time_limit(fakes):
    env, out = fakes
    proc = _sbatch(env, out, mode="wait")
    _wait_for(out / "task.pid")
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # What --signal=B:USR1@300 sends.
    assert proc.wait(timeout=30) == 0, proc.stdout.read().decode()
    assert (out / "scancel.args").read_text().split() == ["--signal=TERM", "4242"]
    assert (out / "saved").exists()
    assert (out / "scontrol.args").read_text().split() == ["requeue", "4242"]
    srun_args = (out / "srun.args").read_text().splitlines()
    assert srun_args == [
        "--ntasks-per-node=1",
        "--cpus-per-task=64",
        "--kill-on-bad-exit=1",
        env["PYTHON"],
        "launch/train.py",
        "--config=configs/digits.py",
        "--workdir=/shared/w",
        "--config.seed=2",
    ]


def test_sbatch_finished_or_failed_runs_are_not_requeued(fakes):
    env, out = fakes
    assert _sbatch(env, out).wait(timeout=30) == 0
    assert _sbatch(env, out, rc=3).wait(timeout=30) == 3
    assert not (out / "scancel.args").exists() and not (out / "scontrol.args").exists()


# ---------------------------------------------------------------------------- tpu vm


def _gcloud_calls(out: Path) -> list[list[str]]:
    n = int((out / "count").read_text())
    return [(out / f"gcloud.{i}").read_text().split("\0")[:-1] for i in range(n)]


def _option(argv: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))


def test_tpu_vm_runs_the_same_quoted_command_on_every_worker(fakes):
    env, out = fakes
    env = {**env, "TPU_NAME": "pod-1", "ZONE": "us-west4-a", "PROJECT": "proj"}
    script = str(LAUNCH / "tpu_vm.sh")
    override = "--config.data.data_dir=/mnt/data/my latents"
    subprocess.run(
        [script, "train", "configs/digits.py", "/mnt/runs/d", override], env=env, check=True
    )
    subprocess.run(
        [script, "train", "configs/digits.py", "/mnt/runs/d"],
        env={**env, "DETACH": "1"},
        check=True,
    )
    subprocess.run([script, "stop"], env=env, check=True)
    train, detached, stop = _gcloud_calls(out)
    for argv in (train, detached, stop):
        assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod-1"]
        assert "--worker=all" in argv and "--zone=us-west4-a" in argv and "--project=proj" in argv
    # The remote shell sees exactly the local arguments, the space included.
    words = shlex.split(_option(train, "--command"))
    assert words[:4] == ["cd", "diffjax", "&&", "exec"]
    assert words[4:] == [
        ".venv/bin/python",
        "launch/train.py",
        "--config=configs/digits.py",
        "--workdir=/mnt/runs/d",
        override,
    ]
    detached_command = _option(detached, "--command")
    assert "nohup .venv/bin/python launch/train.py" in detached_command
    assert "echo $! >train.pid" in detached_command
    assert _option(stop, "--command") == 'kill -TERM "$(cat diffjax/train.pid)"'


def test_tpu_vm_setup_sends_the_checkout_and_installs_jax_tpu(fakes):
    env, out = fakes
    env = {**env, "TPU_NAME": "pod-1", "ZONE": "z"}
    subprocess.run([str(LAUNCH / "tpu_vm.sh"), "setup"], env=env, check=True, timeout=60)
    scp, ssh = _gcloud_calls(out)
    assert scp[3] == "scp" and scp[5] == "pod-1:diffjax-src.tar.gz" and "--worker=all" in scp
    with tarfile.open(out / "sent.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"launch/train.py", "pyproject.toml", "launch/tpu_vm.sh"} <= names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)
    command = _option(ssh, "--command")
    assert "tar -xzf diffjax-src.tar.gz -C diffjax" in command
    assert "pip install -q -e . 'jax[tpu]>=0.10.0,<0.11'" in command


def test_tpu_vm_needs_a_name_and_zone(fakes):
    env, _ = fakes
    result = subprocess.run(
        [str(LAUNCH / "tpu_vm.sh"), "stop"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and "TPU_NAME" in result.stderr


# ---------------------------------------------------------------------------- kubernetes


def test_jobset_manifest_structure():
    docs = _jobset_docs()
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    jobset, job, pod = _pod_spec()
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] >= 1
    assert jobset["spec"]["replicatedJobs"][0]["replicas"] == 1
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    assert job["parallelism"] == job["completions"]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 60
    [container] = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    env = {e["name"]: e for e in container["env"]}
    assert int(env["NUM_HOSTS"]["value"]) == job["parallelism"]
    labels = {
        e: env[e]["valueFrom"]["fieldRef"]["fieldPath"]
        for e in ("JOBSET_NAME", "REPLICATED_JOB_NAME")
    }
    assert labels == {
        "JOBSET_NAME": "metadata.labels['jobset.sigs.k8s.io/jobset-name']",
        "REPLICATED_JOB_NAME": "metadata.labels['jobset.sigs.k8s.io/replicatedjob-name']",
    }
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert mounts["runs"] == "/runs" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert container["ports"][0]["containerPort"] == int(env["COORDINATOR_PORT"]["value"])
    subprocess.run(["bash", "-n"], input=container["args"][0].encode(), check=True)


def _pod_env(fake_env: dict, index: int) -> dict:
    _, _, pod = _pod_spec()
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(
        JOBSET_NAME="diffjax",  # What the downward API gives from the JobSet labels.
        REPLICATED_JOB_NAME="workers",
        JOB_COMPLETION_INDEX=str(index),  # Set by Kubernetes in Indexed Jobs.
    )
    return {**fake_env, **env}


def test_jobset_pod_passes_flags_and_exits_143_after_saving_on_sigterm(fakes):
    env, out = fakes
    _, _, pod = _pod_spec()
    [container] = pod["containers"]
    command = [*container["command"], container["args"][0]]
    # Finished on its own: the training process's exit status.
    done = subprocess.run(command, env=_pod_env(env, 1), cwd=ROOT, timeout=30)
    assert done.returncode == 0
    [record] = _records(out)
    assert record["args"] == [
        "launch/train.py",
        "--config=configs/cifar10_ddpm.py",
        "--workdir=/runs/cifar10",
        "--coordinator_address=diffjax-workers-0-0.diffjax:8476",
        "--num_processes=2",
        "--process_id=1",
    ]
    # Evicted: SIGTERM reaches Python, which saves; the pod then counts as failed.
    (out / "pids").unlink()
    proc = subprocess.Popen(command, env={**_pod_env(env, 0), "FAKE_MODE": "wait"}, cwd=ROOT)
    _wait_for(out / "pids")
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    [record] = _records(out)
    assert record["saved"] and "--process_id=0" in record["args"]


# ---------------------------------------------------------------------------- detection

CLUSTER_VARS = (
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_STEP_NUM_NODES",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_HOSTNAMES",
    "TPU_WORKER_ID",
    "TPU_SKIP_MDS_QUERY",
    "MEGASCALE_NUM_SLICES",
    "MEGASCALE_SLICE_ID",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "KUBERNETES_SERVICE_HOST",
    "JOB_COMPLETION_INDEX",
    "PMI_SIZE",
    "PMI_RANK",
    "MV2_COMM_WORLD_SIZE",
    "JAX_COORDINATOR_ADDRESS",
    "JAX_LOCAL_DEVICE_IDS",
)


@pytest.fixture
def cluster_env(monkeypatch):
    """A process environment with no cluster in it (CI itself may run in a pod), not a
    TPU VM; returns a function that sets variables and the TPU flag."""
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(variables: dict[str, str], tpu_vm: bool = False) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        # JAX's modules copied the flag at import; patch every copy its detectors read.
        for module in (cloud_tpu_init, cloud_tpu_cluster, jax_cluster_module):
            monkeypatch.setattr(module, "running_in_cloud_tpu_vm", tpu_vm)

    set_env({})
    return set_env


def _jax_finds_several() -> bool:
    """What `jax.distributed.initialize()` itself would conclude: the first of JAX's
    detectors that is present, in JAX's order, and whether it counts > 1 process."""
    for env in jax_clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.get_process_count() > 1
    return False


SLURM_STEP = {  # Inside `srun` on 2 nodes, one task each.
    "SLURM_JOB_ID": "123",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_NUM_NODES": "2",
}
OMPI4 = {
    "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_RANK": "0",
    "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
}
GKE_TPU = {
    "TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3",
    "TPU_WORKER_ID": "2",
    # Without these JAX would ask the metadata server: its GCE detector comes before the
    # GKE one, and the slice count is read from the metadata when not in the environment.
    "TPU_SKIP_MDS_QUERY": "1",
    "MEGASCALE_NUM_SLICES": "1",
}


@pytest.mark.parametrize(
    ("variables", "tpu_vm", "expected"),
    [
        ({}, False, False),
        (SLURM_STEP, False, True),
        ({**SLURM_STEP, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_NODES": "1"}, False, False),
        # A batch script / salloc shell: no step, so JAX finds no SLURM cluster.
        ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}, False, False),
        (OMPI4, False, True),
        ({**OMPI4, "OMPI_COMM_WORLD_SIZE": "1"}, False, False),
        ({**SLURM_STEP, **OMPI4, "OMPI_COMM_WORLD_SIZE": "1"}, False, False),  # JAX uses Open MPI.
        (GKE_TPU, True, True),
        ({**GKE_TPU, "TPU_WORKER_HOSTNAMES": "w-0", "MEGASCALE_NUM_SLICES": "2"}, True, True),
        ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476", **GKE_TPU}, True, True),
        (GKE_TPU, False, False),  # TPU variables on a machine without TPUs.
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, False, False),
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "0"}, False, False),
    ],
)
@pytest.mark.filterwarnings("ignore:Kubernetes environment detected")  # JAX's, in the oracle.
def test_detection_agrees_with_jax(cluster_env, variables, tpu_vm, expected):
    cluster_env(variables, tpu_vm)
    assert parallel._cluster_environment_detected() is expected
    assert _jax_finds_several() is expected


def test_detection_on_a_gce_tpu_vm_leaves_the_worker_count_to_jax(cluster_env):
    # GCE TPU VMs keep the worker list on the metadata server, not in the environment.
    cluster_env({}, tpu_vm=True)
    assert parallel._cluster_environment_detected()
    cluster_env({"TPU_SKIP_MDS_QUERY": "1"}, tpu_vm=True)  # JAX would not ask it.
    assert not parallel._cluster_environment_detected()


def test_detection_of_an_indexed_kubernetes_job_follows_the_kubernetes_package(
    cluster_env, monkeypatch
):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    installed = {"kubernetes": None}

    def find_spec(name, *args):
        return installed[name] if name in installed else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    cluster_env({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"})
    with pytest.raises(ValueError, match=r"index 3 of an indexed Kubernetes Job.*k8s_jobset"):
        parallel._cluster_environment_detected()
    installed["kubernetes"] = object()  # JAX's K8sCluster can work: let it.
    assert parallel._cluster_environment_detected()


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"},
            r"Open MPI 5 .* --num_processes=4 --process_id=\$OMPI_COMM_WORLD_RANK",
        ),
        ({"PMI_SIZE": "2", "PMI_RANK": "0"}, r"MPICH .* --num_processes=2 --process_id=\$PMI_RANK"),
        ({"MV2_COMM_WORLD_SIZE": "8"}, r"MVAPICH .* --num_processes=8"),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, r"--num_processes and --process_id"),
        ({**SLURM_STEP, "SLURM_NTASKS": "two"}, r"SLURM_NTASKS='two' is not an integer"),
    ],
)
def test_launchers_jax_cannot_detect_are_errors(cluster_env, variables, message):
    cluster_env(variables)
    if "SLURM_NTASKS" not in variables:
        assert not _jax_finds_several()  # Each process would train alone.
    with pytest.raises(ValueError, match=message):
        parallel._cluster_environment_detected()


def test_multi_task_slurm_job_outside_srun_warns(cluster_env, caplog):
    variables = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    cluster_env({**variables, "SLURM_NTASKS": "4"})
    assert not parallel._cluster_environment_detected()
    assert "4 tasks, but this process was not started by srun" in caplog.text


# ---------------------------------------------------------------------------- initialize


@pytest.fixture
def fake_initialize(monkeypatch):
    """Replaces jax.distributed.initialize with JAX's own argument resolution (cluster
    detection included) and its one visible-device side effect; records the calls."""
    calls = []
    names = ("jax_cuda_visible_devices", "jax_rocm_visible_devices")
    before = {name: jax.config.read(name) for name in names}

    def initialize(coordinator_address=None, num_processes=None, process_id=None, **kwargs):
        method = kwargs.get("cluster_detection_method")
        local_device_ids = None
        if method != "deactivate":
            coordinator_address, num_processes, process_id, local_device_ids = (
                jax_clusters.ClusterEnv.auto_detect_unset_distributed_params(
                    coordinator_address, num_processes, process_id, None, method, None
                )
            )
        if local_device_ids:
            for name in names:
                jax.config.update(name, ",".join(map(str, local_device_ids)))
        calls.append(dict(kwargs, coordinator=coordinator_address, n=num_processes, id=process_id))

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    yield calls
    for name, value in before.items():
        jax.config.update(name, value)


def test_explicit_flags_switch_jax_detection_off(cluster_env, fake_initialize):
    cluster_env(SLURM_STEP)  # Would otherwise restrict the process to one GPU.
    parallel.initialize_distributed("10.0.0.1:8476", 2, 1, initialization_timeout=7)
    assert fake_initialize == [
        {
            "coordinator": "10.0.0.1:8476",
            "n": 2,
            "id": 1,
            "initialization_timeout": 7,
            "cluster_detection_method": "deactivate",
        }
    ]
    assert jax.config.read("jax_cuda_visible_devices") == "all"


def test_explicit_flags_take_the_address_from_the_environment(cluster_env, fake_initialize):
    cluster_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.9:1234"})
    parallel.initialize_distributed(num_processes=4, process_id=3)
    assert fake_initialize[0]["coordinator"] == "10.0.0.9:1234"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((None, 2, 0), r"missing: --coordinator_address \(or JAX_COORDINATOR_ADDRESS\)"),
        (("h:1", None, 0), "missing: --num_processes"),
        (("h:1", 2, None), "missing: --process_id"),
        (("h:1", 2, 2), r"--process_id=2 must be in \[0, 2\)"),
    ],
)
def test_incomplete_flags_are_errors(cluster_env, fake_initialize, args, message):
    with pytest.raises(ValueError, match=message):
        parallel.initialize_distributed(*args)
    assert fake_initialize == []


def test_single_host_initializes_nothing(cluster_env, fake_initialize):
    parallel.initialize_distributed()
    assert fake_initialize == []


def test_one_process_per_slurm_node_keeps_every_gpu(cluster_env, fake_initialize, caplog):
    cluster_env(SLURM_STEP)
    with caplog.at_level("INFO", logger="diffjax.parallel"):
        parallel.initialize_distributed()
    [call] = fake_initialize
    assert call["coordinator"] == f"gpu01:{123 % 4096 + 61440}" and call["n"] == 2
    # JAX restricted the process to GPU 0 (its SLURM_LOCALID); diffjax undid that.
    assert "JAX had set '0'" in caplog.text
    assert jax.config.read("jax_cuda_visible_devices") == "all"
    assert jax.config.read("jax_rocm_visible_devices") == "all"


def test_one_process_per_gpu_keeps_jax_choice(cluster_env, fake_initialize):
    # 2 nodes x 4 tasks: each process drives the GPU of its local rank, as JAX set it.
    cluster_env({**SLURM_STEP, "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"})
    parallel.initialize_distributed()
    assert fake_initialize[0]["id"] == 5
    assert jax.config.read("jax_cuda_visible_devices") == "1"


def test_one_open_mpi_process_per_host_keeps_every_gpu(cluster_env, fake_initialize):
    cluster_env(OMPI4)
    parallel.initialize_distributed()
    assert fake_initialize[0]["n"] == 4
    assert jax.config.read("jax_cuda_visible_devices") == "all"


def test_jax_local_device_ids_is_left_to_jax(cluster_env, fake_initialize, monkeypatch):
    cluster_env({**SLURM_STEP, "JAX_LOCAL_DEVICE_IDS": "0"})

    def initialize_with_env_ids(**kwargs):  # What JAX does with JAX_LOCAL_DEVICE_IDS.
        jax.config.update("jax_cuda_visible_devices", os.environ["JAX_LOCAL_DEVICE_IDS"])

    monkeypatch.setattr(jax.distributed, "initialize", initialize_with_env_ids)
    parallel.initialize_distributed()
    assert jax.config.read("jax_cuda_visible_devices") == "0"
