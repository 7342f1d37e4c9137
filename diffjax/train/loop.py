"""`train_and_evaluate(config, workdir)`: the only place in training that does I/O."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import data as data_lib
from diffjax import experiment, images, models, parallel
from diffjax.checkpoint import Checkpointer, abstract_with_shardings
from diffjax.sampling import cycle_labels, make_sample_fn
from diffjax.train.state import TrainState, make_optimizer
from diffjax.train.step import init_train_state, make_loss_fn, make_train_step
from diffjax.train.writers import MetricWriter

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or gradients became NaN/inf and the config asks to stop."""


class WorkdirMismatchError(ValueError):
    """The workdir holds checkpoints of a different model."""


# ---------------------------------------------------------------------------- workdir


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str, is_main: bool) -> None:
    """Creates the workdir, refuses one made by another model, writes config.json."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    has_checkpoints = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints"))
    )
    if has_checkpoints and os.path.exists(path):
        with open(path) as f:
            old = ml_collections.ConfigDict(json.load(f))
        check_same_model(experiment.model_fingerprint(old), config, workdir)
    if is_main:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        os.replace(tmp, path)


def check_same_model(
    saved: dict[str, Any], config: ml_collections.ConfigDict, workdir: str
) -> None:
    """Raises WorkdirMismatchError naming every differing field."""
    current = experiment.model_fingerprint(config)
    diffs = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        detail = "; ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in diffs
        )
        raise WorkdirMismatchError(
            f"The workdir {workdir} holds checkpoints of a different model ({detail}). "
            "Nothing was changed there. Use a new --workdir, or the config that trained it."
        )


# ---------------------------------------------------------------------------- components


@dataclasses.dataclass(frozen=True)
class Components:
    """What a config builds: model, diffusion, optimizer and the abstract sharded state."""

    model: Any
    schedule: Any
    loss: Any
    tx: Any
    lr_fn: Any
    init: Any  # init(key, unbox=...) -> TrainState
    abstract_state: Any
    state_sharding: Any
    train_step: Any  # train_step(state, batch) -> (state, metrics); pure, not jitted


def build_components(config: ml_collections.ConfigDict, mesh) -> Components:
    """Builds everything static about a run; allocates nothing (`jax.eval_shape`)."""
    tc = config.train
    model = experiment.build_model(config)
    schedule = experiment.build_schedule(config)
    tx, lr_fn = make_optimizer(
        learning_rate=tc.learning_rate,
        lr_schedule=tc.lr_schedule,
        warmup_steps=tc.warmup_steps,
        num_steps=tc.num_steps,
        weight_decay=tc.weight_decay,
        b1=tc.b1,
        b2=tc.b2,
        eps=tc.eps,
        grad_clip=tc.grad_clip,
    )
    init = functools.partial(
        init_train_state, init_fn=experiment.make_init_fn(model, config), tx=tx
    )
    key = jax.random.key(config.seed)
    boxed = jax.eval_shape(functools.partial(init, unbox=False), key)
    loss = experiment.build_loss(config, schedule)
    train_step = make_train_step(
        make_loss_fn(
            model.apply,
            loss,
            precondition=schedule.precondition,
            cond_dropout=config.diffusion.cond_dropout,
            num_classes=config.data.num_classes,
            cond_keys=experiment.condition_keys(config),
        ),
        tx,
        lr_fn,
        ema_decay=tc.ema_decay,
        ema_warmup=tc.ema_warmup,
        grad_accum_steps=tc.grad_accum_steps,
    )
    return Components(
        model=model,
        schedule=schedule,
        loss=loss,
        train_step=train_step,
        tx=tx,
        lr_fn=lr_fn,
        init=init,
        abstract_state=jax.eval_shape(functools.partial(init, unbox=True), key),
        state_sharding=models.param_shardings(boxed, mesh),
    )


def load_state(
    config: ml_collections.ConfigDict, workdir: str, mesh, step: int | None = None
) -> tuple[TrainState, int, Components]:
    """Restores the train state of `workdir` (latest good step, or `step`).

    Raises:
      FileNotFoundError: the workdir has no checkpoint (names the fix).
      WorkdirMismatchError: the checkpoints belong to a different model.
    """
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    ckpt = Checkpointer(ckpt_dir)
    if not ckpt.all_steps():
        raise FileNotFoundError(
            f"No checkpoint in {ckpt_dir}. Train first: "
            f"python launch/train.py --config=... --workdir={workdir}"
        )
    parts = build_components(config, mesh)
    target = abstract_with_shardings(parts.abstract_state, parts.state_sharding)
    check = lambda meta: check_same_model(meta.get("model", {}), config, workdir)  # noqa: E731
    if step is None:
        state, step = ckpt.restore_latest(target, check_meta=check)
    else:
        if step not in ckpt.all_steps():
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {ckpt_dir}; available: {ckpt.all_steps()}."
            )
        check(ckpt.read_meta(step))
        state = ckpt.restore_step(step, target)
    ckpt.close()
    return state, step, parts


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (workdir/config.json)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not a diffjax run directory "
            "(train into it with launch/train.py first)."
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


# ---------------------------------------------------------------------------- preemption


class _Preemption:
    """Records SIGTERM; the loop saves a checkpoint at the next step and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))


