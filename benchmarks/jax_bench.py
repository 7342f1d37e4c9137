"""The diffjax side of the benchmarks, run inside a worker process (`common.Worker`).

Everything is built the way `diffjax.train.loop.train_and_evaluate` builds it:
`build_components(config, mesh)`, `make_loss_fn` + `make_train_step`, one
`jax.jit(..., donate_argnums=0)` with the library's `parallel.compiler_options`,
compiled ahead of time, and the sampler of
`diffjax.sample_fn.make_sample_fn` (one `lax.scan`). Batches are synthetic arrays
of the config's shapes, already on the device, so data loading is not timed
(except in the prefetch experiment, which is about exactly that).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import common
from diffjax import experiment, parallel
from diffjax.diffusion import samplers
from diffjax.models import layers
from diffjax.models.summary import model_summary
from diffjax.rundir import build_components
from diffjax.sample_fn import cycle_labels, make_sample_fn
from diffjax.train.step import make_loss_fn, make_train_step

SAMPLER = "dpmpp_2m"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_events: dict[str, int] = {}


def _count_event(name: str, *args: Any, **kwargs: Any) -> None:
    _events[name] = _events.get(name, 0) + 1


jax.monitoring.register_event_listener(_count_event)
jax.monitoring.register_event_duration_secs_listener(_count_event)


def _malloc_trim() -> None:
    # Hand freed heap back to the OS so RSS deltas measure live memory, not glibc's cache.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _block(tree: Any) -> None:
    jax.block_until_ready(tree)


# ----------------------------------------------------------------------------- configs


def load_config(case: common.Case) -> ml_collections.ConfigDict:
    """The case's config file with its overrides applied and its batch size set."""
    path, _, arg = case.config.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", common.ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for key, value in case.overrides:
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        # model.kwargs takes any model field (build_model validates); elsewhere a typo fails.
        if leaf not in node and parents != ["model", "kwargs"]:
            raise KeyError(f"Case {case.name!r}: config has no field {key!r}.")
        node[leaf] = value
    config.train.batch_size = case.batch
    return config


def resolve_guidance(case: common.Case, config: ml_collections.ConfigDict) -> float:
    """The case's CFG scale; 0 means the config's `sample.guidance` (4.0 where that is 1)."""
    if case.guidance:
        return float(case.guidance)
    g = float(config.sample.guidance)
    return g if g != 1.0 else 4.0


def model_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Plain description of model, diffusion and optimizer for the PyTorch reference."""
    f, t = config.diffusion, config.train
    return {
        "model": config.model.name,
        "kwargs": json_plain(config.model.kwargs.to_dict()),
        "dtype": config.model.dtype,
        "image_size": config.data.image_size,
        "channels": config.data.channels,
        "num_classes": config.data.num_classes,
        "conditioning": experiment.conditioning_kind(config),
        "diffusion": {
            "schedule": f.schedule,
            "beta_schedule": f.beta_schedule,
            "beta_start": f.beta_start,
            "beta_end": f.beta_end,
            "num_timesteps": f.num_timesteps,
            "prediction": f.prediction,
            "loss_weighting": f.loss_weighting,
            "min_snr_gamma": f.min_snr_gamma,
            "cond_dropout": f.cond_dropout,
            "clip_x0": f.clip_x0,
        },
        "train": {
            "learning_rate": t.learning_rate,
            "b1": t.b1,
            "b2": t.b2,
            "eps": t.eps,
            "weight_decay": t.weight_decay,
            "grad_clip": t.grad_clip,
            "ema_decay": t.ema_decay,
        },
    }


def json_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: json_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_plain(v) for v in x]
    return x


def synthetic_batch(config: ml_collections.ConfigDict, seed: int) -> dict[str, np.ndarray]:
    """A host batch of the config's shapes: images in [-1, 1] and labels when conditional."""
    rng = np.random.default_rng(seed)
    b = config.train.batch_size
    shape = (b, *experiment.image_shape(config))
    batch = {"image": np.clip(rng.standard_normal(shape), -1, 1).astype(np.float32)}
    if config.data.num_classes > 0:
        batch["labels"] = rng.integers(0, config.data.num_classes, (b,)).astype(np.int32)
    return batch


# ----------------------------------------------------------------------------- attention


def naive_attention(q, k, v, mask=None, implementation=""):
    """Softmax(q k^T / sqrt(d)) v with two einsums (the pre-fused reference).

    Same contract as `diffjax.models.layers.attention` ([B, T, N, H] layout, a
    [B, S] key mask, zero output for a row without keys); only for benchmarks.
    """
    del implementation
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, -1e30)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bnts,bsnh->btnh", weights, v)
    if mask is not None:
        out = jnp.where(jnp.any(mask, -1)[:, None, None, None], out, jnp.zeros_like(out))
    return out


