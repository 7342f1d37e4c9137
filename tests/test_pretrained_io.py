"""Weight files of diffusers/HF directories and the generic torch <-> Flax converter."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from diffjax.pretrained import convert, safetensors_io


class Mirror(nn.Module):
    """A module named like a torch tree: conv, group norm, linear, embedding."""

    @nn.compact
    def __call__(self, x, ids):
        h = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), name="down_blocks.0.conv")(x)
        h = nn.GroupNorm(2, name="down_blocks.0.norm")(h)
        e = nn.Embed(7, 4, name="embed")(ids)
        return nn.Dense(3, name="to_out.0")(h.mean((1, 2)) + e.mean(1))


def _init():
    m = Mirror()
    args = (jnp.ones((1, 5, 5, 2)), jnp.zeros((1, 3), jnp.int32))
    params = m.init(jax.random.key(0), *args)["params"]
    abstract = jax.eval_shape(m.init, jax.random.key(0), *args)["params"]
    return m, params, abstract


def test_round_trip_layouts_and_torch_conventions():
    _, params, abstract = _init()
    tensors = convert.flax_to_torch(params)
    # torch layouts: conv OIHW, linear (out, in), norm/embedding 'weight'.
    assert tensors["down_blocks.0.conv.weight"].shape == (4, 2, 3, 3)
    assert tensors["to_out.0.weight"].shape == (3, 4)
    assert tensors["down_blocks.0.norm.weight"].shape == (4,)
    assert tensors["embed.weight"].shape == (7, 4)
    kernel = np.asarray(params["down_blocks.0.conv"]["kernel"])
    np.testing.assert_array_equal(tensors["down_blocks.0.conv.weight"][3, 1], kernel[:, :, 1, 3])
    back = convert.torch_to_flax(tensors, abstract, what="toy")
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


def test_errors_name_every_missing_unexpected_and_misshaped_key():
    _, params, abstract = _init()
    tensors = convert.flax_to_torch(params)
    del tensors["embed.weight"]
    tensors["extra.weight"] = np.zeros(2, np.float32)
    tensors["to_out.0.weight"] = np.zeros((5, 4), np.float32)
    with pytest.raises(convert.ConversionError) as e:
        convert.torch_to_flax(tensors, abstract, what="toy")
    msg = str(e.value)
    assert "missing 1: embed.weight" in msg
    assert "unexpected 1: extra.weight" in msg
    assert "to_out.0.weight: file (5, 4), model wants (4, 3)" in msg


def test_prefix_rename_and_1x1_conv_kernels():
    _, params, abstract = _init()
    tensors = {"model." + k: v for k, v in convert.flax_to_torch(params).items()}
    # An old checkpoint storing a linear layer as a [O, I, 1, 1] convolution.
    tensors["model.to_out.0.weight"] = tensors["model.to_out.0.weight"][:, :, None, None]
    tensors["model.old_name.bias"] = tensors.pop("model.to_out.0.bias")
    back = convert.torch_to_flax(
        tensors,
        abstract,
        what="toy",
        prefixes=("", "model."),
        rename=lambda k: k.replace("old_name", "to_out.0"),
    )
    np.testing.assert_array_equal(
        back["to_out.0"]["kernel"], np.asarray(params["to_out.0"]["kernel"])
    )


def test_read_tensors_dtypes_shards_variants(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_file({"a": a.astype(np.float16)}, str(tmp_path / "s1.safetensors"))
    save_file(
        {"b": a.astype(ml_dtypes.bfloat16), "i": np.arange(3, dtype=np.int64)},
        str(tmp_path / "s2.safetensors"),
    )
    index = {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "i": "s2.safetensors"}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    got = safetensors_io.read_tensors(str(tmp_path))
    assert got["a"].dtype == np.float32 and got["b"].dtype == np.float32
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], a)
    assert got["i"].dtype == np.int64

    var = tmp_path / "var"
    var.mkdir()
    save_file({"x": a}, str(var / "model.safetensors"))
    save_file({"x": a.astype(np.float16) + 1}, str(var / "model.fp16.safetensors"))
    np.testing.assert_array_equal(safetensors_io.read_tensors(str(var))["x"], a)
    np.testing.assert_array_equal(safetensors_io.read_tensors(str(var), variant="fp16")["x"], a + 1)


def test_read_tensors_clear_errors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(FileNotFoundError, match="PyTorch pickles.*save_pretrained"):
        safetensors_io.read_tensors(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        safetensors_io.read_tensors(str(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        safetensors_io.read_tensors(str(bad))
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone"}}))
    with pytest.raises(FileNotFoundError, match="shards that are not there"):
        safetensors_io.read_tensors(str(idx))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        safetensors_io.read_config(str(empty))


def test_write_tensors_has_torch_metadata(tmp_path):
    from safetensors import safe_open

    path = os.path.join(tmp_path, "w.safetensors")
    safetensors_io.write_tensors({"w": np.ones((2, 2), np.float32)}, path)
    with safe_open(path, framework="numpy") as f:
        assert f.metadata()["format"] == "pt"  # transformers/diffusers refuse files without it


def test_written_weights_are_readable_by_others(tmp_path):
    # safetensors creates files 0600; exported weights get the usual 0666 & ~umask.
    path = os.path.join(tmp_path, "w.safetensors")
    old = os.umask(0o022)
    try:
        safetensors_io.write_tensors({"w": np.ones(2, np.float32)}, path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
