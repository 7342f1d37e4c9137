"""`train_and_evaluate(config, workdir)`: the only place in training that does I/O.

It reads top to bottom: setup, mesh, data, model and abstract init, restore, compile,
loop. What the loop does every N steps (metrics, checkpoints, sample grids, evaluation,
preemption) is a small hook from `diffjax.train.hooks`; the run directory is read and
checked through `diffjax.rundir`.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import ml_collections

from diffjax import data as data_lib
from diffjax import experiment, parallel, rundir
from diffjax.checkpoint import Checkpointer
from diffjax.train import hooks
from diffjax.train.state import TrainState
from diffjax.train.writers import MetricWriter

log = logging.getLogger(__name__)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest good checkpoint.

    Returns the final TrainState. On SIGTERM it saves a checkpoint at the current step
    and returns early. Raises NonFiniteError on a non-finite step (unless
    `train.skip_nonfinite`), WorkdirMismatchError for a workdir of another model, and
    ValueError for a config that `experiment.check_config` refuses (before any work).
    """
    # -- setup
    experiment.check_config(config)
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    rundir.prepare_workdir(config, workdir, is_main)
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
    parts = rundir.build_components(config, mesh)
    state_sharding = parts.state_sharding

    # -- restore or initialize
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tc.keep_checkpoints)
    restored = ckpt.restore_latest(
        rundir.restore_target(parts), data_iter, check_meta=rundir.model_check(config, workdir)
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
            in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
            out_shardings=(state_sharding, parallel.replicated(mesh)),
            donate_argnums=0,
            compiler_options=parallel.compiler_options(mesh.devices.flat[0].platform),
        )
        .lower(state, batch)
        .compile()
    )
    compile_seconds = time.perf_counter() - t0
    log.info("Train step compiled in %.1f s.", compile_seconds)

    # -- periodic actions
    meta = {"model": experiment.model_fingerprint(config)}
    grid = (
        hooks.make_grid_sampler(config, parts, workdir, mesh, write=is_main)
        if config.sample.num_images > 0
        else None
    )
    evaluate = (
        hooks.make_periodic_eval(config, parts, mesh, workdir, is_main)
        if config.eval.every_steps
        else None
    )
    progress = hooks.progress_bar(start_step, tc.num_steps, enabled=is_main)
    window = hooks.MetricWindow(
        config,
        writer,
        ckpt,
        flops_per_example=hooks.train_flops(config, parts),
        compile_seconds=compile_seconds,
        progress=progress,
    )
    profiler = hooks.Profiler(workdir, start_step, tc.profile_steps)

    # -- loop
    step = start_step
    with hooks.Preemption() as preemption:
        while step < tc.num_steps:
            profiler.before_step(step)
            state, metrics = compiled_step(state, batch)
            step += 1
            window.add(step, metrics)
            profiler.after_step(step, state)
            if hooks.every(step, tc.checkpoint_every_steps, tc.num_steps):
                ckpt.save(step, state, data_iter, meta=meta)
            if grid and hooks.every(step, tc.sample_every_steps, tc.num_steps):
                grid(state.ema_params, step)
            if evaluate and hooks.every(step, config.eval.every_steps, tc.num_steps):
                evaluate(state.ema_params, step)
            # Across processes the flag is agreed at log steps (a collective); alone, every step.
            multi = jax.process_count() > 1
            if (not multi or step % tc.log_every_steps == 0) and preemption.any_process():
                log.warning("SIGTERM received: saving a checkpoint at step %d and exiting.", step)
                ckpt.save(step, state, data_iter, meta=meta)
                break
            # Fetched last, so a checkpoint above records the iterator before this batch.
            if step < tc.num_steps:
                batch = parallel.global_batch(next(data_iter), mesh)
    profiler.stop()
    window.flush()
    progress.close()
    ckpt.close()
    writer.close()
    return state