@contextlib.contextmanager
def attention_override(fn: Callable | None):
    """Swaps the attention function the models trace with (benchmarks only)."""
    if fn is None:
        yield
        return
    original = layers.attention
    layers.attention = fn
    try:
        yield
    finally:
        layers.attention = original


# ----------------------------------------------------------------------------- train


class Train:
    """A compiled diffjax train step on one device, with its state and batches."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        donate: bool = True,
        attention_fn: Callable | None = None,
        guard: str = "cond",
        compiler_options: dict[str, str] | None = None,
        num_batches: int = 2,
    ):
        """`compiler_options=None` compiles as the library does (`parallel.compiler_options`)."""
        self.config = config
        device = jax.devices()[0]
        self.mesh = parallel.make_mesh(1, 1, devices=[device])
        parts = build_components(config, self.mesh)
        self.parts = parts
        tc = config.train
        step = make_train_step(
            make_loss_fn(
                parts.model.apply,
                parts.loss,
                precondition=parts.schedule.precondition,
                cond_dropout=config.diffusion.cond_dropout,
                num_classes=config.data.num_classes,
                cond_keys=experiment.condition_keys(config),
            ),
            parts.tx,
            parts.lr_fn,
            ema_decay=tc.ema_decay,
            ema_warmup=tc.ema_warmup,
            grad_accum_steps=tc.grad_accum_steps,
            guard=guard,
        )
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        init = functools.partial(parts.init, unbox=True)
        self._init = jax.jit(init, out_shardings=parts.state_sharding)
        self.reset()
        self.batches = [self.put(synthetic_batch(config, i)) for i in range(num_batches)]
        self.jitted = jax.jit(
            step,
            in_shardings=(parts.state_sharding, self.batch_sharding),
            out_shardings=(parts.state_sharding, parallel.replicated(self.mesh)),
            donate_argnums=(0,) if donate else (),
            compiler_options=(
                parallel.compiler_options(program="train")
                if compiler_options is None
                else compiler_options
            ),
        )
        t0 = time.perf_counter()
        with attention_override(attention_fn):
            lowered = self.jitted.lower(self.state, self.batches[0])
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        self.lower_s, self.compile_s = t1 - t0, t2 - t1
        self.metrics = None

    def reset(self) -> None:
        """The initial state again (same seed, same params)."""
        self.state = self._init(jax.random.key(self.config.seed))

    def put(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return parallel.global_batch(host_batch, self.mesh)

    def step(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        self.state, self.metrics = self.compiled(self.state, batch)
        return self.metrics

    def run(self, steps: int) -> float:
        """Dispatches `steps` steps, then blocks once; returns the seconds taken."""
        t0 = time.perf_counter()
        for i in range(steps):
            self.step(self.batches[i % len(self.batches)])
        _block((self.state, self.metrics))
        return time.perf_counter() - t0

    def memory_analysis(self) -> dict[str, int]:
        """XLA's static buffer analysis of the compiled step (any backend)."""
        m = self.compiled.memory_analysis()
        out = {
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
        }
        # Live at once: inputs, temporaries and the outputs that do not reuse an input.
        out["peak_bytes"] = (
            out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"] - out["alias_bytes"]
        )
        return out

    def check_finite(self) -> float:
        loss = float(self.metrics["loss"])
        if not bool(self.metrics["finite"]) or not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} in the benchmark's train step")
        return loss


def steps_for(seconds_per_step: float, target_s: float) -> int:
    """Steps in a timing window of about `target_s` seconds (at least 1)."""
    return max(1, int(round(target_s / max(seconds_per_step, 1e-6))))


# ----------------------------------------------------------------------------- sampling


class Sample:
    """The compiled guided dpmpp_2m sampler of `make_sample_fn` at a fixed batch."""

    def __init__(
        self,
        config,
        model,
        schedule,
        params,
        *,
        batch: int,
        steps: int,
        guidance: float,
        compiler_options: dict[str, str] | None = None,
    ):
        """`compiler_options=None` compiles as the library does (`parallel.compiler_options`)."""
        kwargs = experiment.sampler_kwargs(config)
        kwargs.pop("eta", None)
        kwargs.update(method=SAMPLER, num_steps=steps, guidance=guidance)
        self.guided = bool(experiment.conditioning_kind(config) and not float(guidance) == 1.0)
        self.guidance = float(guidance)
        if compiler_options is None:
            self.fn = make_sample_fn(model.apply, schedule, **kwargs)
        else:
            fn = make_sample_fn(model.apply, schedule, jit=False, **kwargs)
            self.fn = jax.jit(fn, compiler_options=compiler_options)
        self.params = params
        self.batch = batch
        shape = (batch, *experiment.image_shape(config))
        self.noise = jax.random.normal(jax.random.key(1), shape, jnp.float32)
        labels = cycle_labels(batch, config.data.num_classes)
        self.cond = experiment.sampling_condition(config, labels)
        self.key = jax.random.key(2)
        t0 = time.perf_counter()
        self.compiled = self.fn.lower(params, self.noise, self.cond, self.key).compile()
        self.compile_s = time.perf_counter() - t0
        self.nfe = samplers.nfe(SAMPLER, steps)

    def run(self, reps: int = 1) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            out = self.compiled(self.params, self.noise, self.cond, self.key)
        _block(out)
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- worker


