"""The user path through the real entry points: train -> kill/resume -> sample -> evaluate."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "--config=configs/digits.py:quick"
# Every run here trains a one-level U-Net without attention. These tests are about the
# entry points (resume, signals, export, sampling, evaluation), not the architecture
# (tests/test_models_unet.py, test_diffusers_layouts.py and test_pretrained_pipeline.py
# check the full digits U-Net and its export); ~20 commands each trace and load it, and
# the first compiles it cold.
TINY = (
    "--config.model.kwargs.base_channels=8",
    "--config.model.kwargs.num_groups=4",
    "--config.model.kwargs.channel_mult=(1,)",
    "--config.model.kwargs.attention_resolutions=()",
    "--config.model.kwargs.mid_attention=False",
)


def _env(devices=1):
    # JAX_COMPILATION_CACHE_DIR comes from conftest: the first run compiles, the rest
    # (resume, sample, evaluate) load the executables.
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(script, *args, check=True, devices=1, timeout=900):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", script), *args],
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _train_args(workdir, *extra):
    return (QUICK, *TINY, f"--workdir={workdir}", *extra)


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@functools.lru_cache(maxsize=1)
def _reference_params(workdir):
    """`_final_params` of the module's reference run (read once, compared three times)."""
    return _final_params(workdir)


def _final_params(workdir):
    """The EMA params of the latest checkpoint, via the library's own restore."""
    import jax

    from diffjax import parallel
    from diffjax.rundir import load_state, load_workdir_config

    config = load_workdir_config(workdir)
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    state, step, _ = load_state(config, workdir, mesh)
    return step, [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


LONG = ("--config.train.num_steps=24", "--config.train.checkpoint_every_steps=6")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref"))
    _run("train.py", *_train_args(workdir, *LONG))
    return workdir


@pytest.fixture(scope="module")
def cpu_export(reference_run, tmp_path_factory):
    """`export.py --platforms=cpu` of the reference run (tests copy it before changing it)."""
    export_dir = str(tmp_path_factory.mktemp("cpu_export") / "export")
    _run("export.py", f"--workdir={reference_run}", f"--out={export_dir}", "--platforms=cpu")
    return export_dir


def test_train_sample_evaluate(reference_run):
    workdir = reference_run
    assert _steps(workdir)[-1] == 24
    for name in ("config.json", "metrics.jsonl"):
        assert os.path.exists(os.path.join(workdir, name))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert os.path.exists(os.path.join(workdir, "samples", "step_00000024.png"))
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(2, 25, 2))
    assert all(
        np.isfinite(r["loss"]) and {"grad_norm", "learning_rate", "img_per_sec"} <= set(r)
        for r in records
    )

    out = os.path.join(workdir, "s", "samples.npz")
    _run("sample.py", f"--workdir={workdir}", "--num_samples=12", f"--out={out}", "--steps=3")
    with np.load(out) as z:
        assert z["images"].shape == (12, 8, 8, 1) and z["images"].dtype == np.uint8
        np.testing.assert_array_equal(z["labels"], np.arange(12) % 10)
    assert os.path.exists(out[:-4] + ".png")

    _run(
        "evaluate.py",
        f"--workdir={workdir}",
        "--config.eval.num_samples=50",
        "--config.sample.num_steps=3",
    )
    report = json.load(open(os.path.join(workdir, "eval", "step_00000024.json")))
    assert 0.0 <= report["conditional_accuracy"] <= 1.0
    assert report["frechet_distance"] > 0 and report["frechet_real_halves"] > 0
    assert report["num_samples"] == 50


def test_sigkill_then_resume_is_bitwise_identical(reference_run, tmp_path):
    workdir = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), *_train_args(workdir, *LONG)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while not [s for s in _steps(workdir) if s >= 6] and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _steps(workdir)
    assert killed_at and killed_at[-1] < 24, killed_at
    _resume_matches_reference(workdir, reference_run)


def _resume_matches_reference(workdir, reference_run):
    """Reruns the interrupted run to the end: params bitwise and losses equal the reference."""
    _run("train.py", *_train_args(workdir, *LONG))
    step, params = _final_params(workdir)
    ref_step, ref_params = _reference_params(reference_run)
    assert step == ref_step == 24
    for a, b in zip(params, ref_params, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _losses(workdir) == _losses(reference_run)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_interrupt_saves_exits_zero_and_resumes_bitwise(reference_run, tmp_path, sig):
    """SIGTERM (preemption) and Ctrl-C save the current step and exit 0 with a one-line
    summary; the rerun matches an uninterrupted run: params, per-step losses, each step
    once in metrics.jsonl, no half-written checkpoint left."""
    workdir = str(tmp_path / "interrupted")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), *_train_args(workdir, *LONG)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 600
    metrics = os.path.join(workdir, "metrics.jsonl")
    while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"stopped by {sig.name} at step" in out and "Traceback" not in out, out
    stopped = _steps(workdir)
    assert stopped and stopped[-1] < 24, stopped
    _resume_matches_reference(workdir, reference_run)
    with open(metrics) as f:
        logged = [json.loads(line)["step"] for line in f]
    assert logged == sorted(set(logged)), logged
    assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]


