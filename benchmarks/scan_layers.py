"""DiT `scan_layers`: train-step compile time and step time, blocks unrolled vs one scan.

    python benchmarks/scan_layers.py                       # XL/2 compile, S/2 steps (CPU)
    python benchmarks/scan_layers.py --compile-variant B/2 --step-variant S/4 --windows 2

On 8 simulated CPU devices (`--xla_force_host_platform_device_count=8`, set here
before JAX starts) with a (data, fsdp) mesh, the library's train step (forward,
backward, clipping, AdamW, EMA, the non-finite guard) is built as the train loop
builds it (`rundir.build_components`, `jax.jit` with explicit shardings, donation and
`parallel.compiler_options`) for `configs/imagenet256_dit.py:VARIANT` on its
32x32x4 latents, float32 compute:

* compile: `lower()` then `compile()` from abstract shapes only (nothing is
  allocated, so DiT-XL/2's 675M params fit a laptop), cold (no persistent cache);
* steps: a real train step of a smaller variant, timed in windows that alternate
  between the two layouts (load from other processes falls on both), median.

Prints a table and writes `benchmarks/results/scan_layers_cpu_<time>.json`.
"""

from __future__ import annotations

import os
import sys

# Before anything imports JAX: the device count is read once, at backend start.
_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times are cold

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from benchmarks import common, jax_bench  # noqa: E402
from benchmarks.run import RESULTS, host_info  # noqa: E402
from diffjax import parallel  # noqa: E402
from diffjax.models.summary import count_params  # noqa: E402
from diffjax.rundir import build_components  # noqa: E402

LAYOUTS = ("unrolled", "scan")


def config_for(variant: str, batch: int, mesh_shape: tuple[int, int], scan: bool):
    """The DiT config with the benchmark's overrides (float32, XLA attention)."""
    case = common.Case(
        f"DiT-{variant}",
        f"configs/imagenet256_dit.py:{variant}",
        batch,
        1,
        (
            ("model.dtype", "float32"),
            ("model.kwargs.attention_impl", "xla"),
            ("model.kwargs.scan_layers", scan),
            ("mesh.data", mesh_shape[0]),
            ("mesh.fsdp", mesh_shape[1]),
        ),
    )
    return jax_bench.load_config(case)


