"""Checkpoint round trip, verification, fallback and refusal to save NaN."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import data
from diffjax.checkpoint import Checkpointer, CheckpointError, tree_checksums


def _state(seed=0):
    k = jax.random.key(seed)
    return {
        "w": jax.random.normal(k, (64, 32)),
        "b": jnp.arange(5, dtype=jnp.int32),
        "h": jnp.ones((7,), jnp.bfloat16),
        "rng": jax.random.key(3),
    }


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _save(tmp_path, steps, max_to_keep=5):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=max_to_keep)
    it = data.make_iterator(data.digits_source(), batch_size=8, seed=0)
    states = {}
    for s in steps:
        next(it)
        states[s] = _state(s)
        ckpt.save(s, states[s], it, meta={"model": {"name": "x"}})
    ckpt.wait()
    return ckpt, states


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_state_and_data_iterator(tmp_path):
    ckpt, states = _save(tmp_path, [1, 2])
    it = data.make_iterator(data.digits_source(), batch_size=8, seed=0)
    state, step = ckpt.restore_latest(_abstract(states[2]), it)
    assert step == 2
    _assert_equal(state, states[2])
    # The iterator continues after the two batches consumed before the save.
    ref = data.make_iterator(data.digits_source(), batch_size=8, seed=0)
    for _ in range(2):
        next(ref)
    np.testing.assert_array_equal(next(it)["labels"], next(ref)["labels"])
    assert ckpt.save(2, states[2]) is False  # an existing step is never overwritten


def test_checksum_detects_any_single_word_change():
    s = {"w": jnp.zeros((1000,), jnp.float32)}
    base, _ = tree_checksums(s)
    for i in (0, 1, 999):
        for bit in (0, 31):
            w = np.zeros(1000, np.uint32)
            w[i] = 1 << bit
            changed, _ = tree_checksums({"w": jnp.asarray(w.view(np.float32))})
            assert changed != base


def _data_files(ckpt_dir, step):
    files = [
        f
        for f in glob.glob(os.path.join(ckpt_dir, str(step), "state", "**", "*"), recursive=True)
        if os.path.isfile(f) and os.sep + "d" + os.sep in f
    ]
    assert files, "expected OCDBT data files"
    return files


def test_flipped_bytes_in_latest_fall_back_to_previous(tmp_path, caplog):
    ckpt, states = _save(tmp_path, [1, 2])
    for path in _data_files(ckpt.directory, 2):
        raw = bytearray(open(path, "rb").read())
        mid = len(raw) // 2
        raw[mid : mid + 8] = bytes(b ^ 0xFF for b in raw[mid : mid + 8])
        open(path, "wb").write(bytes(raw))  # same size, different bytes
    state, step = ckpt.restore_latest(_abstract(states[1]))
    assert step == 1
    _assert_equal(state, states[1])
    assert "step 2" in caplog.text or "Checkpoint step 2" in caplog.text


def test_missing_file_in_latest_falls_back(tmp_path):
    ckpt, states = _save(tmp_path, [1, 2])
    for path in _data_files(ckpt.directory, 2):
        os.remove(path)
    state, step = ckpt.restore_latest(_abstract(states[1]))
    assert step == 1


def test_all_corrupt_raises_with_the_fix(tmp_path):
    ckpt, states = _save(tmp_path, [1])
    for path in _data_files(ckpt.directory, 1):
        os.remove(path)
    with pytest.raises(CheckpointError, match="Move that directory away"):
        ckpt.restore_latest(_abstract(states[1]))


def test_refuses_to_save_nan(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "c"))
    with pytest.raises(CheckpointError, match="NaN"):
        ckpt.save(1, {"w": jnp.array([1.0, jnp.nan])})
    assert ckpt.all_steps() == []


def test_restore_reshards_8_devices_onto_4(tmp_path):
    from jax.sharding import NamedSharding, PartitionSpec

    from diffjax.parallel import make_mesh

    mesh8 = make_mesh(data=-1, fsdp=1)
    x = jax.device_put(jnp.arange(64.0).reshape(16, 4), NamedSharding(mesh8, PartitionSpec("data")))
    ckpt = Checkpointer(str(tmp_path / "c"))
    ckpt.save(1, {"x": x})
    ckpt.wait()
    mesh4 = make_mesh(data=4, fsdp=1, devices=jax.devices()[:4])
    target = {
        "x": jax.ShapeDtypeStruct(
            (16, 4), jnp.float32, sharding=NamedSharding(mesh4, PartitionSpec("data"))
        )
    }
    restored, _ = ckpt.restore_latest(target)
    assert restored["x"].sharding.mesh.devices.size == 4
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(64.0).reshape(16, 4))
