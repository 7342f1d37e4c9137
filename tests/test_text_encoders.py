"""CLIP text and T5 encoder ports against transformers' outputs (no torch here).

The fixtures (tests/fixtures/make_text_encoders.py) are tiny random-weight
`CLIPTextModel`s / `T5EncoderModel`s saved by transformers 5.x, with reference outputs.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import clip_text, t5
from diffjax.pretrained import convert, safetensors_io

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CLIP_DIR = os.path.join(FIXTURES, "clip_text")
T5_DIR = os.path.join(FIXTURES, "t5")


def assert_close(got, want, rtol: float = 1e-4, what: str = ""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


@functools.cache
def jitted_apply(model):
    """`model.apply({"params": p}, *args)` compiled once per model (and argument shapes)."""
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args))


def read_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def load_clip(name: str, dtype: str = "float32"):
    directory = os.path.join(CLIP_DIR, name)
    model = clip_text.from_hf_config(read_config(directory), dtype=dtype)
    ids = jax.ShapeDtypeStruct((1, model.max_position_embeddings), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    params = convert.torch_to_flax(
        safetensors_io.read_tensors(directory),
        abstract,
        what="text_encoder",
        rename=clip_text.canonical_key,
        ignore=clip_text.ignored_key,
    )
    return model, params, np.load(os.path.join(directory, "reference.npz"))


def load_t5(name: str, tensors=None, dtype: str = "float32"):
    directory = os.path.join(T5_DIR, name)
    model = t5.from_hf_config(read_config(directory), dtype=dtype)
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    if tensors is None:
        tensors = safetensors_io.read_tensors(directory)
    params = convert.torch_to_flax(t5.prepare_tensors(tensors), abstract, what="text_encoder_t5")
    return model, params, np.load(os.path.join(directory, "reference.npz"))


@pytest.fixture(scope="module", params=["modern", "legacy"])
def clip(request):
    return load_clip(request.param)


# ----------------------------------------------------------------------------- CLIP


def test_clip_checkpoint_layouts():
    # transformers 5.x writes keys without `text_model.`; the SD-style file has the prefix
    # and the old position_ids buffer. Both load through canonical_key / ignored_key.
    modern = safetensors_io.read_tensors(os.path.join(CLIP_DIR, "modern"))
    legacy = safetensors_io.read_tensors(os.path.join(CLIP_DIR, "legacy"))
    assert "embeddings.token_embedding.weight" in modern
    assert "text_model.embeddings.position_ids" in legacy
    assert (
        clip_text.canonical_key("final_layer_norm.weight") == "text_model.final_layer_norm.weight"
    )
    assert clip_text.canonical_key("text_model.final_layer_norm.weight") == (
        "text_model.final_layer_norm.weight"
    )
    assert clip_text.ignored_key("embeddings.position_ids")
    assert not clip_text.ignored_key("text_model.embeddings.position_embedding.weight")


@pytest.mark.parametrize("masked", [False, True])
def test_clip_matches_transformers(clip, masked):
    model, params, ref = clip
    prefix = "masked_" if masked else ""
    mask = jnp.asarray(ref["attention_mask"]) if masked else None
    out = jitted_apply(model)(params, jnp.asarray(ref["input_ids"]), mask)
    assert_close(out["last_hidden_state"], ref[prefix + "last_hidden_state"], what="last")
    # The pooling rule (argmax for eos_token_id=2, else the first EOS) picks other rows'
    # positions in these inputs than the other rule would.
    assert_close(out["pooler_output"], ref[prefix + "pooler_output"], what="pooled")
    assert len(out["hidden_states"]) == model.num_hidden_layers + 1
    assert_close(np.stack(out["hidden_states"]), ref[prefix + "hidden_states"], what="hidden")


def test_clip_skip(clip):
    model, params, ref = clip
    out = jitted_apply(model)(params, jnp.asarray(ref["input_ids"]), None)
    assert_close(
        clip_text.clip_skip_output(out, 0, model=model, params=params), ref["last_hidden_state"]
    )
    # diffusers: final_layer_norm(hidden_states[-(clip_skip + 1)]); reference norm in numpy.
    h = ref["hidden_states"][-2].astype(np.float64)
    ln = params["text_model"]["final_layer_norm"]
    want = (h - h.mean(-1, keepdims=True)) / np.sqrt(
        h.var(-1, keepdims=True) + model.layer_norm_eps
    )
    want = want * ln["scale"] + ln["bias"]
    assert_close(clip_text.clip_skip_output(out, 1, model=model, params=params), want)
    with pytest.raises(ValueError, match="clip skip"):
        clip_text.clip_skip_output(out, model.num_hidden_layers + 1, model=model, params=params)


def test_clip_bfloat16_runs_close():
    model, params, ref = load_clip("modern", dtype="bfloat16")
    out = jitted_apply(model)(params, jnp.asarray(ref["input_ids"]))
    assert out["last_hidden_state"].dtype == jnp.bfloat16
    assert_close(out["last_hidden_state"], ref["last_hidden_state"], rtol=5e-2)


def test_clip_refuses_unsupported_options():
    cfg = read_config(os.path.join(CLIP_DIR, "modern"))
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        clip_text.from_hf_config({**cfg, "hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="model_type='clip'.*text_config"):
        clip_text.from_hf_config({**cfg, "model_type": "clip"})
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        clip_text.from_hf_config({**cfg, "architectures": ["CLIPTextModelWithProjection"]})
    model = clip_text.from_hf_config(cfg)
    with pytest.raises(ValueError, match="max_position_embeddings=77"):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 78), jnp.int32))


def test_clip_wrong_config_names_the_keys():
    cfg = read_config(os.path.join(CLIP_DIR, "modern"))
    model = clip_text.from_hf_config({**cfg, "num_hidden_layers": 3})
    abstract = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.int32)
    )["params"]
    tensors = safetensors_io.read_tensors(os.path.join(CLIP_DIR, "modern"))
    with pytest.raises(convert.ConversionError, match="text_model.encoder.layers.2.mlp.fc1.weight"):
        convert.torch_to_flax(tensors, abstract, what="clip", rename=clip_text.canonical_key)


# ----------------------------------------------------------------------------- T5


@pytest.mark.parametrize("name", ["relu", "gated"])
def test_t5_matches_transformers(name):
    model, params, ref = load_t5(name)
    fn = jitted_apply(model)
    ids = jnp.asarray(ref["input_ids"])
    assert_close(fn(params, ids, jnp.asarray(ref["attention_mask"])), ref["last_hidden_state"])
    assert_close(fn(params, ids, None), ref["nomask_last_hidden_state"])


def test_t5_tied_embeddings():
    relu = safetensors_io.read_tensors(os.path.join(T5_DIR, "relu"))
    gated = safetensors_io.read_tensors(os.path.join(T5_DIR, "gated"))
    # transformers 5.x writes only shared.weight; older files hold embed_tokens as well.
    assert "shared.weight" in relu and "encoder.embed_tokens.weight" not in relu
    assert "encoder.embed_tokens.weight" in gated
    # A file holding only encoder.embed_tokens.weight (plus a decoder to drop).
    only_embed = {k: v for k, v in gated.items() if k != "shared.weight"}
    only_embed["decoder.final_layer_norm.weight"] = np.ones(4, np.float32)
    model, params, ref = load_t5("gated", tensors=only_embed)
    out = jitted_apply(model)(params, jnp.asarray(ref["input_ids"]), None)
    assert_close(out, ref["nomask_last_hidden_state"])
    bad = dict(gated, **{"encoder.embed_tokens.weight": gated["shared.weight"] + 1})
    with pytest.raises(ValueError, match="ties them"):
        t5.prepare_tensors(bad)


def test_t5_relative_position_buckets():
    ref = np.load(os.path.join(T5_DIR, "relative_buckets.npz"))
    for num_buckets, max_distance in ((32, 128), (8, 12)):
        got = t5.relative_position_bucket(
            ref["relative_position"],
            bidirectional=True,
            num_buckets=num_buckets,
            max_distance=max_distance,
        )
        np.testing.assert_array_equal(got, ref[f"buckets_{num_buckets}_{max_distance}"])


def test_t5_bfloat16_runs_close():
    model, params, ref = load_t5("gated", dtype="bfloat16")
    out = jitted_apply(model)(params, jnp.asarray(ref["input_ids"]))
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref["nomask_last_hidden_state"], rtol=5e-2)


def test_t5_refuses_unsupported_options():
    cfg = read_config(os.path.join(T5_DIR, "relu"))
    with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'"):
        t5.from_hf_config({**cfg, "feed_forward_proj": "gated-silu"})
    with pytest.raises(ValueError, match="model_type='umt5'"):
        t5.from_hf_config({**cfg, "model_type": "umt5"})
    with pytest.raises(ValueError, match="is_decoder"):
        t5.from_hf_config({**cfg, "is_decoder": True})
