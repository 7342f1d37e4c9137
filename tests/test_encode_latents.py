"""`diffjax.pretrained.encode` and `launch/encode_latents.py`: a dataset -> latents on disk.

Parity with diffusers uses `tests/fixtures/vae/` (`make_vae.py`: a tiny diffusers-saved
AutoencoderKL and its encoder's mean on reference images); captions use the tiny SD
pipeline `tests/fixtures/pipelines/tiny-sd` (`make_pipelines.py`).
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from diffjax import data, parallel
from diffjax.images import uint8_to_float
from diffjax.pretrained import encode, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
VAE = ROOT / "tests" / "fixtures" / "vae"
TINY_SD = ROOT / "tests" / "fixtures" / "pipelines" / "tiny-sd"
SCALE = 0.18215  # the fixture VAE's scaling_factor


@functools.cache
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(VAE / "reference.npz"))


@functools.cache
def fixture_vae() -> pipeline.Component:
    return pipeline.load_vae(str(VAE / "vae"))


@functools.cache
def one_device_mesh():
    return parallel.make_mesh(-1, 1, devices=jax.devices()[:1])


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def uint8_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def npz7(tmp_path_factory) -> pathlib.Path:
    """7 labelled uint8 images (7 = no batch size used below divides it)."""
    path = tmp_path_factory.mktemp("npz") / "images.npz"
    np.savez(path, images=uint8_images(7), labels=np.arange(7) % 3)
    return path


def read_out(out) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in pathlib.Path(out).glob("*.npy")}


# ----------------------------------------------------------------------------- parity


def test_encode_images_matches_diffusers():
    # diffusers: vae.encode(x).latent_dist.mean * scaling_factor (float input in [-1, 1]).
    ref = reference()
    got = encode.encode_images(fixture_vae(), ref["images"])
    assert got.dtype == np.float32 and got.shape == (2, 8, 8, 4)
    assert rel_err(got, SCALE * ref["mean"]) < 1e-4


def test_command_on_uint8_npz(tmp_path):
    # The one run of the real command: uint8 .npz with labels, 8 simulated devices.
    images = uint8_images(5, seed=1)
    src = tmp_path / "in.npz"
    np.savez(src, images=images, labels=np.array([4, 0, 2, 2, 1]))
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "launch/encode_latents.py", f"--vae={VAE / 'vae'}", f"--images={src}"]
    proc = subprocess.run(
        [*cmd, f"--out={out}", "--batch_size=2"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Wrote 5 latents (8, 8, 4) (mode, labels)" in proc.stdout
    # diffjax's own encoder on the decoded floats (its parity with diffusers is above).
    want = encode.encode_images(fixture_vae(), uint8_to_float(images))
    arrays = read_out(out)
    assert rel_err(arrays["latents"], want) < 1e-5
    np.testing.assert_array_equal(arrays["labels"], [4, 0, 2, 2, 1])
    assert arrays["labels"].dtype == np.int32
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vae"]["path"] == str(VAE / "vae")
    assert len(meta["vae"]["sha256"]) == 64
    assert meta["scaling_factor"] == pytest.approx(SCALE) and meta["shift_factor"] == 0.0
    assert (meta["latents"], meta["seed"], meta["count"]) == ("mode", None, 5)
    assert meta["image_shape"] == [16, 16, 3] and meta["source"] == f"npz:{src}"
    assert meta["text_encoder"] is None and meta["diffjax_version"]
    assert sorted(os.listdir(out)) == ["labels.npy", "latents.npy", "meta.json"]
    # What data.source='latents' reads.
    source = data.make_source(
        source="latents", data_dir=str(out), image_size=8, channels=4, num_classes=5
    )
    assert len(source) == 5
    rec = source[3]
    np.testing.assert_array_equal(rec["image"], arrays["latents"][3])
    assert rec["labels"] == 2


# ----------------------------------------------------------------------------- posterior


def test_sample_reproducible_independent_of_batch_and_devices(npz7, tmp_path):
    run = functools.partial(
        encode.encode_dataset, str(npz7), vae=str(VAE / "vae"), sample=True, seed=3, progress=False
    )
    run(str(tmp_path / "b2"), batch_size=2, mesh=one_device_mesh())
    run(str(tmp_path / "b3"), batch_size=3, mesh=one_device_mesh())
    run(str(tmp_path / "d8"), batch_size=8)  # 8 devices, one row each
    b2, b3, d8 = (read_out(tmp_path / d)["latents"] for d in ("b2", "b3", "d8"))
    # The same noise per row whatever the batch; XLA:CPU's convolutions round differently
    # with the batch size on some CPUs (measured 1.2e-6 on AMD EPYC without AVX-512,
    # bitwise on others), and the sharded program on 8 devices too (1.2e-6).
    np.testing.assert_allclose(b2, b3, rtol=0, atol=1e-5)
    np.testing.assert_allclose(b2, d8, rtol=0, atol=1e-5)
    mode = encode.encode_images(fixture_vae(), uint8_to_float(np.load(npz7)["images"]))
    assert not np.allclose(b2, mode, atol=1e-3)
    # A posterior draw: mean + std * eps with eps ~ N(0, 1), std from the logvar.
    assert 0.01 < np.abs(b2 - mode).mean() < 10 * SCALE
    meta = json.loads((tmp_path / "b2" / "meta.json").read_text())
    assert (meta["latents"], meta["seed"]) == ("sample", 3)
    # Another seed draws other noise.
    other = run(str(tmp_path / "s4"), batch_size=2, mesh=one_device_mesh(), seed=4)
    assert other["seed"] == 4
    assert not np.allclose(read_out(tmp_path / "s4")["latents"], b2)


# ----------------------------------------------------------------------------- resume


def test_resume_is_bitwise_and_arguments_are_checked(npz7, tmp_path):
    out = str(tmp_path / "out")
    run = functools.partial(
        encode.encode_dataset,
        str(npz7),
        out,
        vae=str(VAE / "vae"),
        sample=True,
        seed=3,
        progress=False,
        mesh=one_device_mesh(),
    )
    assert run(batch_size=2, max_batches=2) is None  # interrupted after 4 of 7 rows
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["rows_done"] == 4
    # A partial directory is not readable as latents.
    assert not os.path.exists(os.path.join(out, "latents.npy"))
    assert os.path.exists(os.path.join(out, "latents.npy.partial"))
    with pytest.raises(FileNotFoundError, match="no 'latents'"):
        data.make_source(source="latents", data_dir=out, image_size=8, channels=4)
    with pytest.raises(ValueError, match=r"latents: 'sample' then, 'mode' now"):
        run(sample=False, batch_size=2)
    with pytest.raises(ValueError, match=r"seed: 3 then, 5 now"):
        run(seed=5, batch_size=2)
    # Continue with the same batch size: the resumed file is the uninterrupted one bit for
    # bit (another batch size changes only the rounding, as above).
    meta = run(batch_size=2)
    assert meta["count"] == 7 and not os.path.exists(os.path.join(out, "progress.json"))
    whole = str(tmp_path / "whole")
    encode.encode_dataset(
        str(npz7), whole, vae=str(VAE / "vae"), sample=True, seed=3, progress=False,
        batch_size=2, mesh=one_device_mesh(),
    )  # fmt: skip
    resumed, uninterrupted = read_out(out), read_out(whole)
    for name in ("latents", "labels"):
        np.testing.assert_array_equal(resumed[name], uninterrupted[name])
    # Finished: refused, unless overwrite.
    with pytest.raises(ValueError, match="already holds finished latents.*--overwrite"):
        run(batch_size=2)
    assert run(batch_size=2, overwrite=True)["count"] == 7
    np.testing.assert_array_equal(read_out(out)["latents"], uninterrupted["latents"])


# ----------------------------------------------------------------------------- captions


def write_folder(root: pathlib.Path, captions: dict[str, str]) -> np.ndarray:
    root.mkdir()
    images = uint8_images(3, seed=2)
    for i, name in enumerate(["a", "b", "c"]):
        Image.fromarray(images[i]).save(root / f"{name}.png")
        if name in captions:
            (root / f"{name}.txt").write_text(captions[name])
    return images


def test_text_encoder_captions(tmp_path):
    captions = {"a": "a photo of a cat", "c": "two  dogs\non grass"}
    images = write_folder(tmp_path / "imgs", captions)
    out = tmp_path / "out"
    meta = encode.encode_dataset(
        str(tmp_path / "imgs"), str(out), vae=str(TINY_SD), text_encoder=str(TINY_SD),
        image_size=16, progress=False,
    )  # fmt: skip
    arrays = read_out(out)
    assert arrays["context"].shape == (3, 77, 32) and arrays["context"].dtype == np.float32
    assert arrays["context_mask"].shape == (3, 77) and arrays["context_mask"].all()
    pipe = pipeline.load_pipeline(str(TINY_SD))
    # An image without a caption gets the encoding of "" (SD's unconditional prompt).
    want = pipeline.encode_prompts(pipe, ["a photo of a cat", "", "two dogs on grass"])
    np.testing.assert_array_equal(arrays["context"], np.asarray(want))
    cfg = pipe.vae.config
    want = encode.encode_images(pipe.vae, uint8_to_float(images))
    assert cfg["scaling_factor"] == 0.5 and meta["scaling_factor"] == 0.5
    # The last bits depend on XLA's code generation (1.6e-6 apart at the tests' -O0).
    np.testing.assert_allclose(arrays["latents"], want, rtol=1e-5, atol=1e-5)
    assert meta["captions"] == "embeddings"
    assert meta["text_encoder"]["path"] == str(TINY_SD / "text_encoder")
    assert len(meta["text_encoder"]["sha256"]) == 64 and meta["vae"]["path"] == str(TINY_SD / "vae")
    source = data.make_source(source="latents", data_dir=str(out), image_size=8, channels=4)
    rec = source[2]
    assert rec["context"].shape == (77, 32) and rec["context_mask"].all()
    # Without a text encoder, --captions keeps diffjax token ids (the folder source's).
    tokens = tmp_path / "tokens"
    meta = encode.encode_dataset(
        str(tmp_path / "imgs"), str(tokens), vae=str(TINY_SD), captions=True, image_size=16,
        max_text_len=8, batch_size=8, progress=False,
    )  # fmt: skip
    folder = data.make_source(
        source="folder", data_dir=str(tmp_path / "imgs"), image_size=16, channels=3,
        max_text_len=8,
    )  # fmt: skip
    arrays = read_out(tokens)
    for i in range(3):
        np.testing.assert_array_equal(arrays["context"][i], folder[i]["context"])
        np.testing.assert_array_equal(arrays["context_mask"][i], folder[i]["context_mask"])
    assert meta["captions"] == "token_ids" and not arrays["context_mask"][1].any()


def test_class_folders_give_labels_and_names(tmp_path):
    root = tmp_path / "classes"
    for name, seed in (("cat", 0), ("dog", 1)):
        (root / name).mkdir(parents=True)
        for j, img in enumerate(uint8_images(2, seed)):
            Image.fromarray(img).save(root / name / f"{j}.png")
    out = tmp_path / "out"
    encode.encode_dataset(str(root), str(out), vae=str(VAE / "vae"), progress=False)
    arrays = read_out(out)
    np.testing.assert_array_equal(arrays["labels"], [0, 0, 1, 1])
    assert list(arrays["class_names"]) == ["cat", "dog"]
    assert data.latents.class_names(str(out)) == ["cat", "dog"]


# ----------------------------------------------------------------------------- checks


def test_check_latents_meta(tmp_path):
    out = tmp_path / "out"
    src = tmp_path / "in.npz"
    np.savez(src, images=uint8_images(2))
    encode.encode_dataset(str(src), str(out), vae=str(VAE / "vae"), progress=False)
    encode.check_latents_meta(str(out), str(VAE / "vae"))  # the same VAE passes
    with pytest.raises(ValueError) as e:
        encode.check_latents_meta(str(out), str(TINY_SD))  # a pipeline: its vae/
    msg = str(e.value)
    meta = json.loads((out / "meta.json").read_text())
    from diffjax.pretrained import safetensors_io

    other = safetensors_io.weights_sha256(str(TINY_SD / "vae"))
    assert meta["vae"]["sha256"] in msg and other in msg
    assert str(VAE / "vae") in msg and str(TINY_SD / "vae") in msg
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        encode.check_latents_meta(str(tmp_path), str(VAE / "vae"))


def test_bad_input_is_named(tmp_path):
    vae = str(VAE / "vae")
    src = tmp_path / "in.npz"
    np.savez(src, images=uint8_images(2))
    run = functools.partial(encode.encode_dataset, out_dir=str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match=r"multiples of 2; pass --image_size=14"):
        run(str(src), vae=vae, image_size=15)
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="image count of zero"):
        run(str(tmp_path / "empty.npz"), vae=vae)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        run(str(tmp_path / "missing"), vae=vae)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        run(str(src), vae=str(tmp_path / "no-vae"))
    with pytest.raises(FileNotFoundError, match="neither model_index.json"):
        run(str(src), vae=str(tmp_path))
    with pytest.raises(ValueError, match="has no captions"):
        run(str(src), vae=vae, text_encoder=str(TINY_SD))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="No images"):
        run(str(tmp_path / "empty_dir"), vae=vae)
    np.savez(tmp_path / "float.npz", images=np.full((1, 16, 16, 3), 3.0, np.float32))
    with pytest.raises(ValueError, match=r"outside \[-1, 1\]"):
        run(str(tmp_path / "float.npz"), vae=vae, mesh=one_device_mesh(), batch_size=1)
    assert not os.path.exists(tmp_path / "o" / "latents.npy")


def test_embedded_digits_as_images():
    from diffjax.pretrained.encode import open_images

    s = open_images("digits:half0", channels=1)
    assert s.count == 899 and s.shape == (8, 8, 1) and s.labelled
    rec = s.read(0)
    assert (
        rec["image"].shape == (8, 8, 1) and -1.0 <= rec["image"].min() <= rec["image"].max() <= 1.0
    )
    assert int(rec["labels"]) == 0 and s.class_names == [str(k) for k in range(10)]
    assert open_images("digits", channels=3, image_size=16).read(5)["image"].shape == (16, 16, 3)
