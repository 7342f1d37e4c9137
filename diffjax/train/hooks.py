"""The periodic actions of the train loop, each a small object the loop calls by step.

`train_and_evaluate` (diffjax/train/loop.py) keeps the linear story; what happens every
N steps lives here: the metric window (losses, throughput, MFU, non-finite checks), the
profiler window, the sample grid, evaluation with best-model export, and preemption.
"""

from __future__ import annotations

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

from diffjax import experiment, export, images, parallel
from diffjax.checkpoint import Checkpointer
from diffjax.eval.evaluate import evaluate_generator, write_eval
from diffjax.generate import Generator, data_controls, full_mask_concat, latent_decoder
from diffjax.rundir import Components
from diffjax.sample_fn import cycle_labels, make_sample_fn
from diffjax.train.writers import MetricWriter

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or gradients became NaN/inf and the config asks to stop."""


def every(step: int, period: int, last: int) -> bool:
    """True on multiples of `period` (0 = never) and on the last step."""
    return (period > 0 and step % period == 0) or step == last


# ---------------------------------------------------------------------------- preemption


class Preemption:
    """Records SIGTERM (preemption) and SIGINT (Ctrl-C); the loop saves and returns.

    Both ask the loop to save a checkpoint at the next step boundary and stop; a save in
    flight is always finished. A second Ctrl-C raises KeyboardInterrupt at once (no new
    checkpoint; the loop still waits for a save already in flight before it exits).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            log.warning(
                "Ctrl-C: saving a checkpoint at the next step, then exiting "
                "(press Ctrl-C again to stop without saving)."
            )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.requested is not None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array(self.requested is not None))
        return bool(np.any(flags))


# ---------------------------------------------------------------------------- all of them


class PeriodicActions:
    """What the loop does around each step: metrics, profiler, checkpoints, grids, eval."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        parts: Components,
        mesh,
        workdir: str,
        is_main: bool,
        ckpt: Checkpointer,
        writer: MetricWriter,
        start_step: int,
        compile_seconds: float,
        window_losses: list[float | None] = (),
        stage: Any = None,
        view: Any = None,
    ):
        """`stage`: the run's `diffjax.pretrained.stage.FrozenStage` (None: none); sample
        grids and evaluation encode their captions through it. `view(ema_params) ->
        (model params, stage)` (`generate.sampling_view`): what the EMA params sample
        with, a LoRA merged into its base (default: the params and `stage` as they are)."""
        self._config, self._ckpt = config, ckpt
        self._view = view or (lambda params: (params, stage))
        self._meta = {"model": experiment.model_fingerprint(config)}
        self._started = time.perf_counter()
        tc = config.train
        self._grid = (
            make_grid_sampler(config, parts, workdir, mesh, write=is_main)
            if config.sample.num_images > 0
            else None
        )
        self._evaluate = (
            make_periodic_eval(config, parts, mesh, workdir, is_main)
            if config.eval.every_steps
            else None
        )
        self._progress = progress_bar(start_step, tc.num_steps, enabled=is_main)
        self.window = MetricWindow(
            config,
            writer,
            ckpt,
            flops_per_example=train_flops(config, parts),
            compile_seconds=compile_seconds,
            progress=self._progress,
        )
        self.window.losses.extend(window_losses)
        self._profiler = Profiler(workdir, start_step, tc.profile_steps)
        self.last_grid: str | None = None

    def before_step(self, step: int) -> None:
        self._profiler.before_step(step)

    def after_step(self, step: int, state, metrics: dict[str, jax.Array], data_iter) -> None:
        tc, last = self._config.train, self._config.train.num_steps
        self.window.add(step, metrics)
        self._profiler.after_step(step, state)
        if every(step, tc.checkpoint_every_steps, last):
            self.save(step, state, data_iter)
        if self._grid and every(step, tc.sample_every_steps, last):
            self.last_grid = self._grid(*self._view(state.ema_params), step) or self.last_grid
        if self._evaluate and every(step, self._config.eval.every_steps, last):
            self._evaluate(*self._view(state.ema_params), step)

    def save(self, step: int, state, data_iter) -> None:
        # The losses of the metric window so far travel with the checkpoint, so a run
        # resumed from any step logs the same window means as an uninterrupted one.
        self.window.flush()
        meta = {**self._meta, "window_losses": list(self.window.losses)}
        self._ckpt.save(step, state, data_iter, meta=meta)

    def summary(self, start_step: int, step: int, *, interrupted: str | None) -> None:
        """Checks the last step's metrics, then logs what the run did and where it is."""
        self.window.flush()
        self._ckpt.wait()
        self._progress.close()
        how = f"resumed from step {start_step}" if start_step else "started from scratch"
        stop = f"stopped by {interrupted} at" if interrupted else "finished at"
        lines = [
            f"Training {how}, {stop} step {step} of {self._config.train.num_steps} "
            f"({step - start_step} steps in {time.perf_counter() - self._started:.0f} s).",
            f"Last logged loss: {self.window.last_loss:.4g}."
            if self.window.last_loss is not None
            else "No loss logged.",
            f"Latest checkpoint: step {self._ckpt.latest_step()} in {self._ckpt.directory}.",
        ]
        if self.last_grid:
            lines.append(f"Sample grid: {self.last_grid}.")
        if interrupted:
            lines.append("Rerun the same command to resume.")
        log.info(" ".join(lines))

    def close(self) -> None:
        self._profiler.stop()
        self._progress.close()