# ---------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest good checkpoint.

    Returns the final TrainState. On SIGTERM it saves a checkpoint at the current step
    and returns early. Raises NonFiniteError on a non-finite step (unless
    `train.skip_nonfinite`), WorkdirMismatchError for a workdir of another model.
    """
    # -- setup
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    _prepare_workdir(config, workdir, is_main)
    tc = config.train
    writer = MetricWriter(workdir, enabled=is_main)

    # -- mesh
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    per_process_batch = parallel.check_batch_size(tc.batch_size, mesh, tc.grad_accum_steps)
    log.info(
        "Mesh %s over %d devices, %d process(es).", dict(mesh.shape), mesh.size, jax.process_count()
    )

    # -- data
    source = data_lib.make_source(**config.data.to_dict())
    data_iter = data_lib.make_iterator(
        source,
        batch_size=per_process_batch,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        random_flip=config.data.random_flip,
        worker_count=config.data.worker_count,
    )

    # -- model, abstract init and sharding
    parts = build_components(config, mesh)
    model, schedule, state_sharding = parts.model, parts.schedule, parts.state_sharding
    batch_sharding = parallel.batch_sharding(mesh)

    # -- restore or initialize
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tc.keep_checkpoints)
    fingerprint = experiment.model_fingerprint(config)
    restored = ckpt.restore_latest(
        abstract_with_shardings(parts.abstract_state, state_sharding),
        data_iter,
        check_meta=lambda meta: check_same_model(meta.get("model", {}), config, workdir),
    )
    if restored is not None:
        state, start_step = restored
        log.info("Resumed from %s at step %d.", ckpt.directory, start_step)
        writer.truncate_after(start_step)
    else:
        init = functools.partial(parts.init, unbox=True)
        state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(config.seed))
        start_step = 0

    # -- compile
    batch = parallel.global_batch(next(data_iter), mesh)
    t0 = time.perf_counter()
    compiled_step = (
        jax.jit(
            parts.train_step,
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, parallel.replicated(mesh)),
            donate_argnums=0,
            compiler_options=parallel.compiler_options(mesh.devices.flat[0].platform),
        )
        .lower(state, batch)
        .compile()
    )
    compile_seconds = time.perf_counter() - t0
    log.info("Train step compiled in %.1f s.", compile_seconds)
    flops_per_example, peak = (
        _train_flops(config, model, parts),
        parallel.peak_flops(jax.devices()[0].device_kind),
    )

    # Every process runs the sampler (params are global arrays); process 0 writes.
    sample_grid = (
        _make_grid_sampler(config, model, schedule, workdir, mesh, write=is_main)
        if config.sample.num_images > 0
        else None
    )
    meta = {"model": fingerprint}

    def save(step: int) -> None:
        ckpt.save(step, state, data_iter, meta=meta)

    evaluate = (
        _make_periodic_eval(config, parts, mesh, workdir, is_main)
        if config.eval.every_steps
        else None
    )

    # -- loop
    progress = _progress(start_step, tc.num_steps, enabled=is_main)
    window_loss, window_start, window_steps = [], time.perf_counter(), 0
    pending = None  # Metrics of the previous step, read after the next one is queued.
    first_log = True
    step = start_step
    # A jax.profiler trace of `train.profile_steps` steps, a few steps after the start.
    profile_window = (
        (start_step + 5, start_step + 5 + tc.profile_steps) if tc.profile_steps else None
    )
    tracing = False
    with _Preemption() as preemption:
        while step < tc.num_steps:
            if profile_window and step == profile_window[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                tracing = True
            state, metrics = compiled_step(state, batch)
            step += 1
            if pending is not None:
                window_loss.append(_check_finite(pending, config, ckpt))
            pending = (step, metrics)
            window_steps += 1

            if step % tc.log_every_steps == 0 or step == tc.num_steps:
                window_loss.append(_check_finite(pending, config, ckpt))
                pending = None
                elapsed = time.perf_counter() - window_start
                scalars = {
                    k: float(v) for k, v in parallel.host_value(metrics).items() if k != "finite"
                }
                finite_losses = [v for v in window_loss if v is not None]
                scalars["loss"] = float(np.mean(finite_losses)) if finite_losses else float("nan")
                if len(finite_losses) < len(window_loss):
                    scalars["skipped_steps"] = len(window_loss) - len(finite_losses)
                scalars["steps_per_sec"] = window_steps / elapsed
                scalars["img_per_sec"] = window_steps * tc.batch_size / elapsed
                scalars["step_seconds"] = elapsed / window_steps
                achieved = flops_per_example * scalars["img_per_sec"]
                scalars["tflops_per_sec"] = achieved / 1e12
                if peak:
                    scalars["mfu"] = achieved / (peak * jax.device_count())
                if first_log:
                    scalars["compile_seconds"] = compile_seconds
                    first_log = False
                writer.write(step, scalars)
                progress.set_postfix(
                    loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['img_per_sec']:.0f}"
                )
                window_loss, window_start, window_steps = [], time.perf_counter(), 0
            progress.update(1)
            if tracing and step == profile_window[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                log.info("Profiler trace of steps %d-%d in %s/profile.", *profile_window, workdir)
                tracing = False

            if step % tc.checkpoint_every_steps == 0 or step == tc.num_steps:
                save(step)
            if (
                tc.sample_every_steps and step % tc.sample_every_steps == 0
            ) or step == tc.num_steps:
                if sample_grid:
                    sample_grid(state.ema_params, step)
            if evaluate and (step % config.eval.every_steps == 0 or step == tc.num_steps):
                evaluate(state.ema_params, step)
            # Across processes the flag is agreed at log steps (a collective); alone, every step.
            multi = jax.process_count() > 1
            if (not multi or step % tc.log_every_steps == 0) and preemption.any_process():
                log.warning("SIGTERM received: saving a checkpoint at step %d and exiting.", step)
                save(step)
                break
            # Fetched last, so a checkpoint above records the iterator before this batch.
            if step < tc.num_steps:
                batch = parallel.global_batch(next(data_iter), mesh)
    if tracing:
        jax.profiler.stop_trace()
    if pending is not None:
        _check_finite(pending, config, ckpt)
    progress.close()
    ckpt.close()
    writer.close()
    return state


def _check_finite(
    pending: tuple[int, dict[str, jax.Array]], config, ckpt: Checkpointer
) -> float | None:
    """The step's loss, None for a skipped non-finite step; else stops the run."""
    step, metrics = pending
    metrics = parallel.host_value({"finite": metrics["finite"], "loss": metrics["loss"]})
    finite = bool(metrics["finite"])
    loss = float(metrics["loss"])
    if not finite:
        if config.train.skip_nonfinite:
            log.warning("Step %d: non-finite loss or gradients; update skipped.", step)
            return None
        ckpt.wait()
        raise NonFiniteError(
            f"Non-finite loss or gradients at step {step} (loss={loss}). The update was not "
            f"applied and no NaN was saved; the latest good checkpoint is step "
            f"{ckpt.latest_step()}. Lower train.learning_rate, or set "
            "train.skip_nonfinite=True to skip such updates."
        )
    return loss