class JaxWorker:
    """Request handlers of the JAX worker: one case's train step and sampler at a time."""

    def __init__(self, threads: int):
        self.threads = threads
        self.train: Train | None = None
        self.sample: Sample | None = None
        self.base_rss = common.rss_bytes()
        self._experiment_case = ""

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            "info": self.info,
            "matmul": lambda size: self._matmul_flops(size, jnp.float32),
            "setup_train": self.setup_train,
            "train_window": self.train_window,
            "train_memory": self.train_memory,
            "setup_sample": self.setup_sample,
            "sample_window": self.sample_window,
            "sample_memory": self.sample_memory,
            "release": self.release,
            "experiment": self.experiment,
            "cache_compile": self.cache_compile,
        }

    # -- device

    def info(self, matmul_size: int = 0) -> dict[str, Any]:
        """Device, versions and the peak FLOP/s used for MFU.

        On a GPU the peak comes from `diffjax.parallel.peak_flops` (a bf16 matmul of
        `matmul_size` is timed too, for reference); on a CPU it is the measured f32
        matmul rate of `matmul_size` (default 2048).
        """
        dev = jax.devices()[0]
        out: dict[str, Any] = {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "device_kind": dev.device_kind,
            "num_devices": jax.device_count(),
            "cpus": sorted(os.sched_getaffinity(0)),
        }
        if dev.platform != "cpu":
            out["peak_flops"] = parallel.peak_flops(dev.device_kind)
            out["peak_source"] = "table (dense bf16)"
            out["matmul_flops"] = self._matmul_flops(matmul_size or 8192, jnp.bfloat16)
        else:
            n = matmul_size or 2048
            out["matmul_flops"] = self._matmul_flops(n, jnp.float32)
            out["peak_flops"] = out["matmul_flops"]
            out["peak_source"] = f"measured f32 matmul {n}^3"
        return out

    @staticmethod
    def _matmul_flops(n: int, dtype: Any, reps: int = 5) -> float:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        f = jax.jit(jnp.dot)
        _block(f(a, b))
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            _block(f(a, b))
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best

    def _device_peak(self) -> int | None:
        stats = jax.devices()[0].memory_stats() or {}
        return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None

    # -- train

    def setup_train(self, case: dict[str, Any]) -> dict[str, Any]:
        self.release()
        case_ = common.Case.from_json(case)
        config = load_config(case_)
        summary_model = experiment.build_model(config)
        summary = model_summary(
            summary_model, image_size=config.data.image_size, channels=config.data.channels
        )
        _malloc_trim()
        self.base_rss = common.rss_bytes()
        common.reset_peak_rss()
        self.train = Train(config)
        compile_peak = common.peak_rss_bytes() - self.base_rss
        t = self.train.run(2)  # warm-up: first executions allocate and page in
        self.train.check_finite()
        _malloc_trim()
        common.reset_peak_rss()
        return {
            "spec": model_spec(config),
            "params": summary["params"],
            "forward_gflops": summary["forward_gflops"],
            "lower_s": self.train.lower_s,
            "compile_s": self.train.compile_s,
            "compile_rss_peak_bytes": compile_peak,
            "warmup_step_s": t / 2,
            "xla_memory": self.train.memory_analysis(),
            "dtype": config.model.dtype,
            "remat_policy": config.model.remat_policy,
            "attention_impl": config.model.kwargs.get("attention_impl", ""),
        }

    def train_window(self, steps: int) -> float:
        seconds = self.train.run(steps)
        self.train.check_finite()
        return seconds

    def train_memory(self) -> dict[str, Any]:
        """Peak memory of the training windows: device stats on GPU, RSS delta on CPU."""
        device_peak = self._device_peak()
        if device_peak is not None:
            return {"peak_bytes": device_peak, "kind": "device peak_bytes_in_use"}
        return {
            "peak_bytes": max(0, common.peak_rss_bytes() - self.base_rss),
            "kind": "peak RSS - RSS before setup",
        }

    # -- sampling

    def setup_sample(self, case: dict[str, Any]) -> dict[str, Any]:
        case_ = common.Case.from_json(case)
        if self.train is None:
            raise RuntimeError("setup_sample needs setup_train first (the params).")
        tr = self.train
        _malloc_trim()
        self.sample_base_rss = common.rss_bytes()
        self.sample = Sample(
            tr.config,
            tr.parts.model,
            tr.parts.schedule,
            tr.state.ema_params,
            batch=case_.sample_batch,
            steps=case_.sample_steps,
            guidance=resolve_guidance(case_, tr.config),
        )
        t = self.sample.run(1)
        _malloc_trim()
        common.reset_peak_rss()
        return {
            "compile_s": self.sample.compile_s,
            "first_run_s": t,
            "nfe": self.sample.nfe,
            "guided": self.sample.guided,
            "guidance": self.sample.guidance,
            "batch": self.sample.batch,
        }

    def sample_window(self, reps: int) -> float:
        return self.sample.run(reps)

    def sample_memory(self) -> dict[str, Any]:
        device_peak = self._device_peak()
        if device_peak is not None:
            # peak_bytes_in_use cannot be reset and still holds the training peak: report
            # XLA's buffer analysis of the compiled sampler (inputs + temporaries + outputs).
            m = self.sample.compiled.memory_analysis()
            peak = (
                m.argument_size_in_bytes
                + m.temp_size_in_bytes
                + m.output_size_in_bytes
                - m.alias_size_in_bytes
            )
            return {
                "peak_bytes": int(peak),
                "kind": "XLA memory analysis of the compiled sampler",
                "device_peak_bytes_since_start": device_peak,
            }
        return {
            "peak_bytes": max(0, common.peak_rss_bytes() - self.sample_base_rss),
            "kind": "peak RSS - RSS before sampler setup",
        }

    def release(self) -> None:
        self.train = None
        self.sample = None
        jax.clear_caches()
        _malloc_trim()

    # -- experiments

    def experiment(self, name: str, case: dict[str, Any], windows: int = 3) -> dict[str, Any]:
        self.train = self.sample = None
        case_ = common.Case.from_json(case)
        if case_.name != self._experiment_case:
            # Experiments on one case share compiled steps (see `cached_train`).
            _TRAINS.clear()
            self.release()
            self._experiment_case = case_.name
        out = EXPERIMENTS[name](case_, windows)
        return {"name": name, "case": case_.name, **out}

    def cache_compile(self, case: dict[str, Any], cache_dir: str) -> dict[str, Any]:
        """Compile time of the train step with the persistent cache at `cache_dir`."""
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        hits0 = _events.get(CACHE_HIT_EVENT, 0)
        tr = Train(load_config(common.Case.from_json(case)))
        tr.run(1)
        tr.check_finite()
        return {
            "lower_s": tr.lower_s,
            "compile_s": tr.compile_s,
            "cache_hits": _events.get(CACHE_HIT_EVENT, 0) - hits0,
        }


