"""What a person does by accident: each fails at once with one line, and loses nothing.

The commands run for real (subprocesses); every case here fails before any compile, so
each costs about the start-up of the command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from diffjax import rundir
from diffjax.config import get_base_config
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "--config=configs/digits.py:quick"


def _run(script, *args):
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(), DIFFJAX_COMPILATION_CACHE="0"
    )
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


def test_evaluate_checks_fid_inputs_before_sampling(tmp_path):
    (tmp_path / "config.json").write_text(get_base_config().to_json())
    proc = _run(
        "evaluate.py",
        f"--workdir={tmp_path}",
        "--config.eval.reference_stats=/nonexistent/ref.npz",
        "--config.eval.inception_weights=/nonexistent/inception.safetensors",
    )
    _one_line_error(proc, "/nonexistent/ref.npz", "not found")


def test_export_refuses_a_file_or_an_existing_export(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    _one_line_error(_run("export.py", f"--workdir={tmp_path}", f"--out={afile}"), "is a file")
    existing = tmp_path / "export"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    proc = _run("export.py", f"--workdir={tmp_path}", f"--out={existing}")
    _one_line_error(proc, "--overwrite")
    assert afile.read_text() == "mine" and (existing / "config.json").read_text() == "{}"


def test_repeated_evaluation_of_a_step_keeps_the_earlier_one(tmp_path):
    from diffjax.eval.evaluate import write_eval

    write_eval(str(tmp_path), 7, {"step": 7, "fid": 3.0})
    path = write_eval(str(tmp_path), 7, {"step": 7, "fid": 2.0})
    with open(path) as f:
        record = json.load(f)
    assert record["fid"] == 2.0 and [e["fid"] for e in record["earlier"]] == [3.0]


def test_streamed_samples_file_is_an_ordinary_npz(tmp_path):
    from diffjax.generate import write_samples

    rng = np.random.default_rng(0)
    batches = [
        (rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8), np.arange(n, dtype=np.int32) % 3)
        for n in (5, 5, 2)
    ]
    npz, png = write_samples(str(tmp_path / "s.npz"), iter(batches), 12, (4, 4, 1), ncols=3)
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["images"], np.concatenate([b[0] for b in batches]))
        np.testing.assert_array_equal(data["labels"], np.concatenate([b[1] for b in batches]))
    assert os.path.exists(png) and sorted(os.listdir(tmp_path)) == ["s.npz", "s.png"]
    with pytest.raises(ValueError, match="GiB free"):
        write_samples(str(tmp_path / "big.npz"), iter([]), 10**13, (64, 64, 3))
    with pytest.raises(RuntimeError, match="wrote 5 samples, expected 12"):
        write_samples(str(tmp_path / "short.npz"), iter(batches[:1]), 12, (4, 4, 1))
    assert not [n for n in os.listdir(tmp_path) if "short" in n]  # no partial file left


def test_model_fingerprint_ignores_defaults():
    config = get_base_config()
    config.model.kwargs = ml_collections.ConfigDict({"base_channels": 8})
    spelled = get_base_config()
    defaults = rundir.models.model_fields("unet")
    spelled.model.kwargs = ml_collections.ConfigDict(
        {"base_channels": 8, "num_res_blocks": defaults["num_res_blocks"]}
    )
    fingerprint = rundir.experiment.model_fingerprint(spelled)
    assert fingerprint == rundir.experiment.model_fingerprint(config)
    old = dict(fingerprint, model_kwargs=spelled.model.kwargs.to_dict())  # an older run's
    rundir.check_same_model(old, config, "/run")
    with pytest.raises(rundir.WorkdirMismatchError, match="base_channels"):
        rundir.check_same_model(dict(old, model_kwargs={"base_channels": 16}), config, "/run")


def test_console_scripts_run_the_same_commands():
    """`pip install` puts diffjax-train & co. beside the interpreter; they are the commands."""
    script = os.path.join(os.path.dirname(sys.executable), "diffjax-train")
    if not os.path.exists(script):
        pytest.skip("diffjax is not installed in this environment (pip install -e .)")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--workdir" in proc.stdout and "--config" in proc.stdout
