"""SDUNet: parity with diffusers' UNet2DConditionModel on tiny random checkpoints.

The fixtures (tests/fixtures/sd_unet/{sd1,sd2}, written by make_sd_unet.py) are real
diffusers `unet/` directories with every weight redrawn from N(0, 0.2), so a wrong
mapping, a wrong head split or a wrong padding changes the output by O(1). A SAME-padded
stride-2 downsampler (instead of diffusers' padding 1) is off by ~0.8 on sd1.
"""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from diffjax.models import build_model, model_fields
from diffjax.models.sd_unet import SDUNet, count_skips, from_diffusers_config
from diffjax.pretrained import convert, safetensors_io

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "sd_unet")


def _jit(fn):
    return jax.jit(fn)


def _assert_close(got, want, rtol=1e-4):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.abs(got - want).max()
    assert err <= rtol * np.abs(want).max(), (
        f"max abs error {err:.3g} (scale {np.abs(want).max():.3g})"
    )


@functools.cache
def _load(name: str):
    d = os.path.join(FIXTURES, name)
    model = from_diffusers_config(safetensors_io.read_config(d))
    ref = dict(np.load(os.path.join(d, "reference.npz")))
    abstract = jax.eval_shape(
        model.init, jax.random.key(0), ref["x"], ref["t"], context=ref["context"]
    )["params"]
    params = convert.torch_to_flax(safetensors_io.read_tensors(d), abstract, what="unet")
    return model, params, ref


def _residuals(ref):
    n = len([k for k in ref if k.startswith("down_res_")])
    return tuple(ref[f"down_res_{i}"] for i in range(n)), ref["mid_res"]


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_matches_diffusers_with_and_without_mask_and_control_residuals(name):
    # One program (compiling is most of the cost): batch [plain | masked | controlled].
    # An all-True mask attends to every token like `context_mask=None`, and zero
    # residuals are no residuals, so each third is what diffusers computed for it.
    model, params, ref = _load(name)
    down, mid = _residuals(ref)
    assert len(down) == count_skips(model)

    def cat3(plain, masked, controlled):
        return np.concatenate([plain, masked, controlled])

    x, t, ctx = (cat3(ref[k], ref[k], ref[k]) for k in ("x", "t", "context"))
    ones = np.ones_like(ref["mask"])
    mask = cat3(ones, ref["mask"], ones)
    zero = np.zeros_like
    control = (tuple(cat3(zero(d), zero(d), d) for d in down), cat3(zero(mid), zero(mid), mid))

    @_jit
    def run(p, x, t, ctx, mask, control):
        return model.apply(
            {"params": p}, x, t, context=ctx, context_mask=mask, control_residuals=control
        )

    out = np.asarray(run(params, x, t, ctx, mask, control))
    plain, masked, controlled = np.split(out, 3)
    _assert_close(plain, ref["out"])
    _assert_close(masked, ref["out_mask"])
    _assert_close(controlled, ref["out_ctrl"])


def test_odd_sizes_upsample_to_the_skip_size_like_diffusers():
    model, params, ref = _load("sd1")  # 7x5 -> 4x3 (stride 2, padding 1) -> 7x5
    run = _jit(lambda p, x, t, c: model.apply({"params": p}, x, t, context=c))
    _assert_close(run(params, ref["x_odd"], ref["t"], ref["context"]), ref["out_odd"])


def test_export_gives_back_the_diffusers_state_dict():
    _, params, _ = _load("sd2")
    d = os.path.join(FIXTURES, "sd2")
    tensors = safetensors_io.read_tensors(d)
    exported = convert.flax_to_torch(params)
    assert set(exported) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


SD15 = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD21 = {
    **SD15,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    "sample_size": 96,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "class_embed_type": None,
    "resnet_time_scale_shift": "default",
    "num_attention_heads": None,
}


def test_sd15_config_has_diffusers_parameter_count():
    # diffusers 0.42.1 on the meta device: 686 tensors, 859,520,964 parameters (SD 2.1:
    # 865,910,724, the same modules with 1024-wide text keys/values).
    model = from_diffusers_config(SD15)
    x, t = np.zeros((1, 8, 8, 4), np.float32), np.zeros((1,), np.float32)
    ctx = np.zeros((1, 77, 768), np.float32)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, context=ctx))
    leaves = jax.tree.leaves(params)
    assert len(leaves) == 686
    assert sum(int(np.prod(a.shape)) for a in leaves) == 859_520_964


def test_sd21_config_reads_per_block_heads_and_linear_projection():
    model = from_diffusers_config(SD21, dtype="bfloat16")
    assert model.attention_head_dim == (5, 10, 20, 20)  # heads per block (diffusers' quirk)
    assert model._heads() == (5, 10, 20, 20)
    assert model.use_linear_projection and model.upcast_attention
    assert model.cross_attention_dim == 1024 and model.dtype == "bfloat16"


@pytest.mark.parametrize(
    "key,value",
    [
        ("addition_embed_type", "text_time"),
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("encoder_hid_dim", 512),
        ("time_cond_proj_dim", 256),
        ("dual_cross_attention", True),
        ("only_cross_attention", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("attention_type", "gated"),
        ("conv_in_kernel", 7),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]),
        ("time_embedding_type", "fourier"),
        ("some_future_option", 1),
    ],
)
def test_unsupported_options_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=key):
        from_diffusers_config({**SD15, key: value})


def test_labels_and_wrong_inputs_are_refused():
    model, _, ref = _load("sd1")
    x, t, ctx = ref["x"], ref["t"], ref["context"]
    init = functools.partial(jax.eval_shape, model.init, jax.random.key(0))
    with pytest.raises(ValueError, match="no class conditioning"):
        init(x, t, labels=np.zeros((2,), np.int32), context=ctx)
    with pytest.raises(ValueError, match="cross_attention_dim=24"):
        init(x, t, context=ctx[..., :8])
    with pytest.raises(ValueError, match="control_residuals needs 4 down residuals"):
        init(x, t, context=ctx, control_residuals=((ref["down_res_0"],), ref["mid_res"]))


def test_registry_builds_it_from_json_kwargs():
    assert "attention_head_dim" in model_fields("sd_unet")
    cfg = json.load(open(os.path.join(FIXTURES, "sd2", "config.json")))
    want = from_diffusers_config(cfg)
    kwargs = {f: json.loads(json.dumps(getattr(want, f))) for f in model_fields("sd_unet")}
    model = build_model("sd_unet", **kwargs)  # lists from JSON become tuples
    assert isinstance(model, SDUNet) and model == want
    # Without context the model sees one zero token, so init runs (here rematerialised).
    x, t = np.zeros((1, 8, 8, 4), np.float32), np.zeros((1,), np.float32)
    remat = build_model("sd_unet", **{**kwargs, "remat_policy": "full"})
    out, variables = jax.eval_shape(remat.init_with_output, jax.random.key(0), x, t)
    assert out.shape == (1, 8, 8, 4) and out.dtype == np.float32
    assert jax.tree.structure(nn.meta.unbox(variables["params"])) == jax.tree.structure(
        _load("sd2")[1]
    )