# ---------------------------------------------------------------------------- metrics


class MetricWindow:
    """Collects per-step losses between log steps and writes one record per window.

    Each step's metrics are read one step late (`add`), so the host never waits on the
    step it just queued; `flush` reads the last one. A non-finite step stops the run
    (`NonFiniteError`, after the latest checkpoint commits) or, with
    `train.skip_nonfinite`, is counted as skipped.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        writer: MetricWriter,
        ckpt: Checkpointer,
        *,
        flops_per_example: float,
        compile_seconds: float,
        progress,
    ):
        self._config, self._writer, self._ckpt, self._progress = config, writer, ckpt, progress
        self._flops = flops_per_example
        self._peak = parallel.peak_flops(jax.devices()[0].device_kind)
        self._first_extra = {"compile_seconds": compile_seconds}
        self._pending: tuple[int, dict[str, jax.Array]] | None = None
        self.last_loss: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float | None] = []  # per step since the last log (None: skipped)
        self._start, self._steps = time.perf_counter(), 0

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Records the metrics of `step` (just queued); checks the previous step's."""
        self.flush()
        self._pending = (step, metrics)
        self._steps += 1
        tc = self._config.train
        if every(step, tc.log_every_steps, tc.num_steps):
            self.flush()
            self._write(step, metrics)
        self._progress.update(1)

    def flush(self) -> None:
        """Reads (and checks) the metrics of the last queued step."""
        if self._pending is not None:
            self.losses.append(self._check_finite(*self._pending))
            self._pending = None

    def _write(self, step: int, metrics: dict[str, jax.Array]) -> None:
        tc = self._config.train
        elapsed = time.perf_counter() - self._start
        scalars = {k: float(v) for k, v in parallel.host_value(metrics).items() if k != "finite"}
        finite = [v for v in self.losses if v is not None]
        scalars["loss"] = float(np.mean(finite)) if finite else float("nan")
        self.last_loss = scalars["loss"]
        if len(finite) < len(self.losses):
            scalars["skipped_steps"] = len(self.losses) - len(finite)
        scalars["steps_per_sec"] = self._steps / elapsed
        scalars["img_per_sec"] = self._steps * tc.batch_size / elapsed
        scalars["step_seconds"] = elapsed / self._steps
        achieved = self._flops * scalars["img_per_sec"]
        scalars["tflops_per_sec"] = achieved / 1e12
        if self._peak:
            scalars["mfu"] = achieved / (self._peak * jax.device_count())
        scalars.update(self._first_extra)
        self._first_extra = {}
        self._writer.write(step, scalars)
        self._progress.set_postfix(
            loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['img_per_sec']:.0f}"
        )
        self._reset()

    def _check_finite(self, step: int, metrics: dict[str, jax.Array]) -> float | None:
        """The step's loss, None for a skipped non-finite step; else stops the run."""
        metrics = parallel.host_value({"finite": metrics["finite"], "loss": metrics["loss"]})
        loss = float(metrics["loss"])
        if bool(metrics["finite"]):
            return loss
        if self._config.train.skip_nonfinite:
            log.warning("Step %d: non-finite loss or gradients; update skipped.", step)
            return None
        self._ckpt.wait()
        raise NonFiniteError(
            f"Non-finite loss or gradients at step {step} (loss={loss}). The update was not "
            f"applied and no NaN was saved; the latest good checkpoint is step "
            f"{self._ckpt.latest_step()}. Lower train.learning_rate, or set "
            "train.skip_nonfinite=True to skip such updates."
        )


