"""FID statistics: input handling, sharded streaming extraction, fid_stats.py end to end."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from diffjax.eval import fid, inception
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID_STATS = os.path.join(ROOT, "launch", "fid_stats.py")
N_DEV = 4  # Batches split over 4 of the 8 simulated devices (the CPU cost is per image).


@pytest.fixture(scope="module")
def variables():
    return inception.random_variables(seed=3, with_logits=False)


@pytest.fixture(scope="module")
def gray_images():
    # Grayscale uint8, smooth enough that features vary between images.
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (6, 4, 4, 1)).astype(np.float64)
    return np.kron(base, np.ones((1, 4, 4, 1))).astype(np.uint8) // 2 + rng.integers(
        0, 128, (6, 16, 16, 1), dtype=np.uint8
    )


@pytest.fixture(scope="module")
def streamed_stats(variables, gray_images):
    # Uneven incoming batches (1 + 5) regrouped into 4 + 2 (padded to 4), split 4 ways.
    batches = iter([gray_images[:1], gray_images[1:]])
    return fid.compute_statistics(batches, variables, batch_size=4, devices=jax.devices()[:N_DEV])


def run_cli(*args):
    # One device in the subprocess: no padding to a device multiple, fewer images to run.
    env = dict(os.environ, XLA_FLAGS=xla_flags())
    return subprocess.run(
        [sys.executable, FID_STATS, *args, "--noprogress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )


# ----------------------------------------------------------------------------- inputs


def test_to_model_input_conventions():
    gray = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1)
    rgb = fid.to_model_input(gray)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(rgb[..., 2], gray[..., 0])
    assert fid.to_model_input(gray.astype(np.int64)).dtype == np.uint8
    assert fid.to_model_input(np.ones((1, 2, 2, 3))).dtype == np.float32
    with pytest.raises(ValueError, match=r"\[0, 1\].*uint8"):
        fid.to_model_input(np.full((1, 2, 2, 3), 255.0))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        fid.to_model_input(np.full((1, 2, 2, 3), -1.0))
    with pytest.raises(ValueError, match="channel axis"):
        fid.to_model_input(np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="alpha"):
        fid.to_model_input(np.zeros((2, 3, 3, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        fid.to_model_input(np.full((1, 2, 2, 3), 300))


def test_rebatch_regroups_and_splits_on_shape_change():
    a = [np.zeros((n, 4, 4, 3), np.uint8) for n in (3, 5, 0, 7)]
    b = [np.zeros((2, 6, 6, 1), np.uint8)]
    sizes = [(x.shape[0], x.shape[1]) for x in fid._rebatch(a + b, 4)]
    assert sizes == [(4, 4), (4, 4), (4, 4), (3, 4), (2, 6)]


# ----------------------------------------------------------------------------- statistics


def test_streamed_sharded_statistics_equal_direct_network(variables, gray_images, streamed_stats):
    mu, sigma = streamed_stats
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and sigma.dtype == np.float64
    # Independent path: the plain module on all images at once, one device.
    x = np.repeat(gray_images, 3, axis=-1).astype(np.float32) / 255.0
    feats = np.asarray(jax.jit(inception.InceptionV3().apply)(variables, x)["pool3"], np.float64)
    ref_mu, ref_sigma = feats.mean(0), np.cov(feats, rowvar=False)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-4, atol=1e-5 * np.abs(ref_mu).max())
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-4, atol=1e-5 * np.abs(ref_sigma).max())
    assert np.trace(ref_sigma) > 1.0  # Images differ in feature space.


def test_source_statistics_equal_image_statistics(variables, gray_images, streamed_stats):
    # A data source yields float [-1, 1]; it is quantized back to the same uint8.
    source = [{"image": (img.astype(np.float32) / 127.5 - 1.0), "label": 0} for img in gray_images]
    np.testing.assert_array_equal(
        np.concatenate(list(fid.iterate_source_images(source, 4))), gray_images
    )
    mu, sigma = fid.compute_source_statistics(
        source, variables, batch_size=4, devices=jax.devices()[:N_DEV]
    )
    np.testing.assert_allclose(mu, streamed_stats[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigma, streamed_stats[1], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        next(fid.iterate_source_images([{"image": np.full((2, 2, 1), 3.0)}] * 2, 2))


def test_image_directory_reading(tmp_path, gray_images):
    for i, img in enumerate(gray_images[:3]):
        Image.fromarray(img[..., 0], mode="L").save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    files = fid.list_image_files(tmp_path)
    assert [os.path.basename(f) for f in files] == ["0.png", "1.png", "2.png"]
    got = np.concatenate(list(fid.iterate_image_files(files)))
    np.testing.assert_array_equal(got, np.repeat(gray_images[:3], 3, axis=-1))
    (tmp_path / "3_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="3_corrupt.png"):
        list(fid.iterate_image_files(fid.list_image_files(tmp_path)))
    with pytest.raises(ValueError, match="No images"):
        fid.list_image_files(tmp_path / "..")


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, variables):
    path = tmp_path_factory.mktemp("w") / "inception.safetensors"
    inception.save_params(path, variables)
    return str(path)


def test_fid_from_images_wiring(tmp_path, weights_file, gray_images, streamed_stats, monkeypatch):
    from diffjax.eval.stats import save_statistics

    stats = tmp_path / "ref.npz"
    with pytest.raises(FileNotFoundError, match="fid_stats.py"):
        fid.fid_from_images(gray_images, stats, weights_file)
    ref_mu, ref_sigma = streamed_stats[0] + 1.0, 2.0 * streamed_stats[1]
    save_statistics(stats, ref_mu, ref_sigma)
    # The distance itself is tested in test_eval_frechet (at D=2048 it costs ~10 s of
    # CPU); here: the right statistics reach it, in the right order, with the method.
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *a, **k: calls.append((a, k)) or 42.0)
    got = fid.fid_from_images(
        gray_images, stats, weights_file, 4, "eigh", devices=jax.devices()[:N_DEV]
    )
    assert got == 42.0 and len(calls) == 1
    (mu, sigma, mu_r, sigma_r), kwargs = calls[0]
    assert kwargs == {"method": "eigh"}
    np.testing.assert_allclose(mu, streamed_stats[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigma, streamed_stats[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(mu_r, ref_mu)
    np.testing.assert_array_equal(sigma_r, ref_sigma)


def test_fid_stats_cli_npz_end_to_end(tmp_path, weights_file, gray_images, streamed_stats):
    npz = tmp_path / "samples.npz"
    np.savez(npz, images=gray_images, labels=np.zeros(len(gray_images), np.int32))
    out = tmp_path / "stats" / "ref.npz"
    res = run_cli(
        f"--images={npz}", f"--inception_weights={weights_file}", f"--out={out}", "--batch_size=3"
    )
    assert res.returncode == 0, res.stderr
    with np.load(out) as data:
        assert int(data["num_images"]) == len(gray_images)
        # Another device count and batch size than in-process: same numbers to rounding.
        for got, want in zip((data["mu"], data["sigma"]), streamed_stats, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_fid_stats_cli_dataset(tmp_path, weights_file, variables):
    from diffjax.data import make_source

    out = tmp_path / "digits.npz"
    res = run_cli(
        "--dataset=digits", "--image_size=8", "--channels=1", "--num_examples=3",
        f"--inception_weights={weights_file}", f"--out={out}", "--batch_size=3",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    source = make_source("digits", split="train", image_size=8, channels=1)
    mu, _ = fid.compute_source_statistics(
        source, variables, batch_size=4, num_examples=3, devices=jax.devices()[:N_DEV]
    )
    with np.load(out) as data:
        assert int(data["num_images"]) == 3
        np.testing.assert_allclose(data["mu"], mu, rtol=1e-4, atol=1e-5 * np.abs(mu).max())


def test_fid_stats_cli_errors(tmp_path, weights_file, gray_images):
    for i, img in enumerate(gray_images[:2]):
        Image.fromarray(img[..., 0]).save(tmp_path / f"{i}.png")
    (tmp_path / "2.jpg").write_bytes(b"garbage")
    res = run_cli(
        f"--images={tmp_path}", f"--inception_weights={weights_file}", f"--out={tmp_path}/s.npz"
    )
    assert res.returncode == 1 and "2.jpg" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(f"--inception_weights={weights_file}", f"--out={tmp_path}/s.npz")
    assert res.returncode == 1 and "exactly one of --images" in res.stderr
