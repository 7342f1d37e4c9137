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
    forward_flops,
    model_summary,
    train_step_memory,
)

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
    s = model_summary(model, image_size=8, channels=4, memory=False)
    assert (
        abs(s["forward_gflops"] * 1e9 - one) < 1 and s["forward_gmacs"] == s["forward_gflops"] / 2
    )
    assert s["activation_memory_bytes"] == -1 and s["param_bytes"] == 4 * s["params"]


def test_activation_memory_grows_with_batch_and_shrinks_with_remat():
    small = {**TINY, "depth": 1}
    plain = build_model("dit", **small)
    remat = build_model("dit", **small, remat_policy="full")
    params = abstract_variables(plain, _inputs(plain, 1))["params"]
    m8 = train_step_memory(plain, params, _inputs(plain, 8))["activation_memory_bytes"]
    m32 = train_step_memory(plain, params, _inputs(plain, 32))["activation_memory_bytes"]
    r32 = train_step_memory(remat, params, _inputs(remat, 32))["activation_memory_bytes"]
    assert 0 < m8 < m32
    assert r32 < m32  # recomputing blocks in the backward pass saves activations


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
            "--memory=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
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
    want = model_summary(model, image_size=8, channels=1, memory=False)
    assert out["params"] == want["params"] > 0
    assert abs(out["forward_gflops"] - want["forward_gflops"]) < 1e-9
    assert out["batch_size"] == config.train.batch_size
    assert out["activation_memory_bytes"] == -1
