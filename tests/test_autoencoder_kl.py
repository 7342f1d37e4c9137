"""`diffjax.models.autoencoder_kl` against diffusers' AutoencoderKL (fixture, no torch).

The fixture `tests/fixtures/vae/` is made by `tests/fixtures/make_vae.py` (torch +
diffusers): a tiny random VAE in the diffusers layout, the same weights in the legacy
attention layout and in float16, and reference encodes/decodes (NHWC).
"""

import functools
import itertools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import autoencoder_kl as vae_lib
from diffjax.pretrained import convert, safetensors_io

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "vae"


@functools.cache
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE / "reference.npz"))


@functools.cache
def model() -> vae_lib.AutoencoderKL:
    return vae_lib.from_diffusers_config(safetensors_io.read_config(str(FIXTURE / "vae")))


@functools.cache
def abstract_params():
    vae = model()
    return jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]


@functools.cache
def load(name: str):
    tensors = vae_lib.fix_legacy_tensors(safetensors_io.read_tensors(str(FIXTURE / name)))
    return convert.torch_to_flax(tensors, abstract_params(), what="vae")


@functools.cache
def encode_fn():
    vae = model()
    return jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))


@functools.cache
def decode_fn():
    vae = model()
    return jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def same_params(a, b) -> bool:
    """Same tree structure and bit-identical leaves."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_encode_decode_match_diffusers():
    ref, params = reference(), load("vae")
    mean, logvar = encode_fn()(params, ref["images"])
    assert rel_err(mean, ref["mean"]) < 1e-4
    assert rel_err(logvar, ref["logvar"]) < 1e-4
    assert rel_err(decode_fn()(params, ref["mean"]), ref["decoded"]) < 1e-4


def test_logvar_clipped_like_diffusers():
    params = load("vae")
    bias = np.asarray(params["quant_conv"]["bias"])
    images = reference()["images"]
    for offset, want in [(1e3, 20.0), (-1e3, -30.0)]:
        shifted = bias.copy()
        shifted[4:] += offset  # the log-variance half of quant_conv's output
        p = {**params, "quant_conv": {**params["quant_conv"], "bias": shifted}}
        _, logvar = encode_fn()(p, images)
        np.testing.assert_array_equal(np.asarray(logvar), want)


def test_odd_size_downsample_pads_bottom_right():
    # 15x15 -> 7x7: diffusers pads (0, 1) then a VALID stride-2 conv ("SAME" would give 8x8).
    ref = reference()
    mean, _ = encode_fn()(load("vae"), ref["odd_images"])
    assert rel_err(mean, ref["odd_mean"]) < 1e-4


def test_legacy_layout_loads_the_same_params():
    # query/key/value/proj_attn with [C, C, 1, 1] kernels: renamed and squeezed.
    want = load("vae")
    assert same_params(load("vae_legacy"), want)
    # The rename alone also works with the generic loader, which squeezes 1x1 kernels.
    raw = safetensors_io.read_tensors(str(FIXTURE / "vae_legacy"))
    assert any(".query." in k for k in raw)
    params = convert.torch_to_flax(
        raw, abstract_params(), what="vae", rename=vae_lib.rename_legacy_key
    )
    assert same_params(params, want)


def test_fp16_weights():
    ref, params = reference(), load("vae_fp16")
    mean, logvar = encode_fn()(params, ref["images"])
    decoded = decode_fn()(params, ref["mean"])
    # The stored float16 values, computed in float32 on both sides: same bound as float32.
    assert rel_err(mean, ref["fp16_mean"]) < 1e-4
    assert rel_err(logvar, ref["fp16_logvar"]) < 1e-4
    assert rel_err(decoded, ref["fp16_decoded"]) < 1e-4
    # Against the float32 model: each weight is rounded to float16 (relative error up to
    # 2^-11 = 4.9e-4), compounded over ~20 conv/norm layers; measured 8.8e-4 (mean),
    # 6.2e-4 (logvar), 7.2e-4 (decode), so 5e-3 leaves room while a wrong mapping is O(1).
    assert rel_err(mean, ref["mean"]) < 5e-3
    assert rel_err(logvar, ref["logvar"]) < 5e-3
    assert rel_err(decoded, ref["decoded"]) < 5e-3


def test_export_round_trip():
    tensors = safetensors_io.read_tensors(str(FIXTURE / "vae"))
    exported = convert.flax_to_torch(load("vae"))
    assert sorted(exported) == sorted(tensors)
    assert all(np.array_equal(exported[k], tensors[k]) for k in tensors)


def test_tiled_decode_close_to_full_decode():
    ref, params = reference(), load("vae")
    z, full = ref["mean"], ref["decoded"]  # latent [2, 8, 8, 4], image [2, 16, 16, 3]
    decode = functools.partial(decode_fn(), params)
    # A tile as large as the latent is one plain decode.
    assert rel_err(vae_lib.tiled_decode(decode, z, tile=8, overlap=2), full) < 1e-4
    # Tiles of 6x6 at 0 and 2 along each side (overlap 4 latent = 8 image pixels).
    tiled = vae_lib.tiled_decode(decode, z, tile=6, overlap=2)
    assert tiled.shape == full.shape
    # Where one tile alone covers the output (the 4-pixel corners) it is that tile's decode.
    corner = np.asarray(decode(z[:, :6, :6]))[:, :4, :4]
    np.testing.assert_allclose(tiled[:, :4, :4], corner, rtol=1e-6, atol=1e-6)
    corner = np.asarray(decode(z[:, 2:, 2:]))[:, -4:, -4:]
    np.testing.assert_allclose(tiled[:, -4:, -4:], corner, rtol=1e-6, atol=1e-6)
    # Not equal to the full decode: GroupNorm and the mid-block attention see a 6x6 tile
    # instead of the 8x8 latent. On this random-weight VAE (far more sensitive than a
    # trained one) the measured difference is 0.36 of max |x| (correlation 0.91); a
    # misplaced tile would be uncorrelated.
    assert 0 < rel_err(tiled, full) < 0.5
    assert np.corrcoef(tiled.ravel(), full.ravel())[0, 1] > 0.85
    # The blending is a partition of unity: a decoder that looks at each latent pixel
    # alone is reproduced exactly, for square, ragged, unoverlapped and single tiles.
    local = lambda t: np.repeat(np.repeat(np.asarray(t) * 2.0 - 1.0, 2, 1), 2, 2)  # noqa: E731
    z = np.random.default_rng(0).normal(size=(1, 13, 7, 3)).astype(np.float32)
    for tile, overlap in [(4, 1), (5, 2), (6, 0), (16, 4), (3, 2)]:
        got = vae_lib.tiled_decode(local, z, tile=tile, overlap=overlap)
        np.testing.assert_allclose(got, local(z), rtol=1e-6, atol=1e-6)


def test_tile_starts_cover_and_overlap():
    for size, tile, overlap in [(8, 6, 2), (13, 4, 1), (64, 16, 4), (100, 64, 16), (5, 8, 2)]:
        starts = vae_lib._tile_starts(size, tile, overlap)
        t = min(tile, size)
        assert starts[0] == 0 and starts[-1] + t == size
        assert all(b - a <= t - overlap for a, b in itertools.pairwise(starts))
    with pytest.raises(ValueError, match="overlap < tile"):
        vae_lib.tiled_decode(lambda t: t, np.zeros((1, 8, 8, 4)), tile=4, overlap=4)


def test_latent_scaling_round_trip():
    z = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
    vae = model()
    assert vae.scaling_factor == pytest.approx(0.18215) and vae.shift_factor == 0.0
    lat = vae_lib.to_latents(z, 1.5305, 0.0609)
    np.testing.assert_allclose(lat, 1.5305 * (z - 0.0609), rtol=1e-6)
    np.testing.assert_allclose(vae_lib.from_latents(lat, 1.5305, 0.0609), z, atol=1e-6)
    lat = vae_lib.to_latents(z, vae.scaling_factor, None)
    np.testing.assert_allclose(vae_lib.from_latents(lat, vae.scaling_factor), z, atol=1e-6)


def test_latent_sample_statistics():
    mean = jnp.full((1, 32, 32, 4), 0.5)
    logvar = jnp.full((1, 32, 32, 4), np.log(4.0))
    s = vae_lib.latent_sample(mean, logvar, jax.random.key(0))
    assert abs(float(s.mean()) - 0.5) < 0.1 and abs(float(s.std()) - 2.0) < 0.1


def test_config_options_refused_by_name():
    base = safetensors_io.read_config(str(FIXTURE / "vae"))
    cases = [
        ({"frobnicate": 1}, "frobnicate"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
        ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean"),
        (
            {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
            "AttnDownEncoderBlock2D",
        ),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
    ]
    for change, name in cases:
        with pytest.raises(ValueError, match=name):
            vae_lib.from_diffusers_config({**base, **change})
    with pytest.raises(ValueError, match="act_fn"):
        vae_lib.AutoencoderKL(act_fn="relu").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_config_defaults_and_optional_convs():
    # Absent keys take diffusers' defaults; SD3/Flux-style VAEs drop the quant convs.
    vae = vae_lib.from_diffusers_config(
        {
            "block_out_channels": [8, 16],
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "norm_num_groups": 4,
            "latent_channels": 16,
            "shift_factor": 0.0609,
            "scaling_factor": 1.5305,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "mid_block_add_attention": False,
        }
    )
    assert vae.layers_per_block == 1 and vae.shift_factor == pytest.approx(0.0609)
    params = jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    params = nn.meta.unbox(params)
    assert "quant_conv" not in params and "post_quant_conv" not in params
    assert "attentions.0" not in params["encoder"]["mid_block"]
    assert params["encoder"]["conv_out"]["kernel"].shape == (3, 3, 16, 32)
    assert set(params) == {"encoder", "decoder"}


def test_rename_legacy_key():
    r = vae_lib.rename_legacy_key
    assert r("encoder.mid_block.attentions.0.query.weight") == (
        "encoder.mid_block.attentions.0.to_q.weight"
    )
    assert r("decoder.mid_block.attentions.0.proj_attn.bias") == (
        "decoder.mid_block.attentions.0.to_out.0.bias"
    )
    assert r("decoder.mid_block.attentions.0.group_norm.weight").endswith("group_norm.weight")
    assert r("encoder.conv_in.weight") == "encoder.conv_in.weight"
    both = {
        "a.attentions.0.query.weight": np.zeros((4, 4, 1, 1)),
        "a.attentions.0.to_q.weight": np.zeros((4, 4)),
    }
    with pytest.raises(ValueError, match="both"):
        vae_lib.fix_legacy_tensors(both)


def test_bad_inputs_and_posterior_needs_key():
    vae, params = model(), load("vae")
    with pytest.raises(ValueError, match="NHWC"):
        vae.apply({"params": params}, jnp.zeros((1, 3, 16, 16)), method=vae.encode)
    x = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match="key"):
        vae.apply({"params": params}, x, sample_posterior=True)
    out = jax.eval_shape(
        lambda k: vae.apply({"params": params}, x, sample_posterior=True, key=k),
        jax.random.key(0),
    )
    assert out.shape == x.shape and out.dtype == jnp.float32