class Step:
    """The library's train step for one config on the (data, fsdp) mesh."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.parts = build_components(config, mesh)
        self.batch_sharding = parallel.batch_sharding(mesh)
        self.jitted = jax.jit(
            self.parts.train_step,
            in_shardings=(self.parts.state_sharding, self.batch_sharding),
            out_shardings=(self.parts.state_sharding, parallel.replicated(mesh)),
            donate_argnums=0,
            compiler_options=parallel.compiler_options("cpu", "train"),
        )

    def abstract_args(self):
        state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.parts.abstract_state,
            self.parts.state_sharding,
        )
        host = jax_bench.synthetic_batch(self.config, 0)
        batch = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
            for k, v in host.items()
        }
        return state, batch

    def compile(self) -> dict[str, Any]:
        """Cold trace + lower, then XLA compile, from abstract shapes."""
        t0 = time.perf_counter()
        lowered = self.jitted.lower(*self.abstract_args())
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = self.compiled.memory_analysis()
        return {
            "lower_s": t1 - t0,
            "compile_s": t2 - t1,
            "total_s": t2 - t0,
            "params": count_params(self.parts.abstract_state.params),
            "xla_temp_bytes": int(mem.temp_size_in_bytes),
        }

    def start(self) -> None:
        """Real state and batches; two warm-up steps."""
        init = functools.partial(self.parts.init, unbox=True)
        self.state = jax.jit(init, out_shardings=self.parts.state_sharding)(
            jax.random.key(self.config.seed)
        )
        self.batches = [
            parallel.global_batch(jax_bench.synthetic_batch(self.config, i), self.mesh)
            for i in range(2)
        ]
        self.run(2)
        if not bool(self.metrics["finite"]):
            raise FloatingPointError("non-finite loss in the benchmark's train step")

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            self.state, self.metrics = self.compiled(self.state, self.batches[i % 2])
        jax.block_until_ready((self.state, self.metrics))
        return time.perf_counter() - t0


def measure_compile(variant, batch, mesh) -> dict[str, Any]:
    out = {}
    for layout in LAYOUTS:
        cfg = config_for(variant, batch, mesh.devices.shape, layout == "scan")
        print(f"  compiling DiT-{variant} ({layout}) ...", file=sys.stderr, flush=True)
        out[layout] = Step(cfg, mesh).compile()
        print(f"    {out[layout]['total_s']:.1f} s", file=sys.stderr, flush=True)
    return out


def measure_steps(variant, batch, mesh, windows: int, window_s: float) -> dict[str, Any]:
    steps, out = {}, {}
    for layout in LAYOUTS:
        s = Step(config_for(variant, batch, mesh.devices.shape, layout == "scan"), mesh)
        out[layout] = s.compile()
        s.start()
        steps[layout] = s
    losses = {k: float(s.metrics["loss"]) for k, s in steps.items()}
    n = jax_bench.steps_for(steps["unrolled"].run(1), window_s)
    times = {k: [] for k in LAYOUTS}
    for _ in range(windows):
        for k in LAYOUTS:
            times[k].append(steps[k].run(n))
    for k in LAYOUTS:
        out[k].update(
            steps_per_window=n,
            window_s=times[k],
            step_ms=1e3 * common.median(times[k]) / n,
            loss_after_warmup=losses[k],
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--compile-variant", default="XL/2", help="DiT variant for compile time")
    p.add_argument("--step-variant", default="S/2", help="DiT variant for step time ('' skips)")
    p.add_argument("--batch", type=int, default=8, help="global batch (32x32x4 latents)")
    p.add_argument("--mesh", default="4,2", help="data,fsdp")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--window-s", type=float, default=5.0, help="seconds per timing window")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    data, fsdp = (int(v) for v in args.mesh.split(","))
    mesh = parallel.make_mesh(data, fsdp)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "experiment": "scan_layers",
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "host": host_info(),
        "jax": jax.__version__,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "mesh": {"data": data, "fsdp": fsdp},
        "batch": args.batch,
        "load_avg_before": os.getloadavg(),
    }
    print(f"compile: DiT-{args.compile_variant}", file=sys.stderr, flush=True)
    result["compile"] = {
        "variant": args.compile_variant,
        **measure_compile(args.compile_variant, args.batch, mesh),
    }
    c = result["compile"]
    c["ratio"] = c["unrolled"]["total_s"] / c["scan"]["total_s"]
    if args.step_variant:
        print(f"steps: DiT-{args.step_variant}", file=sys.stderr, flush=True)
        s = measure_steps(args.step_variant, args.batch, mesh, args.windows, args.window_s)
        result["steps"] = {"variant": args.step_variant, **s}
        st = result["steps"]
        st["compile_ratio"] = st["unrolled"]["total_s"] / st["scan"]["total_s"]
        st["step_ratio"] = st["scan"]["step_ms"] / st["unrolled"]["step_ms"]
    result["load_avg_after"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t0

    print(report(result))
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"scan_layers_cpu_{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"\nwrote {path}")
    return result


def report(r: dict[str, Any]) -> str:
    c = r["compile"]
    lines = [
        f"{r['devices']}, mesh data={r['mesh']['data']} fsdp={r['mesh']['fsdp']}, "
        f"batch {r['batch']} x 32x32x4, float32; load {r['load_avg_before'][0]:.2f} -> "
        f"{r['load_avg_after'][0]:.2f}",
        "",
        "| what | unrolled | scan | unrolled / scan |",
        "|---|---|---|---|",
    ]

    def compile_row(name, d, ratio):
        u, s = d["unrolled"], d["scan"]
        return (
            f"| {name} train-step lower + compile | {u['lower_s']:.1f} + {u['compile_s']:.1f} s"
            f" | {s['lower_s']:.1f} + {s['compile_s']:.1f} s | {ratio:.2f}x |"
        )

    lines.append(compile_row(f"DiT-{c['variant']}", c, c["ratio"]))
    if "steps" in r:
        st = r["steps"]
        lines.append(compile_row(f"DiT-{st['variant']}", st, st["compile_ratio"]))
        u, s = st["unrolled"], st["scan"]
        lines.append(
            f"| DiT-{st['variant']} train step | {u['step_ms']:.0f} ms | {s['step_ms']:.0f} ms"
            f" | {1 / st['step_ratio']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