def _train_flops(config, model, parts: Components) -> float:
    """Training FLOPs per example: 3x the forward (forward + backward), from XLA's count."""
    from diffjax.models import summary

    inputs = summary.abstract_inputs(
        model,
        batch_size=1,
        image_size=config.data.image_size,
        channels=config.data.channels,
        text_len=config.data.max_text_len,
    )
    return 3.0 * summary.forward_flops(model, parts.abstract_state.params, inputs)


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)


def _make_periodic_eval(config, parts: Components, mesh, workdir: str, is_main: bool):
    """`evaluate(params, step)`: metrics to eval/step_X.json; the best params to best/.

    The primary metric is FID when reference statistics are configured, else the digits
    Fréchet distance; lower is better. `best/` is an export (see diffjax.export) of the
    best EMA params so far and `eval/best.json` names its step, so the best model
    survives checkpoint rotation.
    """
    from diffjax import export
    from diffjax.eval.evaluate import evaluate_sampler, write_eval
    from diffjax.generate import Sampler

    sample_fn = make_sample_fn(
        parts.model.apply, parts.schedule, **experiment.sampler_kwargs(config)
    )
    best_path = os.path.join(workdir, "eval", "best.json")
    best = None
    if os.path.exists(best_path):
        with open(best_path) as f:
            best = json.load(f)

    def evaluate(params, step: int) -> dict[str, Any]:
        nonlocal best
        sampler = Sampler(config=config, params=params, sample_fn=sample_fn, mesh=mesh, step=step)
        metrics = evaluate_sampler(
            sampler, num_samples=config.eval.num_samples, batch_size=config.eval.batch_size
        )
        key = (
            "fid"
            if "fid" in metrics
            else "frechet_distance"
            if "frechet_distance" in metrics
            else None
        )
        if is_main:
            write_eval(workdir, step, metrics)
        if key is not None and (best is None or metrics[key] < best["value"]):
            best = {"step": int(step), "metric": key, "value": float(metrics[key])}
            export.export_params(
                config,
                parts.model,
                parts.schedule,
                params,
                os.path.join(workdir, "best"),
                step=step,
                platforms=(),
                write=is_main,
            )
            if is_main:
                with open(best_path + ".tmp", "w") as f:
                    json.dump(best, f)
                os.replace(best_path + ".tmp", best_path)
                log.info(
                    "Step %d: new best %s = %.4g (exported to best/).", step, key, best["value"]
                )
        return metrics

    return evaluate


