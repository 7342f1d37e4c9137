"""The small text encoder, alone and inside text-conditioned U-Net / DiT models.

The tokenizers that feed it are tested in test_text.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models import build_model, build_preset
from diffjax.models.text import TextEncoder
from diffjax.text import WordTokenizer


def test_text_encoder_masks_padding_and_handles_empty_captions():
    tok = WordTokenizer(max_len=5)
    ids, mask = tok.encode(["a handwritten seven", ""])
    enc = TextEncoder(tok.vocab_size, width=16, depth=1, num_heads=2)
    params = jax.jit(enc.init)(jax.random.key(0), ids, mask)
    f = jax.jit(enc.apply)
    out = f(params, ids, mask)
    assert out.shape == (2, 5, 16) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    assert float(jnp.abs(out[1]).max()) == 0.0  # empty caption -> zeros
    assert float(jnp.abs(out[0, 3:]).max()) == 0.0  # padded positions -> zeros
    # Whatever sits in padded slots does not leak into the real tokens.
    junk = ids.copy()
    junk[0, 3:] = [17, 99]
    np.testing.assert_allclose(f(params, junk, mask)[0, :3], out[0, :3], atol=1e-6)


def test_unet_digits_text_preset_takes_token_ids():
    model = build_preset("unet_digits_text")
    ids, mask = WordTokenizer(max_len=16).encode(["a handwritten seven", ""])
    x = jnp.zeros((2, 8, 8, 1))
    t = jnp.zeros(2)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, None, ids, mask)["params"]
    assert params["text_encoder"]["token_emb"]["embedding"].value.shape == (4097, 64)
    out = jax.eval_shape(
        lambda p: model.apply({"params": p}, x, t, None, ids, mask), nn.meta.unbox(params)
    )
    assert out.shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="integer token ids"):
        jax.eval_shape(model.init, jax.random.key(0), x, t, None, jnp.zeros((2, 16)), mask)


def test_text_conditioned_model_trains_its_encoder_end_to_end():
    model = build_model(
        "dit",
        patch_size=2,
        hidden_size=16,
        depth=1,
        num_heads=2,
        num_classes=0,
        context_dim=16,
        text_vocab_size=4097,
        text_depth=1,
        text_heads=2,
    )
    tok = WordTokenizer(max_len=4)
    ids, mask = tok.encode(["a handwritten seven", ""])  # second row: caption dropout
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([10.0, 500.0])
    abstract = jax.eval_shape(model.init, jax.random.key(1), x, t, None, ids, mask)["params"]
    # Random weights: real init zeroes the adaLN gates, the cross-attention output
    # and the final layer, which would block any gradient to the text encoder.
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) * 0.2),
        nn.meta.unbox(abstract),
    )

    def loss(p):
        return jnp.mean((model.apply({"params": p}, x, t, None, ids, mask) - x) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # The diffusion loss reaches the token table through the cross-attention...
    emb_grad = grads["text_encoder"]["token_emb"]["embedding"]
    assert float(jnp.abs(emb_grad[ids[0, :3]]).min()) > 0
    # ...and only the rows of real caption tokens (not padding, not unused ids).
    unused = np.setdiff1d(np.arange(tok.vocab_size), ids[0, :3])
    assert float(jnp.abs(emb_grad[unused]).max()) == 0.0