# ----------------------------------------------------------------------------- experiments


def _interleave(runs: dict[str, Callable[[], float]], windows: int) -> dict[str, list[float]]:
    """Calls every variant's window function in turn, `windows` rounds; returns the times."""
    out: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(windows):
        for k, fn in runs.items():
            out[k].append(fn())
    return out


_TRAINS: dict[tuple[Any, ...], Train] = {}  # (config, donate, attention, guard, options)


def cached_train(
    config: ml_collections.ConfigDict,
    *,
    donate: bool = True,
    attention_fn: Callable | None = None,
    guard: str = "cond",
    compiler_options: dict[str, str] | None = None,
) -> Train:
    """A warmed-up `Train` for this config, compiled once per experiment case.

    Variants that resolve to the same config (bf16's float32, remat's 'none', the
    baseline of donation/async/prefetch/sampler) share one compiled step; their
    reported compile time is that one compile's.
    """
    if compiler_options is None:  # the library's, resolved so equal options compile once
        compiler_options = parallel.compiler_options(program="train")
    key = (
        config.to_json(sort_keys=True),
        donate,
        getattr(attention_fn, "__name__", ""),
        guard,
        json.dumps(compiler_options, sort_keys=True),
    )
    if key not in _TRAINS:
        tr = Train(
            config,
            donate=donate,
            attention_fn=attention_fn,
            guard=guard,
            compiler_options=compiler_options,
        )
        tr.run(2)
        tr.check_finite()
        _TRAINS[key] = tr
    return _TRAINS[key]


