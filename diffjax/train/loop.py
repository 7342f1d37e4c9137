"""`train_and_evaluate(config, workdir)`: the only place in training that does I/O.

It reads top to bottom: setup, mesh, data, model and abstract init, restore, compile,
loop. What the loop does every N steps (metrics, checkpoints, sample grids, evaluation,
preemption) is a small hook from `diffjax.train.hooks`; the run directory is read and
checked through `diffjax.rundir`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from diffjax import data as data_lib
from diffjax import experiment, generate, models, parallel, rundir
from diffjax.checkpoint import Checkpointer
from diffjax.eval.evaluate import check_eval_inputs
from diffjax.models.partitioning import sharding_context
from diffjax.pretrained import stage as stage_lib
from diffjax.pretrained.frozen import check_frozen, tree_sha256, write_frozen
from diffjax.train import autoencoder, hooks
from diffjax.train.state import TrainState
from diffjax.train.writers import MetricWriter

log = logging.getLogger(__name__)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains `config` in `workdir`, resuming from its latest good checkpoint.

    Returns the final TrainState. On SIGTERM or Ctrl-C it saves a checkpoint at the
    current step and returns early. Raises ValueError for a config that
    `experiment.check_config` refuses and WorkdirError for a workdir that is in use,
    not writable or holds another model (both before any work), and NonFiniteError on a
    non-finite step (unless `train.skip_nonfinite`). On every exit path a checkpoint
    save in flight is committed and the checkpoint manager closed.
    """
    # -- setup: checks before any work, one trainer per workdir, Ctrl-C/SIGTERM handling
    # --config.pretrained=PIPELINE_DIR / --config.base_workdir=RUN fill the model fields.
    config = rundir.apply_base_workdir(stage_lib.apply_pretrained(config))
    config = stage_lib.resolve_controlnet(config)
    experiment.check_config(config)
    if config.eval.every_steps:
        check_eval_inputs(config.eval.reference_stats, config.eval.inception_weights)
    workdir, tc = os.path.abspath(workdir), config.train
    is_main = jax.process_index() == 0
    if config.data.source == "dreambooth" and not config.dreambooth.class_dir:
        config = ml_collections.ConfigDict(config.to_dict())
        config.dreambooth.class_dir = os.path.join(workdir, "class_images")
    with contextlib.ExitStack() as stack:
        stack.enter_context(rundir.WorkdirLock(workdir, enabled=is_main))
        preemption = stack.enter_context(hooks.Preemption())
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
        per_process_batch = parallel.check_batch_size(tc.batch_size, mesh, tc.grad_accum_steps)
        # The frozen base of a LoRA run, or the start of a fine-tune from a diffjax run.
        base = generate.base_params(config, mesh)
        extra = {}
        if config.base_workdir:
            extra["base"] = {"path": config.base_workdir, "sha256": tree_sha256(base)}
        frozen = check_frozen(
            config, workdir, resuming=rundir.has_checkpoints(workdir), extra=extra
        )
        rundir.prepare_workdir(config, workdir, is_main)
        if is_main:
            write_frozen(workdir, frozen)
        log.info("Mesh %s, %d process(es).", dict(mesh.shape), jax.process_count())

        # -- DreamBooth's prior: class images generated once by the base, cached
        if config.data.source == "dreambooth" and config.dreambooth.prior_loss_weight > 0:
            generate.class_images(config, write=is_main)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("dreambooth class images")

        # -- frozen components (VAE encoder, text encoder) run inside the step
        stage = stage_lib.build_stage(config, mesh)
        frozen_params = _frozen_params(config, stage, mesh)

        # -- data
        data_iter = data_lib.make_iterator(
            data_lib.make_source(**stage_lib.data_fields(config, stage)),
            batch_size=per_process_batch,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            random_flip=config.data.random_flip,
            worker_count=config.data.worker_count,
        )

        # -- model, abstract init and sharding
        parts = rundir.build_components(
            config,
            mesh,
            prepare=None if stage is None else stage.prepare,
            null_context=None if stage is None else stage.null_context,
            text_params=None if stage is None else stage.params.get("text_encoder"),
        )
        if parts.base_sharding is not None:  # a LoRA's or a ControlNet's frozen base
            frozen_params = {**frozen_params, "base": jax.device_put(base, parts.base_sharding)}
        if parts.lora_targets is not None:
            log.info(
                "LoRA rank %d on %s.",
                experiment.lora_rank(config),
                {k: len(v) for k, v in parts.lora_targets.items()},
            )

        # -- restore or initialize
        ckpt_dir = os.path.join(workdir, "checkpoints")
        ckpt = stack.enter_context(
            contextlib.closing(Checkpointer(ckpt_dir, max_to_keep=tc.keep_checkpoints))
        )
        writer = stack.enter_context(contextlib.closing(MetricWriter(workdir, enabled=is_main)))
        restored = ckpt.restore_latest(
            rundir.restore_target(parts), data_iter, check_meta=rundir.model_check(config, workdir)
        )
        window_losses = []
        if restored is not None:
            state, start_step = restored
            window_losses = ckpt.read_meta(start_step).get("window_losses", [])
            log.info("Resumed from step %d of %s.", start_step, ckpt_dir)
        else:
            init = functools.partial(parts.init, unbox=True)
            state = jax.jit(init, out_shardings=parts.state_sharding)(jax.random.key(config.seed))
            start_step = 0
            if parts.controlnet:
                state = _controlnet_start(config, parts, state, frozen_params["base"])
            elif parts.lora_targets is None and (config.pretrained or config.base_workdir):
                state = _start_from(config, parts, state, base)
            else:
                log.info("Starting from scratch in %s.", workdir)
        writer.truncate_after(start_step)  # Rows past the restored step are superseded.

        # -- compile
        batch = parallel.global_batch(next(data_iter), mesh)
        t0 = time.perf_counter()
        compiled_step = _compile_step(parts, state, batch, frozen_params, mesh)
        compile_seconds = time.perf_counter() - t0
        log.info("Train step compiled in %.1f s.", compile_seconds)

        # -- periodic actions
        acts = hooks.PeriodicActions(
            config,
            parts,
            mesh,
            workdir,
            is_main,
            ckpt,
            writer,
            start_step,
            compile_seconds,
            window_losses=window_losses,
            stage=stage,
            view=functools.partial(generate.sampling_view, parts, stage, frozen_params),
        )
        stack.callback(acts.close)

        # -- loop
        step = start_step
        while step < tc.num_steps:
            acts.before_step(step)
            state, metrics = compiled_step(state, batch, frozen_params)
            step += 1
            acts.after_step(step, state, metrics, data_iter)
            # Across processes the flag is agreed at log steps (a collective); alone, every step.
            multi = jax.process_count() > 1
            if (not multi or step % tc.log_every_steps == 0) and preemption.any_process():
                log.warning(
                    "%s: saving a checkpoint at step %d, exiting.", preemption.requested, step
                )
                acts.save(step, state, data_iter)
                break
            # Fetched last, so a checkpoint above records the iterator before this batch.
            if step < tc.num_steps:
                batch = parallel.global_batch(next(data_iter), mesh)
        acts.summary(start_step, step, interrupted=preemption.requested)
    return state