def test_bad_inputs_fail_clearly_and_touch_nothing(reference_run, tmp_path):
    proc = _run(
        "train.py", QUICK, f"--workdir={tmp_path}/x", "--config.train.nosuch=1", check=False
    )
    assert proc.returncode != 0 and "train.nosuch" in proc.stderr and "num_steps" in proc.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run("sample.py", f"--workdir={empty}", "--out=/tmp/never.npz", check=False)
    assert proc.returncode != 0 and "config.json" in proc.stderr

    before = sorted(os.listdir(os.path.join(reference_run, "checkpoints")))
    config_before = open(os.path.join(reference_run, "config.json")).read()
    proc = _run(
        "train.py",
        *_train_args(reference_run, "--config.model.kwargs.base_channels=32"),
        check=False,
    )
    assert (
        proc.returncode != 0 and "different model" in proc.stderr and "base_channels" in proc.stderr
    )
    assert sorted(os.listdir(os.path.join(reference_run, "checkpoints"))) == before
    assert open(os.path.join(reference_run, "config.json")).read() == config_before


def test_export_then_sample_matches_checkpoint(reference_run, cpu_export, tmp_path):
    export_dir = cpu_export
    meta = json.load(open(os.path.join(export_dir, "config.json")))
    assert meta["step"] == 24 and meta["image_shape"] == [8, 8, 1] and meta["num_classes"] == 10
    assert meta["serialized_sampler"]["platforms"] == ["cpu"]

    args = ("--num_samples=10", "--steps=3", "--guidance=2.0", "--seed=5")
    a, b = str(tmp_path / "ckpt.npz"), str(tmp_path / "export.npz")
    _run("sample.py", f"--workdir={reference_run}", f"--out={a}", *args)
    _run("sample.py", f"--export_dir={export_dir}", f"--out={b}", *args)
    with np.load(a) as za, np.load(b) as zb:
        np.testing.assert_array_equal(za["images"], zb["images"])
        np.testing.assert_array_equal(za["labels"], zb["labels"])

    # The serialized sampler (jax.export) against the Python path, in process.
    from diffjax.generate import Generator

    py = Generator.from_export(export_dir, guidance=2.0)
    ser = Generator.from_export(export_dir, guidance=2.0, serialized=True)
    x_py, _ = py.generate(6, seed=1, batch_size=6)
    x_ser, _ = ser.generate(6, seed=1, batch_size=6)
    assert np.abs(x_py.astype(int) - x_ser.astype(int)).max() <= 1