def model_and_params(config: ml_collections.ConfigDict) -> tuple[Any, Any, Any]:
    """(model, schedule, EMA params): from a cached `Train` if there is one, else initialised."""
    for (key, _donate, attn, _guard, _options), tr in _TRAINS.items():
        if key == config.to_json(sort_keys=True) and not attn:
            return tr.parts.model, tr.parts.schedule, tr.state.ema_params
    mesh = parallel.make_mesh(1, 1, devices=[jax.devices()[0]])
    parts = build_components(config, mesh)
    init = functools.partial(parts.init, unbox=True)
    state = jax.jit(init, out_shardings=parts.state_sharding)(jax.random.key(config.seed))
    return parts.model, parts.schedule, state.ema_params


def _with(case: common.Case, **overrides: Any) -> ml_collections.ConfigDict:
    extra = tuple((k.replace("__", "."), v) for k, v in overrides.items())
    return load_config(dataclasses.replace(case, overrides=case.overrides + extra))


def _labelled(res: dict[str, Any], before: str, after: str) -> dict[str, Any]:
    """Names the compared variants of a train-throughput result and adds their ratio."""
    res.update(metric="train img/s", before=before, after=after)
    res["ratio"] = _ratio(res, after, before)
    return res


def _train_variants(
    case: common.Case,
    variants: dict[str, dict[str, Any]],
    windows: int,
    *,
    before: str,
    after: str,
    memory_ratio: bool = False,
) -> dict[str, Any]:
    """Train img/s, compile time and XLA memory of each variant, windows interleaved.

    A variant is {'config': overrides as keyword pairs with '__' for '.', plus
    optional keyword arguments of `cached_train` ('donate', 'attention_fn', 'guard',
    'compiler_options')}. The result compares `after` with `before`; with
    `memory_ratio`, also their XLA peak memory.
    """
    trains = {
        name: cached_train(
            _with(case, **v.get("config", {})), **{k: x for k, x in v.items() if k != "config"}
        )
        for name, v in variants.items()
    }
    first = next(iter(trains.values()))
    step_s = first.run(1)
    steps = steps_for(step_s, case.train_seconds)
    times = _interleave({k: functools.partial(t.run, steps) for k, t in trains.items()}, windows)
    res = _windows_result(times, case.batch, steps, before=before, after=after)
    for k, v in res["variants"].items():
        v.update(compile_s=trains[k].compile_s, xla_memory=trains[k].memory_analysis())
    if memory_ratio:
        peak = {k: res["variants"][k]["xla_memory"]["peak_bytes"] for k in (before, after)}
        res["memory_ratio"] = peak[after] / max(peak[before], 1)
    return res


def _windows_result(
    times: dict[str, list[float]], batch: int, steps: int, *, before: str, after: str
) -> dict[str, Any]:
    """An experiment's result from train windows of `steps` steps timed by `_interleave`."""
    res = {
        "steps_per_window": steps,
        "variants": {k: {"img_per_s": batch * steps / common.median(t), "window_s": t}
                     for k, t in times.items()},
    }  # fmt: skip
    return _labelled(res, before, after)


def _ratio(result: dict[str, Any], after: str, before: str, key: str = "img_per_s") -> float:
    v = result["variants"]
    return v[after][key] / v[before][key]


def exp_bf16(case: common.Case, windows: int) -> dict[str, Any]:
    """Compute dtype float32 vs bfloat16 (params and optimizer stay float32)."""
    # The same attention path for both (cuDNN's flash kernel refuses float32).
    return _train_variants(
        case,
        {
            "float32": {"config": {"model__dtype": "float32", "model__kwargs__attention_impl": "xla"}},
            "bfloat16": {"config": {"model__dtype": "bfloat16", "model__kwargs__attention_impl": "xla"}},
        },
        windows, before="float32", after="bfloat16",
    )  # fmt: skip


def exp_attention(case: common.Case, windows: int) -> dict[str, Any]:
    """Naive einsum-softmax attention vs `jax.nn.dot_product_attention` (xla; cuDNN on GPU)."""
    variants: dict[str, dict[str, Any]] = {
        "naive_einsum": {"attention_fn": naive_attention},
        "dot_product_attention_xla": {"config": {"model__kwargs__attention_impl": "xla"}},
    }
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu:
        variants["dot_product_attention_cudnn"] = {
            "config": {"model__dtype": "bfloat16", "model__kwargs__attention_impl": "cudnn"}
        }
        for v in variants.values():
            v.setdefault("config", {})["model__dtype"] = "bfloat16"
    after = "dot_product_attention_cudnn" if on_gpu else "dot_product_attention_xla"
    return _train_variants(case, variants, windows, before="naive_einsum", after=after)


