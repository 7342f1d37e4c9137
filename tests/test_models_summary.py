"""model_summary (params, forward cost, activation memory) and launch/inspect_model.py."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp

from diffjax.models import build_model
from diffjax.models.summary import (
    abstract_inputs,
    abstract_variables,
    compiled_train_memory,
    count_params,
    forward_flops,
    model_summary,
    saved_activation_bytes,
)
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def _inputs(model, batch):
    return abstract_inputs(model, batch_size=batch, image_size=8, channels=4)


def test_forward_flops_are_per_batch_and_linear_in_batch():
    model = build_model("dit", **TINY)
    params = abstract_variables(model, _inputs(model, 1))["params"]
    one = forward_flops(model, params, _inputs(model, 1))
    four = forward_flops(model, params, _inputs(model, 4))
    # Everything but a few batch-independent constants (the frequency vector of
    # the time embedding) scales with the batch.
    assert abs(four / one - 4) < 1e-3
    s = model_summary(model, image_size=8, channels=4, batch_size=4)
    assert abs(s["forward_gflops"] * 1e9 - one) < 1
    assert s["forward_gmacs"] == s["forward_gflops"] / 2
    assert s["param_bytes"] == 4 * s["params"] and "xla_temp_bytes" not in s
    assert s["activation_memory_bytes"] == saved_activation_bytes(model, params, _inputs(model, 4))


def test_saved_activations_scale_with_batch_and_shrink_with_remat():
    def saved(batch, **kw):
        model = build_model("dit", **{**TINY, **kw})
        params = abstract_variables(model, _inputs(model, 1))["params"]
        return saved_activation_bytes(model, params, _inputs(model, batch))

    none4, none8 = saved(4), saved(8)
    assert none4 > 0 and none8 == 2 * none4  # every saved activation has a batch dim
    dots, full = saved(8, remat_policy="dots_saveable"), saved(8, remat_policy="full")
    assert full < dots < none8
    # With full remat one more block keeps exactly its input tokens, float32
    # [B, T, D] (the conditioning vector it also reads is shared by all blocks).
    b, tokens, d = 8, (8 // 2) ** 2, TINY["hidden_size"]
    assert saved(8, depth=3, remat_policy="full") - full == b * tokens * d * 4
    assert saved(8, depth=3) - none8 > 10 * b * tokens * d * 4


def test_compiled_train_memory_reports_xla_buffers():
    model = build_model("dit", **{**TINY, "depth": 1})
    params = abstract_variables(model, _inputs(model, 1))["params"]
    mem = compiled_train_memory(model, params, _inputs(model, 4))
    assert mem["temp_bytes"] > 0
    assert mem["argument_bytes"] >= 4 * count_params(params)  # params are arguments
    assert mem["output_bytes"] >= 4 * count_params(params)  # and so are the gradients


def test_text_model_inputs():
    model = build_model("dit", **TINY, context_dim=8)
    inputs = abstract_inputs(model, batch_size=2, image_size=8, channels=4, text_len=5)
    assert inputs["context"].shape == (2, 5, 8) and inputs["context_mask"].dtype == jnp.bool_
    own = build_model("dit", **TINY, context_dim=8, text_vocab_size=50)
    inputs = abstract_inputs(own, batch_size=2, image_size=8, channels=4, text_len=5)
    assert inputs["context"].shape == (2, 5) and inputs["context"].dtype == jnp.int32


def test_inspect_model_prints_one_json_object():
    proc = subprocess.run(
        [
            sys.executable,
            "launch/inspect_model.py",
            "--config=configs/digits.py:quick",
            "--batch_size=16",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    sys.path.insert(0, ROOT)
    from configs.digits import get_config

    config = get_config("quick")
    model = build_model(
        config.model.name,
        **config.model.kwargs.to_dict(),
        dtype=config.model.dtype,
        remat_policy=config.model.remat_policy,
    )
    want = model_summary(model, image_size=8, channels=1, batch_size=16)
    assert out["params"] == want["params"] > 0
    assert abs(out["forward_gflops"] - want["forward_gflops"]) < 1e-9
    assert out["batch_size"] == 16
    assert out["activation_memory_bytes"] == want["activation_memory_bytes"] > 0
