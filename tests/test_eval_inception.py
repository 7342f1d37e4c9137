"""The Flax FID InceptionV3 against pytorch-fid, the torch -> Flax mapping, weight files.

`test_matches_pytorch_fid_fixture` compares with outputs of pytorch-fid's own network
(tests/fixtures/make_inception_fixture.py) on seeded random weights; the weights are
regenerated here from the same seed, so only the outputs are committed.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffjax.eval import fid, inception
from diffjax.eval.inception_score import inception_score, inception_score_from_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
sys.path.insert(0, FIXTURES)
import inception_fixture_lib as fixlib  # noqa: E402

FIXTURE = os.path.join(FIXTURES, "inception_pytorch_fid.npz")


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def seeded_torch():
    return fixlib.seeded_torch_state_dict(inception.torch_state_dict_shapes(with_fc=True))


# ----------------------------------------------------------------------------- resize


@pytest.mark.parametrize(
    ("n_in", "n_out", "expected"),
    [
        # torch F.interpolate(..., mode='bilinear', align_corners=False) on [a, b]:
        (2, 4, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]),
        # Shrinking 4 -> 2 averages neighbour pairs (source coords 0.5 and 2.5).
        (4, 2, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]),
        # 6 -> 2 point-samples pixels 1 and 4: no antialiasing filter.
        (6, 2, [[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0]]),
        (3, 3, np.eye(3)),
    ],
)
def test_bilinear_matrix_matches_torch_semantics(n_in, n_out, expected):
    np.testing.assert_allclose(inception.bilinear_matrix(n_in, n_out), expected, atol=1e-7)


@pytest.mark.parametrize(("size_in", "size_out"), [((7, 11), (29, 23)), ((61, 40), (13, 29))])
def test_resize_equals_unantialiased_jax_resize(size_in, size_out):
    # jax.image.resize(antialias=False) uses the same half-pixel triangle kernel.
    x = np.random.default_rng(0).uniform(size=(2, *size_in, 3)).astype(np.float32)
    got = inception.resize_bilinear(x, size_out)
    want = jax.image.resize(x, (2, *size_out, 3), "linear", antialias=False)
    np.testing.assert_allclose(got, want, atol=1e-5)
    if size_out[0] < size_in[0]:  # The antialiased default would differ when shrinking.
        smooth = jax.image.resize(x, (2, *size_out, 3), "linear")
        assert np.max(np.abs(np.asarray(got) - smooth)) > 1e-2


# ----------------------------------------------------------------------------- mapping


def test_torch_names_and_shapes_are_pytorch_fids(seeded_torch):
    fx = np.load(FIXTURE)
    shapes = {k: v.shape for k, v in seeded_torch.items()}
    # The digest was taken from pytorch-fid's own state dict in the fixture script.
    assert fixlib.shapes_digest(shapes) == str(fx["shapes_digest"])
    assert len(shapes) == 472
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["fc.weight"] == (1008, 2048)


def test_converter_round_trip(tmp_path, seeded_torch):
    state = dict(seeded_torch)
    state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)  # Ignored bookkeeping.
    flat = inception.torch_to_flax(state)
    w_t, w_f = (
        state["Mixed_7c.branch3x3_2a.conv.weight"],
        flat["params/Mixed_7c/branch3x3_2a/conv/kernel"],
    )
    assert w_f.shape == (1, 3, 384, 384)  # OIHW (384, 384, 1, 3) -> HWIO
    assert w_f[0, 2, 5, 7] == w_t[7, 5, 0, 2]
    np.testing.assert_array_equal(flat["params/fc/kernel"], state["fc.weight"].T)
    np.testing.assert_array_equal(
        flat["batch_stats/Mixed_5b/branch_pool/bn/var"],
        state["Mixed_5b.branch_pool.bn.running_var"],
    )
    path = tmp_path / "w.safetensors"
    inception.save_params(path, flat)
    variables = inception.load_params(path)
    assert inception.has_logits(variables)
    back = inception.flax_to_torch(inception.flatten_variables(variables))
    assert set(back) == set(seeded_torch)
    for k, v in seeded_torch.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_converter_errors_name_the_tensor(seeded_torch):
    state = dict(seeded_torch)
    del state["Mixed_6e.branch7x7dbl_3.bn.running_mean"]
    with pytest.raises(
        ValueError, match=r"missing tensors: Mixed_6e\.branch7x7dbl_3\.bn\.running_mean"
    ):
        inception.torch_to_flax(state)
    state = dict(seeded_torch, **{"AuxLogits.fc.weight": np.zeros((1008, 768))})
    with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
        inception.torch_to_flax(state)
    state = dict(seeded_torch)
    state["Mixed_5c.branch1x1.conv.weight"] = np.zeros((64, 256, 3, 3), np.float32)
    with pytest.raises(
        ValueError,
        match=r"Mixed_5c\.branch1x1\.conv\.weight has shape \(64, 256, 3, 3\), expected \(64, 256, 1, 1\)",
    ):
        inception.torch_to_flax(state)


def test_load_params_errors(tmp_path, seeded_torch):
    from safetensors.numpy import save_file

    with pytest.raises(FileNotFoundError, match="convert_inception.py"):
        inception.load_params(tmp_path / "nope.safetensors")
    flat = inception.torch_to_flax(seeded_torch)
    broken = {k: v for k, v in flat.items() if k != "params/Mixed_7b/branch1x1/conv/kernel"}
    broken["params/Mixed_5b/branch1x1/bn/scale"] = np.ones(3, np.float32)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError) as err:
        inception.load_params(tmp_path / "broken.safetensors")
    assert "missing tensors: params/Mixed_7b/branch1x1/conv/kernel" in str(err.value)
    assert "params/Mixed_5b/branch1x1/bn/scale has shape (3,), expected (64,)" in str(err.value)
    save_file(
        {"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32)},
        str(tmp_path / "t.safetensors"),
    )
    with pytest.raises(ValueError, match="PyTorch-named"):
        inception.load_params(tmp_path / "t.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        inception.load_params(tmp_path / "junk.safetensors")
    # A file without the fc head loads, but cannot give logits.
    no_fc = {k: v for k, v in flat.items() if "/fc/" not in k}
    inception.save_params(tmp_path / "nofc.safetensors", no_fc)
    variables = inception.load_params(tmp_path / "nofc.safetensors")
    assert not inception.has_logits(variables)
    with pytest.raises(ValueError, match="fc"):
        fid.FeatureExtractor(variables, with_logits=True)


# ----------------------------------------------------------------------------- numbers


def test_matches_pytorch_fid_fixture(seeded_torch):
    fx = np.load(FIXTURE)
    images = fixlib.fixture_images(int(fx["seed"]))
    # Guard: if numpy's generators ever change, say so instead of failing obscurely.
    assert fixlib.weights_abs_sum(seeded_torch) == pytest.approx(
        float(fx["weights_abs_sum"]), rel=1e-9
    ), "seeded weights differ from the fixture's; regenerate with make_inception_fixture.py"
    for name, imgs in images.items():
        assert int(imgs.astype(np.int64).sum()) == int(fx[f"{name}/images_sum"]), name

    variables = inception.unflatten_variables(inception.torch_to_flax(seeded_torch))
    # Batches split over 4 simulated devices; the 2-image sets are padded to 4.
    extractor = fid.FeatureExtractor(
        variables, batch_size=4, with_logits=True, devices=jax.devices()[:4]
    )
    feats, refs = [], []
    for name, imgs in images.items():
        out = extractor(imgs)
        ref = fx[f"{name}/pool3"]
        assert rel_err(out["pool3"], ref) < 1e-4, name
        assert rel_err(out["logits"], fx[f"{name}/logits"]) < 1e-4, name
        unbiased = fx[f"{name}/logits"] - seeded_torch["fc.bias"]
        assert rel_err(out["logits_unbiased"], unbiased) < 1e-4, name
        feats.append(out["pool3"])
        refs.append(ref)
    feats = np.concatenate(feats).astype(np.float64)
    refs = np.concatenate(refs).astype(np.float64)
    # pytorch-fid's statistics of its own features vs ours.
    assert rel_err(feats.mean(0), refs.mean(0)) < 1e-4
    assert rel_err(np.cov(feats, rowvar=False), np.cov(refs, rowvar=False)) < 1e-4
    # Features are far from degenerate, so the comparison means something.
    assert refs.std(0).mean() > 0.1


def test_inception_score_from_images_uses_unbiased_logits(seeded_torch):
    fx = np.load(FIXTURE)
    imgs = fixlib.fixture_images(int(fx["seed"]))["up"]
    variables = inception.unflatten_variables(inception.torch_to_flax(seeded_torch))
    got = inception_score_from_images(
        imgs, variables, batch_size=4, num_splits=2, devices=jax.devices()[:4]
    )
    ref = inception_score(fx["up/logits"] - seeded_torch["fc.bias"], num_splits=2)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- live torch

_HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "torchvision", "pytorch_fid"))


@pytest.mark.skipif(not _HAVE_TORCH, reason="needs torch, torchvision and pytorch-fid")
def test_matches_live_pytorch_fid(seeded_torch):
    import torch
    from make_inception_fixture import build_pytorch_fid_network

    model = build_pytorch_fid_network(seeded_torch)
    imgs = np.random.default_rng(5).integers(0, 256, (3, 50, 71, 1), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(np.repeat(imgs, 3, -1)).permute(0, 3, 1, 2).float() / 255.0
        ref = model(x)[0].squeeze(3).squeeze(2).numpy()
    variables = inception.unflatten_variables(inception.torch_to_flax(seeded_torch))
    got = fid.extract_features(imgs, variables, batch_size=8)["pool3"]  # Grayscale input.
    assert rel_err(got, ref) < 1e-4


@pytest.mark.skipif(not _HAVE_TORCH, reason="needs torch")
def test_convert_inception_cli_on_a_real_pth(tmp_path, seeded_torch):
    import torch

    pth = tmp_path / "random_inception.pth"
    torch.save({k: torch.from_numpy(v) for k, v in seeded_torch.items()}, pth)
    out = tmp_path / "w.safetensors"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "launch", "convert_inception.py"),
        f"--pth={pth}",
        f"--out={out}",
    ]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 1 and "--allow_unknown_checksum" in refused.stderr
    done = subprocess.run(cmd + ["--allow_unknown_checksum"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    flat = inception.flatten_variables(inception.load_params(out))
    want = inception.torch_to_flax(seeded_torch)
    assert set(flat) == set(want)
    for k in want:
        np.testing.assert_array_equal(flat[k], want[k])