def _make_grid_sampler(config, model, schedule, workdir: str, mesh, *, write: bool):
    """`grid(params, step)` writes workdir/samples/step_XXXXXXXX.png from fixed noise."""
    sample_fn = make_sample_fn(
        model.apply, schedule, **experiment.sampler_kwargs(config), jit=False
    )
    n = config.sample.num_images
    key = jax.random.key(config.seed + 1)
    rep = parallel.replicated(mesh)
    sample = jax.jit(
        sample_fn,
        out_shardings=rep,
        compiler_options=parallel.compiler_options(mesh.devices.flat[0].platform, "sample"),
    )
    noise = jax.jit(
        lambda k: jax.random.normal(k, (n, *experiment.image_shape(config)), jnp.float32),
        out_shardings=rep,
    )(key)
    # Captions are tokenized on the host; every process holds the same values.
    labels = np.asarray(cycle_labels(n, config.data.num_classes))
    cond = jax.device_put(experiment.sampling_condition(config, labels), rep)

    def grid(params, step: int) -> str | None:
        x = parallel.host_value(sample(params, noise, cond, jax.random.fold_in(key, 1)))
        if not write:
            return None
        path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
        images.save_grid(images.to_uint8(x), path, ncols=config.data.num_classes or None)
        return path

    return grid