def train_flops(config: ml_collections.ConfigDict, parts: Components) -> float:
    """Training FLOPs per example: 3x the forward (forward + backward), from XLA's count."""
    from diffjax.models import summary

    if experiment.is_autoencoder(config):
        x = jax.ShapeDtypeStruct((1, *experiment.image_shape(config)), jnp.float32)
        params = experiment.autoencoder_params(config, parts.abstract_state.params)
        lowered = jax.jit(lambda p, x: parts.model.apply({"params": p}, x)).lower(params, x)
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return 3.0 * float(cost["flops"])

    params, extra = parts.model_shapes, {}
    if parts.controlnet:  # the frozen base and the ControlNet beside it
        params = {"base": params, "controlnets_0": parts.abstract_state.params}
        extra["control"] = jax.ShapeDtypeStruct((1, *experiment.control_shape(config)), jnp.float32)
    inputs = summary.abstract_inputs(
        parts.model.base if parts.controlnet else parts.model,
        batch_size=1,
        image_size=config.data.image_size,
        channels=experiment.model_input_channels(config),  # an inpainting model's too
        text_len=config.data.max_text_len,
    )
    return 3.0 * summary.forward_flops(parts.model, params, inputs, **extra)


def progress_bar(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)


class Profiler:
    """A `jax.profiler` trace of `num_steps` steps, starting 5 steps after `start`."""

    def __init__(self, workdir: str, start: int, num_steps: int):
        self._dir = os.path.join(workdir, "profile")
        self._window = (start + 5, start + 5 + num_steps) if num_steps else None
        self._tracing = False

    def before_step(self, step: int) -> None:
        if self._window and step == self._window[0]:
            jax.profiler.start_trace(self._dir)
            self._tracing = True

    def after_step(self, step: int, state: Any) -> None:
        if self._tracing and step == self._window[1]:
            jax.block_until_ready(state)
            self.stop()
            log.info("Profiler trace of steps %d-%d in %s.", *self._window, self._dir)

    def stop(self) -> None:
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False


# ---------------------------------------------------------------------------- sample grid