def _frozen_params(config, stage, mesh):
    """What the step reads but never trains (its `frozen` argument): the stage's VAE and
    text encoder, or an autoencoder's LPIPS network; replicated."""
    if stage is not None:
        return stage.params
    if experiment.is_autoencoder(config) and config.autoencoder.perceptual_weight > 0:
        weights = autoencoder.frozen_params(config.autoencoder.perceptual_weights)
        return jax.device_put(weights, parallel.replicated(mesh))
    return {}


def _start_from(config, parts: rundir.Components, state: TrainState, base) -> TrainState:
    """The fresh state with params and EMA set to the base weights (the pipeline's U-Net
    or the base run's EMA params); AdamW's state starts at zero either way."""
    if base is None:
        base = stage_lib.initial_params(config, parts.model_shapes)
    log.info("Starting from the weights of %s.", config.pretrained or config.base_workdir)
    return _with_params(parts, state, jax.device_put(base, parts.state_sharding.params))


def _controlnet_start(config, parts: rundir.Components, state: TrainState, base) -> TrainState:
    """The fresh ControlNet with its copy of the base's encoder half (params and EMA);
    its zero convs keep the base's output unchanged at the first step."""
    init_from_base = models.controlnet_init_from_base(config.model.name)
    copy = jax.jit(init_from_base, out_shardings=parts.state_sharding.params)
    log.info("ControlNet initialised from the frozen base's encoder half.")
    return _with_params(parts, state, copy(base, state.params))


def _with_params(parts: rundir.Components, state: TrainState, params) -> TrainState:
    """`state` with `params` and an EMA copy of them in buffers of its own (the step
    donates both, and `params` may share buffers with the frozen base)."""
    copy = jax.jit(
        lambda t: jax.tree.map(jnp.copy, t), out_shardings=parts.state_sharding.ema_params
    )
    return state.replace(params=params, ema_params=copy(params))


def _compile_step(parts: rundir.Components, state: TrainState, batch, frozen, mesh):
    """The train step compiled ahead of time, with explicit shardings and donated state.

    Traced under the mesh's activation-sharding context, so the models' constraints at
    block boundaries (`models.layers.constrain`) pin the batch to the data axes. The
    frozen weights (`frozen`, replicated) are an argument, not constants in the program.
    """
    rep = parallel.replicated(mesh)
    frozen_sharding = jax.tree.map(lambda x: x.sharding, frozen)  # as placed by the loop
    with sharding_context(mesh):
        return (
            jax.jit(
                parts.train_step,
                in_shardings=(parts.state_sharding, parallel.batch_sharding(mesh), frozen_sharding),
                out_shardings=(parts.state_sharding, rep),
                donate_argnums=0,
                compiler_options=parallel.compiler_options(mesh.devices.flat[0].platform),
            )
            .lower(state, batch, frozen)
            .compile()
        )
