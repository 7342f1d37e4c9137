"""Meshes, shardings and sharded training matching the 1-device run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs.digits import get_config
from diffjax import data, parallel
from diffjax.rundir import build_components


def test_mesh_shape_fills_and_validates():
    assert parallel.mesh_shape(-1, 1, 8) == (8, 1)
    assert parallel.mesh_shape(4, -1, 8) == (4, 2)
    assert parallel.mesh_shape(1, -1, 8) == (1, 8)
    with pytest.raises(ValueError, match="divisible"):
        parallel.mesh_shape(3, -1, 8)
    with pytest.raises(ValueError, match="are available"):
        parallel.mesh_shape(2, 2, 8)
    with pytest.raises(ValueError, match="At most one"):
        parallel.mesh_shape(-1, -1, 8)


def test_batch_size_must_divide_devices():
    mesh = parallel.make_mesh(-1, 1)
    assert parallel.check_batch_size(32, mesh, 2) == 32
    with pytest.raises(ValueError, match="divisible by the device count"):
        parallel.check_batch_size(12, mesh)


def _losses(config, mesh, batches, steps=3):
    parts = build_components(config, mesh)
    state = jax.jit(functools.partial(parts.init, unbox=True), out_shardings=parts.state_sharding)(
        jax.random.key(config.seed)
    )
    step = jax.jit(
        parts.train_step,
        in_shardings=(parts.state_sharding, parallel.batch_sharding(mesh)),
        out_shardings=(parts.state_sharding, parallel.replicated(mesh)),
        donate_argnums=0,
    )
    losses = []
    for b in batches[:steps]:
        state, metrics = step(state, parallel.global_batch(b, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def setup():
    config = get_config("quick")
    kw = config.model.kwargs
    kw.dropout, kw.base_channels, kw.num_groups, kw.attention_resolutions = 0.0, 8, 4, ()
    # One resolution, no mid attention: six meshes each compile init and train step cold.
    kw.channel_mult, kw.mid_attention = (1,), False
    it = data.make_iterator(data.digits_source(), batch_size=config.train.batch_size, seed=0)
    batches = [next(it) for _ in range(3)]
    one = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    ref, _ = _losses(config, one, batches)
    return config, batches, ref, one


@pytest.mark.parametrize(("dp", "fsdp"), [(8, 1), (4, 2), (1, 8)])
def test_sharded_losses_match_one_device(setup, dp, fsdp):
    config, batches, ref, _ = setup
    losses, state = _losses(config, parallel.make_mesh(dp, fsdp), batches)
    np.testing.assert_allclose(losses, ref, rtol=2e-4, atol=1e-5)
    if fsdp > 1:
        # FSDP really shards: some kernel is split over the fsdp axis.
        specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
        assert any("fsdp" in str(s) for s in specs if s != PartitionSpec())


def test_grad_accumulation_on_a_mesh_matches_one_device(setup):
    # Micro-batches draw their own noise, so accumulation is compared with itself;
    # its equality with the full batch is tested on a deterministic loss in
    # test_train_step.py.
    config, batches, _, one = setup
    config = config.copy_and_resolve_references()
    config.train.grad_accum_steps = 2
    ref, _ = _losses(config, one, batches, steps=2)
    losses, _ = _losses(
        config, parallel.make_mesh(4, 1, devices=jax.devices()[:4]), batches, steps=2
    )
    np.testing.assert_allclose(losses, ref, rtol=2e-4, atol=1e-5)


def _conv_hlo(options):
    # The digits U-Net's shape (XLA keeps tiny convolutions to itself anyway).
    x = jnp.ones((32, 8, 8, 64), jnp.float32)
    w = jnp.ones((3, 3, 64, 64), jnp.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.jit(conv, compiler_options=options).lower(x, w).compile().as_text()


def test_cpu_compiler_options_take_convolutions_from_ynnpack(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    parallel.compiler_options.cache_clear()
    assert parallel.compiler_options("gpu") == {}
    assert "__ynn_fusion" in _conv_hlo({})  # XLA's default hands it to YNNPACK
    for program in ("train", "sample"):
        options = parallel.compiler_options("cpu", program)
        assert options == parallel.CPU_COMPILER_OPTIONS[program]
        assert "__ynn_fusion" not in _conv_hlo(options)  # kept in XLA


def test_cpu_compiler_options_defer_to_user_and_drop_unknown(monkeypatch, caplog):
    option = next(iter(parallel.CPU_COMPILER_OPTIONS["train"]))
    monkeypatch.setenv("XLA_FLAGS", f"--{option}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    parallel.compiler_options.cache_clear()
    assert parallel.compiler_options("cpu") == {}
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(
        parallel, "CPU_COMPILER_OPTIONS", {"train": {"xla_cpu_no_such_option": "1"}}
    )
    parallel.compiler_options.cache_clear()
    with caplog.at_level("WARNING"):
        assert parallel.compiler_options("cpu") == {}
    assert "xla_cpu_no_such_option" in caplog.text
    parallel.compiler_options.cache_clear()
