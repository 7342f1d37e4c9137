"""diffjax's own dit/unet in diffusers' DiTTransformer2DModel / UNet2DModel layouts.

The fixtures (tests/fixtures/make_diffusers_models.py) are tiny random diffusers models
with their outputs; no torch here.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from configs.digits import get_config
from diffjax.models.dit import DiT, stack_block_params
from diffjax.models.unet import UNet
from diffjax.pretrained import safetensors_io
from diffjax.pretrained.convert import ConversionError
from diffjax.pretrained.diffusers_dit import (
    dit_config,
    dit_kwargs_from_config,
    export_dit,
    load_dit,
)
from diffjax.pretrained.diffusers_unet2d import (
    export_unet2d,
    load_unet2d,
    unet2d_config,
    unet_kwargs_from_config,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
DIT_DIR = os.path.join(FIXTURES, "dit", "transformer")
UNET_DIR = os.path.join(FIXTURES, "unet2d", "unet")


def reference(name):
    return dict(np.load(os.path.join(FIXTURES, name, "reference.npz")))


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def flat(tree):
    return traverse_util.flatten_dict(tree)


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def digits_quick_kwargs():
    return dict(get_config("quick").model.kwargs)


# ----------------------------------------------------------------------------- DiT


@pytest.mark.parametrize("scan_layers", [False, True])
def test_dit_directory_matches_diffusers(scan_layers):
    kwargs, params = load_dit(DIT_DIR, scan_layers=scan_layers)
    assert kwargs == dict(
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        mlp_ratio=4.0,
        num_classes=10,
        learn_sigma=True,
        out_channels=0,
        time_freq_shift=1.0,
        scan_layers=scan_layers,
    )
    assert ("blocks" in params) == scan_layers
    ref = reference("dit")
    out = DiT(**kwargs).apply(
        {"params": params}, jnp.asarray(ref["x"]), jnp.asarray(ref["t"]), jnp.asarray(ref["labels"])
    )
    assert out.shape == ref["out"].shape
    assert rel_err(out, ref["out"]) < 1e-4


def test_dit_export_load_round_trip_is_exact(tmp_path):
    kwargs, params = load_dit(DIT_DIR)
    export_dit(params, kwargs, str(tmp_path / "a"), sample_size=8)
    # diffjax -> diffusers gives back the fixture's tensors bit for bit (the embedder
    # written into every block, the residual channels un-permuted).
    assert_same_tensors(
        safetensors_io.read_tensors(str(tmp_path / "a")), safetensors_io.read_tensors(DIT_DIR)
    )
    again_kwargs, again = load_dit(str(tmp_path / "a"))
    assert again_kwargs == kwargs
    for k, v in flat(params).items():
        np.testing.assert_array_equal(flat(again)[k], v, err_msg=str(k))
    # Scanned params export to the same files.
    export_dit(
        stack_block_params(params, 2),
        {**kwargs, "scan_layers": True},
        str(tmp_path / "b"),
        sample_size=8,
    )
    assert_same_tensors(
        safetensors_io.read_tensors(str(tmp_path / "b")), safetensors_io.read_tensors(DIT_DIR)
    )
    # The config is the fixture's, except the MLP LayerNorm's epsilon (diffjax's 1e-6).
    written = json.load(open(tmp_path / "a" / "config.json"))
    fixture = safetensors_io.read_config(DIT_DIR)
    assert written.pop("norm_eps") == 1e-6
    fixture.pop("norm_eps")
    assert {k: v for k, v in written.items() if k in fixture} == fixture


def test_dit_refuses_blocks_with_different_embedders(tmp_path):
    shutil.copytree(DIT_DIR, tmp_path / "t")
    tensors = safetensors_io.read_tensors(DIT_DIR)
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(tmp_path / "t" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        load_dit(str(tmp_path / "t"))


def test_dit_refusals_name_the_option():
    good = safetensors_io.read_config(DIT_DIR)
    for key, value in [
        ("norm_type", "ada_norm_single"),
        ("cross_attention_dim", 64),
        ("activation_fn", "geglu"),
        ("attention_bias", False),
        ("norm_eps", 1e-3),
        ("_class_name", "UNet2DModel"),
    ]:
        with pytest.raises(ValueError, match=key):
            dit_kwargs_from_config({**good, key: value})
    kwargs = dit_kwargs_from_config(good)
    for key, value in [
        ("time_freq_shift", 0.0),
        ("num_classes", 0),
        ("context_dim", 16),
        ("time_embedding", "fourier"),
        ("time_scale", 1000.0),
        ("mlp_ratio", 2.0),
        ("frequency_dim", 128),
    ]:
        with pytest.raises(ValueError, match=key):
            dit_config({**kwargs, key: value}, in_channels=4, sample_size=8)
    with pytest.raises(ValueError, match="sample_size"):
        dit_config(kwargs, in_channels=4, sample_size=7)


# ----------------------------------------------------------------------------- UNet2DModel


def test_unet2d_directory_matches_diffusers():
    kwargs, params = load_unet2d(UNET_DIR)
    digits = digits_quick_kwargs()
    assert {k: kwargs[k] for k in digits} == digits
    ref = reference("unet2d")
    out = UNet(**kwargs).apply(
        {"params": params}, jnp.asarray(ref["x"]), jnp.asarray(ref["t"]), jnp.asarray(ref["labels"])
    )
    assert out.shape == ref["out"].shape
    assert rel_err(out, ref["out"]) < 1e-4


def test_unet2d_export_of_the_digits_model_is_the_fixture(tmp_path):
    _, params = load_unet2d(UNET_DIR)
    digits = digits_quick_kwargs()
    export_unet2d(params, digits, str(tmp_path))  # sample_size inferred: 8
    written = json.load(open(tmp_path / "config.json"))
    fixture = safetensors_io.read_config(UNET_DIR)
    assert {k: v for k, v in written.items() if k != "_diffusers_version"} == {
        k: v for k, v in fixture.items() if k != "_diffusers_version"
    }
    assert_same_tensors(
        safetensors_io.read_tensors(str(tmp_path)), safetensors_io.read_tensors(UNET_DIR)
    )
    kwargs, again = load_unet2d(str(tmp_path))
    assert {k: kwargs[k] for k in digits} == digits
    for k, v in flat(params).items():
        np.testing.assert_array_equal(flat(again)[k], v, err_msg=str(k))
    export_unet2d(params, digits, str(tmp_path / "b"), sample_size=8)
    with pytest.raises(ValueError, match="sample_size=16"):
        export_unet2d(params, digits, str(tmp_path / "c"), sample_size=16)


def test_unet2d_refusals_name_the_option():
    digits = digits_quick_kwargs()
    for key, value in [
        ("resblock_updown", True),
        ("conv_resample", False),
        ("time_embedding", "fourier"),
        ("time_scale", 1000.0),
        ("context_dim", 16),
    ]:
        with pytest.raises(ValueError, match=key):
            unet2d_config({**digits, key: value}, in_channels=1, sample_size=8)
    # Two heads at 16 and at 32 channels: head widths 8 and 16.
    with pytest.raises(ValueError, match="attention_head_dim"):
        unet2d_config({**digits, "attention_resolutions": (8, 4)}, in_channels=1, sample_size=8)

    good = safetensors_io.read_config(UNET_DIR)
    for key, value in [
        ("downsample_padding", 1),
        ("freq_shift", 1),
        ("flip_sin_to_cos", False),
        ("time_embedding_type", "fourier"),
        ("attn_norm_num_groups", None),  # scale_shift: diffusers' mid attention has no norm
        ("attention_head_dim", 12),
        ("norm_eps", 1e-6),
        ("downsample_type", "resnet"),
        ("class_embed_type", "timestep"),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
    ]:
        with pytest.raises(ValueError, match=key):
            unet_kwargs_from_config({**good, key: value})