def make_grid_sampler(config, parts: Components, workdir: str, mesh, *, write: bool):
    """`grid(params, stage, step)` writes workdir/samples/step_XXXXXXXX.png from fixed
    noise; `stage` (or None) encodes the captions (a frozen text encoder).

    Every process runs the sampler (params are global arrays); only `write` saves. For
    an autoencoder the grid shows reconstructions (`make_recon_grid`).
    """
    if experiment.is_autoencoder(config):
        return make_recon_grid(config, parts, workdir, mesh, write=write)
    sample_fn = make_sample_fn(
        parts.model.apply, parts.schedule, **experiment.sampler_kwargs(config), jit=False
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
    decoder = latent_decoder(config, mesh)
    # Captions are tokenized on the host; every process holds the same values. A
    # ControlNet run draws with the controls (and classes) of its first training records.
    labels, control = np.asarray(cycle_labels(n, config.data.num_classes)), None
    if experiment.is_controlnet(config):
        shape = experiment.image_shape(config)
        pixels = shape if decoder is None else decoder.image_shape(shape)
        control, labels = data_controls(config, pixels, n)
    concat = None
    if experiment.is_inpainting(config):  # whole images (a latent model's need its VAE)
        concat = full_mask_concat(config, decoder, n)
    ids = jax.device_put(experiment.sampling_condition(config, labels, control, concat), rep)

    def grid(params, stage, step: int) -> str | None:
        cond, null = ids, None
        if stage is not None:  # token ids -> the frozen text encoder's embeddings
            cond, null = stage.conditions(ids), stage.null_condition(n)
        x = sample(params, noise, cond, jax.random.fold_in(key, 1), null)
        x = parallel.host_value(x if decoder is None else decoder(x))
        if not write:
            return None
        path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
        images.save_grid(images.to_uint8(x), path, ncols=config.data.num_classes or None)
        return path

    return grid


# ---------------------------------------------------------------------------- evaluation


def make_periodic_eval(config, parts: Components, mesh, workdir: str, is_main: bool):
    """`evaluate(params, stage, step)`: metrics to eval/step_X.json; the best params to
    best/ (a LoRA run's merged model, as a plain one).

    The primary metric is FID when reference statistics are configured, else the digits
    Fréchet distance; lower is better. `best/` is an export (see diffjax.export) of the
    best EMA params so far and `eval/best.json` names its step, so the best model
    survives checkpoint rotation. An autoencoder is evaluated by `make_recon_eval`.
    """
    if experiment.is_autoencoder(config):
        return make_recon_eval(config, parts, mesh, workdir, is_main)
    sample_fn = make_sample_fn(
        parts.model.apply, parts.schedule, **experiment.sampler_kwargs(config)
    )
    decoder = latent_decoder(config, mesh)
    best = _read_best(workdir)

    def evaluate(params, stage, step: int) -> dict[str, Any]:
        nonlocal best
        generator = Generator(
            config=config,
            params=params,
            sample_fn=sample_fn,
            mesh=mesh,
            step=step,
            decoder=decoder,
            stage=stage,
        )
        metrics = evaluate_generator(
            generator, num_samples=config.eval.num_samples, batch_size=config.eval.batch_size
        )
        key = next((k for k in ("fid", "frechet_distance") if k in metrics), None)
        if is_main:
            write_eval(workdir, step, metrics)
        if key is not None and (best is None or metrics[key] < best["value"]):
            best = {"step": int(step), "metric": key, "value": float(metrics[key])}
            if parts.controlnet:
                # A ControlNet is exported alone (`export.py --format=diffusers`), not as a
                # sampling model; eval/best.json names the step to keep and export.
                if is_main:
                    _write_best(workdir, best)
                return metrics
            export.export_params(
                experiment.merged_config(config),
                parts.model,
                parts.schedule,
                params,
                os.path.join(workdir, "best"),
                step=step,
                platforms=(),
                write=is_main,
            )
            if is_main:
                _write_best(workdir, best)
                log.info(
                    "Step %d: new best %s = %.4g (exported to best/).", step, key, best["value"]
                )
        return metrics

    return evaluate


# ---------------------------------------------------------------------------- autoencoder


def fixed_images(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
    """`n` training images spread evenly over the data source (the same every call):
    float32 [n, H, W, C] in [-1, 1] (fewer when the source is smaller)."""
    from diffjax import data as data_lib

    source = data_lib.make_source(**config.data.to_dict())
    n = min(n, len(source))
    return np.stack([source[int(i) * len(source) // n]["image"] for i in range(n)])


def _reconstructor(config, parts: Components, mesh):
    """`recon(params, x) -> decode(mean)` of a run's params (the autoencoder's subtree
    when it trains a discriminator), jitted, replicated out."""

    def recon(params, x):
        return parts.model.apply({"params": experiment.autoencoder_params(config, params)}, x)

    return jax.jit(recon, out_shardings=parallel.replicated(mesh))


def make_recon_grid(config, parts: Components, workdir: str, mesh, *, write: bool):
    """`grid(params, step)`: originals above their reconstructions (of the posterior mean)
    for a fixed set of `sample.num_images` training images, rows of up to 10."""
    x = fixed_images(config, config.sample.num_images)
    x_dev = jax.device_put(x, parallel.replicated(mesh))
    recon = _reconstructor(config, parts, mesh)
    ncols = min(len(x), 10)

    def grid(params, stage, step: int) -> str | None:
        del stage  # an autoencoder has no frozen stage
        r = parallel.host_value(recon(params, x_dev))
        if not write:
            return None
        rows = []
        for i in range(0, len(x), ncols):
            for block in (x[i : i + ncols], r[i : i + ncols]):
                fill = np.full((ncols - len(block), *block.shape[1:]), -1.0, np.float32)
                rows.append(np.concatenate([block, fill]))
        path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
        images.save_grid(images.to_uint8(np.concatenate(rows)), path, ncols=ncols)
        return path

    return grid


def _read_best(workdir: str) -> dict[str, Any] | None:
    """eval/best.json of a run (the best step so far), or None."""
    path = os.path.join(workdir, "eval", "best.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_best(workdir: str, best: dict[str, Any]) -> None:
    path = os.path.join(workdir, "eval", "best.json")
    with open(path + ".tmp", "w") as f:
        json.dump(best, f)
    os.replace(path + ".tmp", path)


def make_recon_eval(config, parts: Components, mesh, workdir: str, is_main: bool):
    """`evaluate(params, step)` of an autoencoder: reconstruction PSNR (and rFID with
    `eval.reference_stats` + `eval.inception_weights`) of a fixed set of
    `eval.num_samples` training images, to eval/step_X.json; the best params (highest
    PSNR) exported in the diffusers `AutoencoderKL` format to `best/`."""
    x = fixed_images(config, config.eval.num_samples)
    batch = max(1, min(config.eval.batch_size, len(x)))
    recon = _reconstructor(config, parts, mesh)
    best = _read_best(workdir)

    def evaluate(params, stage, step: int) -> dict[str, Any]:
        del stage  # an autoencoder has no frozen stage
        nonlocal best
        start = time.perf_counter()
        outs = []
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            pad = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
            outs.append(parallel.host_value(recon(params, pad))[: len(chunk)])
        r = np.concatenate(outs)
        a, b = (x + 1.0) / 2.0, np.clip((r + 1.0) / 2.0, 0.0, 1.0)
        mse = np.mean(np.square(a - b), axis=(1, 2, 3))
        metrics: dict[str, Any] = {
            "step": int(step),
            "num_images": len(x),
            "psnr": float(np.mean(-10.0 * np.log10(np.maximum(mse, 1e-10)))),
            "mse": float(np.mean(mse)),
            "recon_seconds": time.perf_counter() - start,
        }
        if config.eval.reference_stats:
            from diffjax.eval.evaluate import fid_metrics

            fid = fid_metrics(
                images.to_uint8(r),
                config.eval.reference_stats,
                config.eval.inception_weights,
                batch_size=min(batch, len(r)),
            )
            metrics["rfid"] = fid["fid"]
        if is_main:
            write_eval(workdir, step, metrics)
        if best is None or metrics["psnr"] > best["value"]:
            best = {"step": int(step), "metric": "psnr", "value": metrics["psnr"]}
            export.export_autoencoder(
                config,
                params,
                os.path.join(workdir, "best"),
                step=step,
                write=is_main,
                overwrite=True,
            )
            if is_main:
                _write_best(workdir, best)
                log.info("Step %d: new best psnr = %.4g (exported to best/).", step, best["value"])
        return metrics

    return evaluate