def exp_remat(case: common.Case, windows: int) -> dict[str, Any]:
    """Remat policies: speed and the memory of activations kept for the backward pass."""
    policies = ("none", "dots_saveable", "full")
    res = _train_variants(
        case,
        {p: {"config": {"model__remat_policy": p}} for p in policies},
        windows,
        before="none",
        after="full",
    )
    for p in policies:
        cfg = _with(case, model__remat_policy=p)
        model = experiment.build_model(cfg)
        s = model_summary(
            model,
            image_size=cfg.data.image_size,
            channels=cfg.data.channels,
            batch_size=case.batch,
        )
        res["variants"][p]["saved_activation_bytes"] = s["activation_memory_bytes"]
    res["memory_ratio"] = (
        res["variants"]["full"]["saved_activation_bytes"]
        / res["variants"]["none"]["saved_activation_bytes"]
    )
    return res


def exp_donation(case: common.Case, windows: int) -> dict[str, Any]:
    """donate_argnums=(0,) (state updated in place) vs no donation."""
    return _train_variants(
        case,
        {"no_donation": {"donate": False}, "donation": {"donate": True}},
        windows,
        before="no_donation",
        after="donation",
        memory_ratio=True,
    )


def exp_async_metrics(case: common.Case, windows: int) -> dict[str, Any]:
    """Reading the loss on the host every step vs dispatching a window, then blocking once."""
    tr = cached_train(load_config(case))
    steps = steps_for(tr.run(1), case.train_seconds)

    def sync_every_step() -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            tr.step(tr.batches[i % len(tr.batches)])
            float(tr.metrics["loss"])  # a host round trip per step
        _block(tr.state)
        return time.perf_counter() - t0

    def async_window() -> float:
        return tr.run(steps)

    times = _interleave({"sync_every_step": sync_every_step, "async": async_window}, windows)
    tr.check_finite()
    return _windows_result(times, case.batch, steps, before="sync_every_step", after="async")


def _max_param_diff(a: Train, b: Train, steps: int, nan_step: bool) -> float:
    """Max |param difference| after the same steps from the same init (optionally a NaN batch)."""
    for tr in (a, b):
        tr.reset()
        tr.run(steps)
        if nan_step:
            bad = {k: v for k, v in tr.batches[0].items()}
            bad["image"] = bad["image"].at[0, 0, 0, 0].set(jnp.nan)
            tr.step(bad)
            if bool(tr.metrics["finite"]):
                raise AssertionError("a NaN batch was reported finite")
    diffs = jax.tree.map(lambda x, y: jnp.max(jnp.abs(x - y)), a.state.params, b.state.params)
    return float(max(jax.tree.leaves(diffs)))


def exp_finite_guard(case: common.Case, windows: int) -> dict[str, Any]:
    """The train step's non-finite guard: elementwise select vs one `lax.cond` (default)."""
    res = _train_variants(
        case,
        {"where_select": {"guard": "select"}, "lax_cond": {"guard": "cond"}},
        windows,
        before="where_select",
        after="lax_cond",
        memory_ratio=True,
    )
    a = cached_train(load_config(case), guard="select")
    b = cached_train(load_config(case))
    # Same semantics: identical params after 2 steps, and after a NaN step (skipped).
    res["max_param_diff_after_2_steps"] = _max_param_diff(a, b, 2, nan_step=False)
    res["max_param_diff_after_nan_step"] = _max_param_diff(a, b, 2, nan_step=True)
    return res


def exp_cpu_fusions(case: common.Case, windows: int) -> dict[str, Any]:
    """XLA:CPU's default YNNPACK fusions vs `parallel.CPU_COMPILER_OPTIONS` (train, sampling).

    Each program also runs with the other program's options (YNNPACK reductions on for
    the train step, off for samplers), the choice those options make.
    """
    if jax.default_backend() != "cpu":
        raise RuntimeError("cpu_fusions is a CPU experiment (other backends get no options).")
    train, sample = parallel.CPU_COMPILER_OPTIONS["train"], parallel.CPU_COMPILER_OPTIONS["sample"]
    res = _train_variants(
        case,
        {
            "xla_default": {"compiler_options": {}},
            "diffjax": {"compiler_options": dict(train)},
            "sampler_options": {"compiler_options": dict(sample)},
        },
        windows,
        before="xla_default",
        after="diffjax",
    )
    config = load_config(case)
    model, schedule, params = model_and_params(config)
    samplers_ = {
        name: Sample(
            config, model, schedule, params, batch=case.sample_batch, steps=case.sample_steps,
            guidance=resolve_guidance(case, config), compiler_options=options,
        )
        for name, options in (("xla_default", {}), ("diffjax", dict(sample)),
                              ("train_options", dict(train)))
    }  # fmt: skip
    times = _interleave({k: functools.partial(s.run, 1) for k, s in samplers_.items()}, windows)
    lat = {k: 1e3 * common.median(t) / case.sample_batch for k, t in times.items()}
    res["sampling"] = {k: {"latency_per_image_ms": lat[k], "window_s": times[k]} for k in lat}
    res["sampling_ratio"] = lat["xla_default"] / lat["diffjax"]
    res["also"] = "sampling " + ", ".join(f"{k}: {v:.3g} ms/img" for k, v in lat.items())
    return res


