"""The train state and the optimizer chain."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from diffjax.models.dit import STACKED_KEY


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue bit for bit.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: float32 model parameters.
      ema_params: exponential moving average of `params`, used for sampling/export.
      opt_state: optax state.
      rng: typed PRNG key; step `n` draws from `fold_in(rng, n)`.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


def learning_rate_schedule(
    *, learning_rate: float, lr_schedule: str, warmup_steps: int, num_steps: int
) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then constant or cosine decay to 0."""
    if learning_rate <= 0:
        raise ValueError(f"train.learning_rate must be positive, got {learning_rate}.")
    warmup_steps = max(int(warmup_steps), 0)
    if lr_schedule == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, learning_rate, warmup_steps),
                optax.constant_schedule(learning_rate),
            ],
            [warmup_steps],
        )
    if lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=learning_rate,
            warmup_steps=warmup_steps,
            decay_steps=max(num_steps, warmup_steps + 1),
            end_value=0.0,
        )
    raise ValueError(f"train.lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}.")


def _decay_mask(params: Any) -> Any:
    """Biases and norm scales (rank <= 1 per layer) are not decayed (standard AdamW use).

    Params of scanned blocks carry a leading stacked-layers axis, which does not count.
    """

    def decayed(path, p) -> bool:
        stacked = any(getattr(k, "key", None) == STACKED_KEY for k in path)
        return jnp.ndim(p) - int(stacked) > 1

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(
    *,
    learning_rate: float,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    num_steps: int = 1,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip: float = 0.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The one optax chain of diffjax: clip -> AdamW (masked decay) with a warmup schedule.

    Returns:
      (transformation, learning-rate schedule) — the schedule is logged per step.
    """
    schedule = learning_rate_schedule(
        learning_rate=learning_rate,
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        num_steps=num_steps,
    )
    parts = []
    if grad_clip and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
    )
    return optax.chain(*parts), schedule


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay for `step`; with warmup, min(decay, (1 + step) / (10 + step))."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
