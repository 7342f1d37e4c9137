"""What a person does by accident: each fails at once with one line, and loses nothing.

The commands run for real (subprocesses); every case here fails before any compile, so
each costs about the start-up of the command.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from diffjax import rundir
from diffjax.config import get_base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "--config=configs/digits.py:quick"


def _run(script, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", DIFFJAX_COMPILATION_CACHE="0")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_error(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ((), ("--config is required",)),
        (("--config=configs/nope.py",), ("configs/nope.py does not exist",)),
        ((QUICK, "--config.train.num_steps=-5"), ("train.num_steps must be >= 1",)),
        ((QUICK, "--config.sample.method=bogus"), ("unknown sampler method 'bogus'",)),
        ((QUICK, "--config.diffusion.beta_min=0.5"), ("diffusion.beta_min", "not used")),
    ],
    ids=["no-config", "missing-config-file", "negative-steps", "bad-sampler", "foreign-field"],
)
def test_train_refuses_bad_input_before_any_work(tmp_path, args, needles):
    workdir = tmp_path / "run"
    proc = _run("train.py", *args, f"--workdir={workdir}")
    _one_line_error(proc, *needles)
    assert not workdir.exists()  # Nothing was created, let alone trained.


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "afile"
    path.write_text("mine")
    _one_line_error(_run("train.py", QUICK, f"--workdir={path}"), "is a file")
    assert path.read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--out=x.png",), "--out must end in .npz"),
        (("--out=x.npz", "--labels=three"), "--labels takes class indices"),
    ],
)
def test_sample_flag_errors_are_one_line(tmp_path, args, needle):
    _one_line_error(_run("sample.py", f"--workdir={tmp_path}", *args), needle)


def test_sample_without_checkpoints_creates_nothing(tmp_path):
    (tmp_path / "config.json").write_text(get_base_config().to_json())
    _one_line_error(_run("sample.py", f"--workdir={tmp_path}", "--out=o.npz"), "No checkpoint")
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_help_exits_zero_and_lists_the_flags_that_matter():
    proc = _run("train.py", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "--workdir" in proc.stdout


def test_one_trainer_per_workdir(tmp_path, caplog):
    with rundir.WorkdirLock(str(tmp_path)):
        with pytest.raises(
            rundir.WorkdirError, match=f"in use by another trainer .pid {os.getpid()}"
        ):
            with rundir.WorkdirLock(str(tmp_path)):
                pass
    # A lock left by a process that died (the OS dropped its flock) is taken over, named.
    (tmp_path / ".lock").write_text("pid 999999 on elsewhere\n")
    with caplog.at_level("WARNING"), rundir.WorkdirLock(str(tmp_path)):
        assert "pid 999999 on elsewhere" in caplog.text


def test_unwritable_checkpoint_directory_fails_at_once(tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(rundir.WorkdirError, match="checkpoints is a file"):
        rundir.prepare_workdir(None, str(tmp_path), True)