def _host_batches(config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
    # A new host batch per step, as a data loader hands them over.
    i = 100
    while True:
        yield synthetic_batch(config, i)
        i += 1


def exp_prefetch(case: common.Case, windows: int) -> dict[str, Any]:
    """Host batches put on the device just in time vs one step ahead.

    Both loops read the loss every step (as a loop that logs every step does), so
    the device idles while the host makes and transfers an un-prefetched batch.
    """
    config = load_config(case)
    tr = cached_train(config)
    steps = steps_for(tr.run(1), case.train_seconds)
    source = _host_batches(config)

    def just_in_time() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.step(tr.put(next(source)))
            float(tr.metrics["loss"])
        return time.perf_counter() - t0

    def prefetched() -> float:
        t0 = time.perf_counter()
        nxt = tr.put(next(source))
        for _ in range(steps):
            cur = nxt
            tr.step(cur)
            nxt = tr.put(next(source))  # overlaps with the step just dispatched
            float(tr.metrics["loss"])
        _block(nxt)
        return time.perf_counter() - t0

    times = _interleave({"just_in_time": just_in_time, "prefetch": prefetched}, windows)
    tr.check_finite()
    return _windows_result(times, case.batch, steps, before="just_in_time", after="prefetch")


def _dpmpp_2m_python_loop(config, model, schedule, params, noise, cond, guidance, steps):
    """DPM-Solver++(2M) with one jitted call per step from a Python loop (the baseline).

    Lu et al. 2022 (Alg. 2) in data prediction on the same logsnr grid as the
    compiled sampler; returns `run(noise) -> x0`.
    """
    ts = samplers.step_times(schedule, steps, "logsnr")
    with jax.ensure_compile_time_eval():
        a, s = (np.asarray(v, np.float64) for v in schedule.alpha_sigma(jnp.asarray(ts)))
    lam = np.log(a) - np.log(s)
    k = ts.size
    num_classes = config.data.num_classes
    clip = bool(config.diffusion.clip_x0)

    def x0_of(params, x, t, a_t, s_t):
        def net(xx, tt, c):
            out = model.apply({"params": params}, xx, tt, **c)
            return out[..., : x.shape[-1]].astype(jnp.float32)

        tt = jnp.full((x.shape[0],), t, jnp.float32)
        if cond and guidance != 1.0:
            null = {"labels": jnp.full_like(cond["labels"], num_classes)}
            both = {"labels": jnp.concatenate([cond["labels"], null["labels"]])}
            out = net(jnp.concatenate([x, x]), jnp.concatenate([tt, tt]), both)
            c, u = out[: x.shape[0]], out[x.shape[0] :]
            eps = u + guidance * (c - u)
        else:
            eps = net(x, tt, cond)
        x0 = (x - s_t * eps) / a_t
        return jnp.clip(x0, -1.0, 1.0) if clip else x0

    # Compiled with the library sampler's options, so only the dispatch differs.
    jit = functools.partial(jax.jit, compiler_options=parallel.compiler_options(program="sample"))

    @jit
    def step(params, x, x0_prev, t, a_t, s_t, ratio_x, c_new, c_old):
        x0 = x0_of(params, x, t, a_t, s_t)
        return ratio_x * x + c_new * x0 + c_old * x0_prev, x0

    final = jit(x0_of)
    f32 = np.float32

    def run(noise):
        x = f32(s[0]) * noise
        x0_prev = jnp.zeros_like(x)
        for i in range(k - 1):
            h = lam[i + 1] - lam[i]
            phi = -a[i + 1] * np.expm1(-h)  # alpha_{i+1} (1 - e^{-h})
            if i == 0:
                c_new, c_old = phi, 0.0
            else:
                r = (lam[i] - lam[i - 1]) / h
                c_new, c_old = phi * (1 + 1 / (2 * r)), -phi / (2 * r)
            x, x0_prev = step(params, x, x0_prev, f32(ts[i]), f32(a[i]), f32(s[i]),
                              f32(s[i + 1] / s[i]), f32(c_new), f32(c_old))  # fmt: skip
        return final(params, x, f32(ts[k - 1]), f32(a[k - 1]), f32(s[k - 1]))

    return run


def exp_sampler(case: common.Case, windows: int) -> dict[str, Any]:
    """One compiled `lax.scan` sampler vs a Python loop of jitted steps; retrace counts."""
    import chex

    config = load_config(case)
    model, schedule, params = model_and_params(config)
    # Zero-initialised output layers make every prediction 0 (and clipped x0 saturate),
    # which would hide differences between the two samplers: perturb the params.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(
        tree,
        [
            p + 0.02 * jax.random.normal(k, p.shape, p.dtype)
            for p, k in zip(leaves, keys, strict=True)
        ],
    )
    compiled = Sample(
        config, model, schedule, params,
        batch=case.sample_batch, steps=case.sample_steps, guidance=resolve_guidance(case, config),
    )  # fmt: skip
    guidance = compiled.guidance if compiled.guided else 1.0
    loop = _dpmpp_2m_python_loop(
        config, model, schedule, params, compiled.noise, compiled.cond, guidance, case.sample_steps
    )
    ref = np.asarray(compiled.compiled(params, compiled.noise, compiled.cond, compiled.key))
    got = np.asarray(loop(compiled.noise))
    max_diff = float(np.max(np.abs(ref - got)))

    def loop_run() -> float:
        t0 = time.perf_counter()
        _block(loop(compiled.noise))
        return time.perf_counter() - t0

    times = _interleave({"python_loop": loop_run, "scan": lambda: compiled.run(1)}, windows)
    b = case.sample_batch
    res: dict[str, Any] = {
        "variants": {k: {"latency_per_image_ms": 1e3 * common.median(t) / b, "window_s": t}
                     for k, t in times.items()},
        "max_abs_diff_vs_python_loop": max_diff,
    }  # fmt: skip
    res.update(metric="sampling latency/img (ms)", before="python_loop", after="scan")
    res["ratio"] = (
        res["variants"]["python_loop"]["latency_per_image_ms"]
        / res["variants"]["scan"]["latency_per_image_ms"]
    )
    res["ratio_note"] = "speed-up (before latency / after latency)"

    # Compiled once per shape: trace and backend-compile counts over repeated calls.
    kwargs = experiment.sampler_kwargs(config)
    kwargs.pop("eta", None)
    kwargs.update(
        method=SAMPLER, num_steps=case.sample_steps, guidance=compiled.guidance, jit=False
    )
    traces = {"n": 0}

    def counted(*args):
        traces["n"] += 1
        return raw(*args)

    raw = make_sample_fn(model.apply, schedule, **kwargs)
    fn = jax.jit(chex.assert_max_traces(counted, n=2))
    shape = compiled.noise.shape
    bigger = (shape[0] + 1, *shape[1:])
    k_cls = max(config.data.num_classes, 1)
    inputs = []  # made before counting, so only the sampler's own compiles are counted
    for seed, shp in enumerate([shape] * 3 + [bigger] * 2):
        labels = (cycle_labels(shp[0], config.data.num_classes) + seed) % k_cls
        inputs.append((jax.random.normal(jax.random.key(10 + seed), shp),
                       experiment.sampling_condition(config, labels), jax.random.key(seed)))  # fmt: skip
    _block(inputs)
    compiles0 = _events.get(COMPILE_EVENT, 0)
    for noise, cond, key in inputs[:3]:  # new noise, labels and key, same shapes: no retrace
        _block(fn(params, noise, cond, key))
    same_shape = {"traces": traces["n"], "compiles": _events.get(COMPILE_EVENT, 0) - compiles0}
    for noise, cond, key in inputs[3:]:  # a new batch size: exactly one more
        _block(fn(params, noise, cond, key))
    res["compiles_once_per_shape"] = {
        "same_shape_3_calls": same_shape,
        "after_2_calls_at_new_shape": {
            "traces": traces["n"],
            "compiles": _events.get(COMPILE_EVENT, 0) - compiles0,
        },
    }
    jaxpr = jax.make_jaxpr(raw)(params, compiled.noise, compiled.cond, compiled.key)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    # Top-level scans of the sampler's program: one loop of num_steps - 1 solver steps
    # (the last evaluation, at the final grid point, follows it).
    res["scan_loops"] = [int(e.params["length"]) for e in scans]
    return res


EXPERIMENTS: dict[str, Callable[[common.Case, int], dict[str, Any]]] = {
    "bf16": exp_bf16,
    "attention": exp_attention,
    "remat": exp_remat,
    "donation": exp_donation,
    "finite_guard": exp_finite_guard,
    "cpu_fusions": exp_cpu_fusions,
    "async_metrics": exp_async_metrics,
    "prefetch": exp_prefetch,
    "sampler": exp_sampler,
}


def main(threads: int) -> None:
    """Serves JAX benchmark requests on stdin/stdout until stdin closes."""
    common.serve(JaxWorker(threads).handlers())
