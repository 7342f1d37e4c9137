"""The pure train step: accumulation, EMA, non-finite guard, condition dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax.train.state import ema_decay_at, make_optimizer
from diffjax.train.step import drop_conditioning, init_train_state, make_train_step


def _linear_problem():
    # loss = mean((x @ w - y)^2): gradients are exact, so accumulation must match.
    def loss_fn(params, batch, rng, frozen=None, step=None):
        del rng, frozen, step
        pred = batch["image"] @ params["w"]
        return jnp.mean((pred - batch["label"]) ** 2)

    x = jax.random.normal(jax.random.key(0), (16, 3))
    batch = {"image": x, "label": x @ jnp.array([1.0, -2.0, 0.5])}
    init = lambda k: {"w": jnp.zeros((3,))}  # noqa: E731
    return loss_fn, batch, init


def test_grad_accumulation_equals_full_batch():
    loss_fn, batch, init = _linear_problem()
    tx, lr = make_optimizer(learning_rate=0.1)
    results = []
    for accum in (1, 4):
        step = jax.jit(make_train_step(loss_fn, tx, lr, ema_decay=0.9, grad_accum_steps=accum))
        state = init_train_state(jax.random.key(0), init, tx, unbox=True)
        for _ in range(3):
            state, metrics = step(state, batch)
        results.append((state.params["w"], metrics["loss"]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)


def test_aux_metrics_join_the_step_and_average_over_micro_batches():
    loss_fn, batch, init = _linear_problem()

    def with_aux(params, batch, rng, frozen, step):
        return loss_fn(params, batch, rng), {"mean_label": jnp.mean(batch["label"])}

    tx, lr = make_optimizer(learning_rate=0.1)
    plain = jax.jit(make_train_step(loss_fn, tx, lr, ema_decay=0.9))
    state0 = init_train_state(jax.random.key(0), init, tx, unbox=True)
    ref_state, ref = plain(state0, batch)
    for accum in (1, 4):
        step = make_train_step(
            with_aux, tx, lr, ema_decay=0.9, grad_accum_steps=accum, has_aux=True
        )
        state, metrics = jax.jit(step)(state0, batch)
        np.testing.assert_allclose(metrics["mean_label"], jnp.mean(batch["label"]), rtol=1e-6)
        np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(state.params["w"], ref_state.params["w"], rtol=1e-5)


def test_ema_tracks_params_with_warmup():
    loss_fn, batch, init = _linear_problem()
    tx, lr = make_optimizer(learning_rate=0.1)
    step = jax.jit(make_train_step(loss_fn, tx, lr, ema_decay=0.5, ema_warmup=False))
    state = init_train_state(jax.random.key(0), init, tx, unbox=True)
    new, _ = step(state, batch)
    np.testing.assert_allclose(new.ema_params["w"], 0.5 * new.params["w"], rtol=1e-6)
    assert float(ema_decay_at(jnp.int32(0), 0.999, True)) == np.float32(0.1)
    assert float(ema_decay_at(jnp.int32(10**6), 0.999, True)) == np.float32(0.999)


@pytest.mark.parametrize("guard", ["cond", "select"])
def test_nonfinite_step_keeps_state_and_reports(guard):
    loss_fn, batch, init = _linear_problem()
    tx, lr = make_optimizer(learning_rate=0.1)
    step = jax.jit(make_train_step(loss_fn, tx, lr, ema_decay=0.9, guard=guard))
    state = init_train_state(jax.random.key(0), init, tx, unbox=True)
    state, _ = step(state, batch)
    bad = dict(batch, image=batch["image"].at[0, 0].set(jnp.nan))
    new, metrics = step(state, bad)
    assert not bool(metrics["finite"])
    np.testing.assert_array_equal(new.params["w"], state.params["w"])
    np.testing.assert_array_equal(new.ema_params["w"], state.ema_params["w"])
    assert int(new.step) == int(state.step) + 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new.opt_state))


def test_guards_give_identical_states():
    # Both ways of skipping a non-finite step do the same arithmetic on finite steps,
    # so the states agree bit for bit (with a skipped step in between). With XLA:CPU's
    # fusion emitters, its default: the legacy emitters (the tests' conftest flags)
    # fuse the two programs differently, one ulp apart.
    loss_fn, batch, init = _linear_problem()
    tx, lr = make_optimizer(learning_rate=0.1)
    bad = dict(batch, image=batch["image"].at[0, 0].set(jnp.inf))
    states = []
    for guard in ("cond", "select"):
        step = jax.jit(
            make_train_step(loss_fn, tx, lr, ema_decay=0.9, guard=guard),
            compiler_options={"xla_cpu_use_fusion_emitters": True},
        )
        state = init_train_state(jax.random.key(0), init, tx, unbox=True)
        for b in (batch, bad, batch):
            state, _ = step(state, b)
        states.append(state)
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="guard must be"):
        make_train_step(loss_fn, tx, lr, ema_decay=0.9, guard="where")


def test_condition_dropout_uses_null_label_and_empty_caption():
    batch = {
        "image": jnp.zeros((2000, 1)),
        "labels": jnp.full((2000,), 3),
        "context_mask": jnp.ones((2000, 4), bool),
    }
    out = drop_conditioning(batch, jax.random.key(0), p=0.25, num_classes=10)
    dropped = out["labels"] == 10
    assert set(np.unique(out["labels"]).tolist()) == {3, 10}
    assert abs(float(dropped.mean()) - 0.25) < 0.04
    np.testing.assert_array_equal(out["context_mask"].any(axis=1), ~dropped)


def test_condition_dropout_to_a_pretrained_tokenizers_empty_prompt():
    # Stable Diffusion's null caption is "" = BOS EOS pad..., its mask True on BOS and EOS.
    ids = jnp.tile(jnp.arange(5, 9, dtype=jnp.int32), (1000, 1))
    batch = {"image": jnp.zeros((1000, 1)), "context": ids, "context_mask": ids > 0}
    null = (np.array([1, 2, 0, 0], np.int32), np.array([True, True, False, False]))
    out = drop_conditioning(batch, jax.random.key(1), p=0.5, num_classes=0, null_context=null)
    dropped = np.asarray(out["context"][:, 0] == 1)
    assert 0.4 < dropped.mean() < 0.6
    np.testing.assert_array_equal(out["context"][dropped], np.tile(null[0], (dropped.sum(), 1)))
    np.testing.assert_array_equal(out["context_mask"][dropped][0], null[1])
    np.testing.assert_array_equal(out["context"][~dropped], ids[~dropped])
    assert out["context_mask"][~dropped].all()


def test_optimizer_warmup_and_decay_mask():
    tx, lr = make_optimizer(
        learning_rate=1.0, warmup_steps=10, lr_schedule="cosine", num_steps=100, weight_decay=0.1
    )
    assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 1.0) < 1e-6 and float(lr(100)) < 1e-6
    params = {"k": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    # Past warmup with zero gradients only weight decay moves params: kernels, not biases.
    for _ in range(11):
        updates, state = tx.update(zero, state, params)
    params2 = optax.apply_updates(params, updates)
    assert float(params2["k"][0, 0]) < 1.0
    assert float(params2["b"][0]) == 1.0


def test_weight_decay_skips_biases_also_when_blocks_are_stacked():
    """A scanned DiT stacks its blocks on a leading axis: a stacked bias [depth, C] is still a
    bias (not decayed), a stacked kernel [depth, C, D] still a kernel (decayed)."""
    from diffjax.models.dit import STACKED_KEY
    from diffjax.train.state import make_optimizer

    tx, _ = make_optimizer(
        learning_rate=0.1,
        lr_schedule="constant",
        warmup_steps=0,
        num_steps=10,
        weight_decay=0.5,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip=0.0,
    )
    ones = jnp.ones
    params = {
        STACKED_KEY: {"bias": ones((3, 4)), "kernel": ones((3, 4, 5))},
        "head": {"bias": ones((4,)), "kernel": ones((4, 5))},
    }
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == {
        STACKED_KEY: {"bias": False, "kernel": True},
        "head": {"bias": False, "kernel": True},
    }