def test_export_diffusers_then_pretrained_matches_checkpoint(reference_run, tmp_path):
    """--format=diffusers writes a directory that samples, through --pretrained, the
    images the checkpoint gives from the same noise (diffusers' own loop on such a
    directory: tests/test_pretrained_pipeline.py)."""
    out = str(tmp_path / "diffusers")
    _run("export.py", f"--workdir={reference_run}", f"--out={out}", "--format=diffusers")
    assert sorted(os.listdir(out)) == ["diffjax.json", "model_index.json", "scheduler", "unet"]
    unet_cfg = json.load(open(os.path.join(out, "unet", "config.json")))
    assert unet_cfg["_class_name"] == "UNet2DModel" and unet_cfg["num_class_embeds"] == 11

    noise = np.random.default_rng(0).standard_normal((6, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    # digits samples with dpmpp_2m on logsnr steps, which no diffusers scheduler takes:
    # the export writes DDIM (it says so), and both sides sample with it.
    args = ("--num_samples=6", "--method=ddim", "--steps=5", "--guidance=2.0", "--labels=0,3,5")
    a, b = str(tmp_path / "ckpt.npz"), str(tmp_path / "diffusers.npz")
    noise_arg = f"--noise={tmp_path / 'noise.npy'}"
    _run("sample.py", f"--workdir={reference_run}", f"--out={a}", noise_arg, *args)
    _run("sample.py", f"--pretrained={out}", f"--out={b}", noise_arg, *args)
    with np.load(a) as za, np.load(b) as zb:
        np.testing.assert_array_equal(za["labels"], zb["labels"])
        assert np.abs(za["images"].astype(int) - zb["images"].astype(int)).max() <= 2


def test_corrupt_or_mismatched_export_fails_clearly(reference_run, cpu_export, tmp_path):
    import shutil

    from diffjax.export import ExportError
    from diffjax.generate import Generator

    export_dir = cpu_export
    bad = str(tmp_path / "bad")
    shutil.copytree(export_dir, bad)
    path = os.path.join(bad, "params.safetensors")
    raw = bytearray(open(path, "rb").read())
    raw[-5] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ExportError, match="corrupt or from another export"):
        Generator.from_export(bad)

    other = str(tmp_path / "other")
    shutil.copytree(export_dir, other)
    meta = json.load(open(os.path.join(other, "config.json")))
    meta["config"]["model"]["kwargs"]["base_channels"] = 32
    meta["model"]["kwargs"]["base_channels"] = 32
    json.dump(meta, open(os.path.join(other, "config.json"), "w"))
    with pytest.raises(ExportError, match="does not fit the model"):
        Generator.from_export(other)
    with pytest.raises(ExportError, match="not a diffjax export"):
        Generator.from_export(str(tmp_path))

    # A hand-edited summary field is named, never ignored; a deleted artifact is named.
    edited = str(tmp_path / "edited")
    shutil.copytree(export_dir, edited)
    meta = json.load(open(os.path.join(edited, "config.json")))
    meta["image_shape"] = [16, 16, 1]
    json.dump(meta, open(os.path.join(edited, "config.json"), "w"))
    with pytest.raises(ExportError, match="'image_shape' is .* the file was edited"):
        Generator.from_export(edited)
    os.remove(os.path.join(other, "sampler.jax_export"))
    meta = json.load(open(os.path.join(export_dir, "config.json")))
    with pytest.raises(ExportError, match="sampler.jax_export is missing"):
        from diffjax.export import load_serialized

        load_serialized(other, meta)

    # An existing export is replaced only with --overwrite.
    proc = _run("export.py", f"--workdir={reference_run}", f"--out={export_dir}", check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr, proc.stderr


def test_evaluate_with_fid_and_a_test_made_inception(reference_run, tmp_path):
    from diffjax.data import load_digits_arrays
    from diffjax.eval import inception

    weights = str(tmp_path / "inception.safetensors")
    inception.save_params(weights, inception.random_variables(seed=0, with_logits=False))
    images, _ = load_digits_arrays()
    real = str(tmp_path / "real.npz")
    np.savez(real, images=images[:16])
    stats = str(tmp_path / "stats.npz")
    _run(
        "fid_stats.py",
        f"--images={real}",
        f"--inception_weights={weights}",
        f"--out={stats}",
        "--batch_size=8",
    )
    _run(
        "evaluate.py",
        f"--workdir={reference_run}",
        "--step=18",
        "--config.eval.num_samples=8",
        "--config.eval.batch_size=8",
        "--config.sample.num_steps=2",
        f"--config.eval.reference_stats={stats}",
        f"--config.eval.inception_weights={weights}",
    )
    report = json.load(open(os.path.join(reference_run, "eval", "step_00000018.json")))
    assert report["step"] == 18 and np.isfinite(report["fid"]) and report["fid"] > 0
    assert "conditional_accuracy" in report


def test_periodic_evaluation_tracks_the_best_params(tmp_path):
    from configs.digits import get_config
    from diffjax.generate import Generator
    from diffjax.train import train_and_evaluate

    config = get_config("quick")
    # A one-level U-Net without attention: this test is about the eval hook, and each
    # program (init, train step, sampler) compiles cold in this process.
    config.model.kwargs.update(
        base_channels=8,
        num_groups=4,
        channel_mult=(1,),
        attention_resolutions=(),
        mid_attention=False,
    )
    config.eval.every_steps = 4
    config.sample.num_images = 0
    config.eval.num_samples = 20
    config.eval.batch_size = 20
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)
    reports = sorted(f for f in os.listdir(os.path.join(workdir, "eval")) if f.endswith(".json"))
    assert reports == ["best.json", "step_00000004.json", "step_00000008.json"]
    best = json.load(open(os.path.join(workdir, "eval", "best.json")))
    values = {
        s: json.load(open(os.path.join(workdir, "eval", f"step_{s:08d}.json")))["frechet_distance"]
        for s in (4, 8)
    }
    assert best["metric"] == "frechet_distance" and best["value"] == min(values.values())
    assert best["step"] == min(values, key=values.get)
    assert Generator.from_export(os.path.join(workdir, "best")).step == best["step"]
