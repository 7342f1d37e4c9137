"""diffjax benchmarks: training throughput and MFU, sampling latency, compile time, memory.

    python benchmarks/run.py --suite cpu            # here: digits U-Net + a small DiT (minutes)
    python benchmarks/run.py --suite gpu            # one GPU: DiT-B/2, DiT-XL/2, DDPM CIFAR-10
    python benchmarks/run.py --suite gpu --quick    # the GPU script's logic, tiny, on any device

Every case is measured for diffjax and, side by side in the same run, for the
PyTorch reference (diffusers' UNet2DModel / DiTTransformer2DModel with the same
architecture and parameter count; `benchmarks/torch_reference.py`) when torch and
diffusers are installed (`pip install torch==2.13.0 diffusers==0.42.1`; `--no-torch`
skips it). Timing
windows of the two frameworks alternate, so load from other processes falls on
both. Then the performance experiments (bf16, fused attention, remat, donation,
asynchronous metrics, prefetch, compilation cache, sampler compiled once) are
measured before/after on diffjax alone. A table is printed and everything is
written to `benchmarks/results/<suite>[-quick]_<device>_<time>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import re
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` and `configs` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.common import Case  # noqa: E402

RESULTS = common.ROOT / "benchmarks" / "results"

# Which case each experiment runs on. CPU: a DiT-S/2 on the real 32x32x4 latent
# (256 tokens, so attention is a visible share) and the digits U-Net.
CPU_EXPERIMENT_CASES = {
    "dit_s2_32px": Case(
        "dit_s2_32px",
        "configs/imagenet256_dit.py:S/2",
        4,
        2,
        (("model.dtype", "float32"), ("model.kwargs.attention_impl", "xla")),
        train_seconds=1.5,
    ),
    "digits_unet": Case("digits_unet", "configs/digits.py", 128, 32, train_seconds=1.5),
    # The CPU suite's DiT case, where the optimizer's share of the step is largest.
    "dit_s4_16px": Case(
        "dit_s4_16px",
        "configs/imagenet256_dit.py:S/4",
        32,
        8,
        (("data.image_size", 16), ("model.dtype", "float32")),
        train_seconds=1.5,
    ),
}
CPU_EXPERIMENTS = (
    ("bf16", "dit_s2_32px"),
    ("attention", "dit_s2_32px"),
    ("remat", "dit_s2_32px"),
    ("finite_guard", "dit_s4_16px"),
    ("donation", "dit_s4_16px"),
    ("async_metrics", "digits_unet"),
    ("prefetch", "digits_unet"),
    ("sampler", "digits_unet"),
    ("cpu_fusions", "digits_unet"),
    ("cpu_fusions", "dit_s4_16px"),
)
GPU_EXPERIMENT_CASES = {
    "DiT-B/2": Case(
        "DiT-B/2",
        "configs/imagenet256_dit.py:B/2",
        128,
        32,
        (("model.dtype", "bfloat16"), ("model.kwargs.attention_impl", "cudnn")),
        train_seconds=1.0,
    ),
}
GPU_EXPERIMENTS = (
    ("bf16", "DiT-B/2"),
    ("attention", "DiT-B/2"),
    ("remat", "DiT-B/2"),
    ("donation", "DiT-B/2"),
    ("finite_guard", "DiT-B/2"),
    ("async_metrics", "DiT-B/2"),
    ("prefetch", "DiT-B/2"),
    ("sampler", "DiT-B/2"),
)
CACHE_CASE = {"cpu": "digits_unet", "gpu": "DiT-B/2"}
# --quick runs every experiment on a tiny DiT (the fastest to compile).
QUICK_EXPERIMENT_CASE = {"cpu": "dit_s2_32px", "gpu": "DiT-B/2"}
EXPERIMENT_NAMES = ("bf16", "attention", "remat", "finite_guard", "donation", "async_metrics",
                    "prefetch", "sampler", "cpu_fusions", "compile_cache")  # fmt: skip


# ----------------------------------------------------------------------------- plan


def quick_case(case: Case) -> Case:
    """A tiny stand-in of an experiment case (for --quick)."""
    if "dit" in case.config:
        tiny = (("model.kwargs.depth", 2), ("model.kwargs.hidden_size", 64),
                ("model.kwargs.num_heads", 2), ("data.image_size", 8))  # fmt: skip
    else:
        tiny = (("model.kwargs.base_channels", 16), ("model.kwargs.num_res_blocks", 1),
                ("model.kwargs.num_heads", 2), ("model.kwargs.num_groups", 8))  # fmt: skip
    return dataclasses.replace(
        case,
        batch=8,
        sample_batch=2,
        overrides=case.overrides + tiny,
        sample_steps=4,
        train_seconds=0.1,
        windows=2,
    )


def for_backend(case: Case, backend: str) -> tuple[Case, list[str]]:
    """Off a GPU, cuDNN attention is unavailable: use 'xla' and say so."""
    if backend == "gpu":
        return case, []
    notes = []
    overrides = []
    for k, v in case.overrides:
        if k == "model.kwargs.attention_impl" and v == "cudnn":
            v = "xla"
            notes.append(f"{case.name}: attention_impl 'cudnn' -> 'xla' (no GPU)")
        overrides.append((k, v))
    return dataclasses.replace(case, overrides=tuple(overrides)), notes


# ----------------------------------------------------------------------------- measuring


def _worker_env(kind: str, suite: str, quick: bool) -> dict[str, str]:
    env = dict(os.environ)
    if quick:
        # --quick checks the logic, not the speed: LLVM at -O0 compiles XLA:CPU programs
        # about twice as fast.
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
        ).strip()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times are cold unless measured warm
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    if suite == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        # Both frameworks hold GPU memory at once during a case: no preallocation.
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


class Bench:
    """Runs a suite: cases (diffjax vs the reference), experiments, compile cache."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.suite = args.suite
        self.quick = args.quick
        self.t0 = time.perf_counter()
        self.threads = args.threads if self.suite == "cpu" else 0
        if self.suite == "cpu" and not self.threads:
            self.threads = len(os.sched_getaffinity(0))
        self.use_torch = not args.no_torch and all(
            importlib.util.find_spec(m) is not None for m in ("torch", "diffusers")
        )
        self.shared_jax: common.Worker | None = None
        self.notes: list[str] = []
        self.errors: list[str] = []
        if self.quick:
            self.notes.append("--quick: tiny models, XLA:CPU at -O0; checks the logic, not speed.")

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def worker(self, kind: str) -> common.Worker:
        return common.Worker(
            kind, threads=self.threads, env=_worker_env(kind, self.suite, self.quick)
        )

    def jax_worker(self) -> common.Worker:
        # --quick shares one JAX worker (speed); full runs get a fresh one per case so that
        # peak memory (device stats cannot be reset) belongs to that case alone.
        if self.quick:
            if self.shared_jax is None:
                self.shared_jax = self.worker("jax")
            return self.shared_jax
        return self.worker("jax")

    def done_with(self, w: common.Worker | None) -> None:
        if w is not None and w is not self.shared_jax:
            w.close()

    def over_budget(self) -> bool:
        b = self.args.budget_s
        return b is not None and time.perf_counter() - self.t0 > b

    # -- the run

    def run(self) -> dict[str, Any]:
        load0 = os.getloadavg()
        w = self.jax_worker()
        matmul = 256 if self.quick else 0
        info = w.call("info", matmul_size=matmul)
        self.done_with(w)
        self.backend = info["backend"]
        if self.suite == "gpu" and self.backend != "gpu" and not self.quick:
            raise SystemExit(
                f"--suite gpu needs a GPU, but JAX's backend is {self.backend!r}. "
                "Use --suite cpu, or --suite gpu --quick to check the script's logic."
            )
        torch_info = None
        if self.use_torch:
            with self.worker("torch") as tw:
                torch_info = tw.call("info", matmul_size=matmul)
        else:
            self.notes.append("PyTorch reference skipped (--no-torch, or torch/diffusers absent).")
        peak = info["peak_flops"]
        peak_source = info["peak_source"]
        self.matmuls: list[float] = []
        if self.backend == "cpu":
            # On a shared CPU one snapshot can catch a loaded moment: the matmul is timed
            # again in every case, in both frameworks, and the best rate is the peak.
            self.matmuls = [info["matmul_flops"]] + (
                [torch_info["matmul_flops"]] if torch_info else []
            )
            peak_source = info["peak_source"] + ", best of JAX and PyTorch over the run"
        self.peak = peak
        result: dict[str, Any] = {
            "suite": self.suite,
            "quick": self.quick,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "host": host_info(),
            "threads": self.threads or None,
            "jax": info,
            "torch": torch_info,
            "peak_flops": peak,
            "peak_source": peak_source,
            "load_avg_before": load0,
            "cases": [],
            "experiments": [],
        }
        cases = gpu_cases_for(self) if self.suite == "gpu" else common.cpu_cases(self.quick)
        wanted = self.args.cases.split(",") if self.args.cases else None
        for case in cases:
            if wanted and case.name not in wanted:
                continue
            case, notes = for_backend(case, self.backend)
            self.notes += notes
            if self.over_budget():
                self.notes.append(f"case {case.name} skipped: over --budget-s")
                continue
            result["cases"].append(self.run_case(case))
        result["experiments"] = self.run_experiments()
        if self.shared_jax is not None:
            self.shared_jax.close()
        if self.matmuls:
            result["peak_flops"] = max(self.matmuls)
            result["matmul_flops_measured"] = self.matmuls
        _set_mfu(result)
        result["load_avg_after"] = os.getloadavg()
        result["wall_s"] = time.perf_counter() - self.t0
        result["notes"] = self.notes
        result["errors"] = self.errors
        return result

    def references(self) -> dict[str, dict[str, str]]:
        """PyTorch reference variants by name -> extra environment.

        On a CPU the reference runs twice: with libgomp's default (spinning) waits,
        and with OMP_WAIT_POLICY=PASSIVE, which keeps PyTorch's OpenMP threads from
        spinning against each other when other processes load the cores (seen
        here: 50x slower steps with spinning at a load of 5 on 2 cores). The faster
        of the two is the reference the ratios are taken against.
        """
        if not self.use_torch:
            return {}
        if self.suite == "cpu":
            return {"torch": {}, "torch_passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
        refs = {"torch": {} if self.backend == "gpu" else {"OMP_WAIT_POLICY": "PASSIVE"}}
        if self.args.torch_compile:
            refs["torch_compile"] = {**refs["torch"], "BENCH_TORCH_COMPILE": "1"}
        return refs

    def run_case(self, case: Case) -> dict[str, Any]:
        """diffjax and the reference(s) on one case: training, then sampling.

        On a CPU the frameworks' timing windows alternate (other processes' load falls
        on both). On a GPU, a dedicated device, they run one after the other, each in
        its own process, so neither holds GPU memory while the other is measured.
        """
        self.log(f"case {case.name}: diffjax setup")
        out: dict[str, Any] = {"case": case.to_json(), "name": case.name}
        interleave = self.suite == "cpu"
        jw = self.jax_worker()
        refs: dict[str, common.Worker] = {}
        try:
            jt = jw.call("setup_train", case=case.to_json())
            out["diffjax"] = {"setup": jt}
            out["params"] = jt["params"]
            out["forward_gflops"] = jt["forward_gflops"]
            if interleave:
                refs = self._start_references(case, jt, out)
            if self.matmuls:
                for w in (jw, *refs.values()):
                    self.matmuls.append(w.call("matmul", size=256 if self.quick else 2048))
            self.log(f"case {case.name}: training windows")
            kept = self._train_windows(case, {"diffjax": jw, **refs}, out)
            self.log(f"case {case.name}: sampling")
            self._sample_windows(case, {k: w for k, w in kept.items()}, out)
            if not interleave:
                self.done_with(jw)
                jw = None
                for name, w in self._start_references(case, jt, out, one_by_one=True):
                    try:
                        self.log(f"case {case.name}: {name} windows")
                        self._train_windows(case, {name: w}, out)
                        self._sample_windows(case, {name: w}, out)
                    except common.WorkerError as e:
                        self.errors.append(f"{case.name} {name}: {e}")
                        out[name]["error"] = str(e)[-2000:]
                    finally:
                        w.close()
            _ratios(out)
        except common.WorkerError as e:
            self.errors.append(f"{case.name} diffjax: {e}")
            out["error"] = str(e)[-4000:]
        finally:
            self.done_with(jw)
            for w in refs.values():
                w.close()
        return out

    def _start_references(self, case: Case, jt: dict[str, Any], out, one_by_one: bool = False):
        """Starts each reference worker and sets up its train step.

        Returns {name: worker}, or with `one_by_one` a generator that starts the next
        only after the caller is done with (and has closed) the previous one.
        """

        def start(name: str, extra: dict[str, str]) -> common.Worker | None:
            self.log(f"case {case.name}: {name} setup")
            w = None
            try:
                env = {**_worker_env("torch", self.suite, self.quick), **extra}
                w = common.Worker("torch", threads=self.threads, env=env)
                setup = w.call(
                    "setup_train", spec=jt["spec"], params=jt["params"], batch=case.batch
                )
                out[name] = {"env": extra, "setup": setup}
                return w
            except common.WorkerError as e:
                self.errors.append(f"{case.name} {name}: {e}")
                out[name] = {"error": str(e)[-2000:]}
                if w is not None:
                    w.close()
                return None

        def gen():
            for name, extra in self.references().items():
                w = start(name, extra)
                if w is not None:
                    yield name, w

        if one_by_one:
            return gen()
        return dict(gen())

    def _train_windows(
        self, case: Case, workers: dict[str, common.Worker], out
    ) -> dict[str, common.Worker]:
        """Interleaved training windows; returns the workers kept (for sampling).

        A reference variant whose calibration step is over 2x slower than the
        fastest variant's is left out of the windows (recorded as 'dropped'): on a
        loaded CPU, spinning OpenMP threads can be 50x slower, and timing them would
        take minutes without changing which reference is the fastest.
        """
        steps, first = {}, {}
        for name, w in workers.items():
            # One step to size the windows (the setup already ran the warm-up steps).
            first[name] = w.call("train_window", steps=1)
            steps[name] = _steps_for(first[name], case.train_seconds)
        refs = [k for k in workers if k != "diffjax"]
        if len(refs) > 1:
            best = min(refs, key=lambda k: first[k])
            for k in refs:
                if first[k] > 2 * first[best]:
                    out[k]["dropped"] = (
                        f"calibration step {first[k]:.3f} s vs {first[best]:.3f} s for {best}; "
                        "left out of the timing windows"
                    )
                    self.notes.append(f"{case.name}: {k} dropped ({out[k]['dropped']})")
            workers = {k: w for k, w in workers.items() if "dropped" not in out.get(k, {})}
        times: dict[str, list[float]] = {k: [] for k in workers}
        for _ in range(case.windows):
            for name, w in workers.items():
                times[name].append(w.call("train_window", steps=steps[name]))
        flops_per_img = 3 * out["forward_gflops"] * 1e9
        for name, w in workers.items():
            img_s = case.batch * steps[name] / common.median(times[name])
            out[name]["train"] = {
                "steps_per_window": steps[name],
                "window_s": times[name],
                "img_per_s": img_s,
                "step_ms": 1e3 * case.batch / img_s,
                "achieved_flops": flops_per_img * img_s,
                "memory": w.call("train_memory"),
            }
        return workers

    def _sample_windows(self, case: Case, workers: dict[str, common.Worker], out) -> None:
        live = {}
        for name, w in workers.items():
            try:
                if name == "diffjax":
                    setup = w.call("setup_sample", case=case.to_json())
                else:  # the same batch, steps and guidance scale as diffjax's
                    js = out["diffjax"]["sample_setup"]
                    setup = w.call("setup_sample", batch=js["batch"], steps=case.sample_steps,
                                   guidance=js["guidance"])  # fmt: skip
                out[name]["sample_setup"] = setup
                live[name] = w
            except common.WorkerError as e:
                if name == "diffjax":
                    raise
                self.errors.append(f"{case.name} {name} sampling: {e}")
                out[name]["sample_error"] = str(e)[-2000:]
        # Whole sampling runs per window, about train_seconds long (1 to 20 runs).
        reps = {
            k: min(
                20,
                max(
                    1, round(case.train_seconds / max(out[k]["sample_setup"]["first_run_s"], 1e-3))
                ),
            )
            for k in live
        }
        times: dict[str, list[float]] = {k: [] for k in live}
        for _ in range(case.windows):
            for name, w in live.items():
                times[name].append(w.call("sample_window", reps=reps[name]))
        for name, w in live.items():
            per_run = common.median(times[name]) / reps[name]
            out[name]["sample"] = {
                "runs_per_window": reps[name],
                "window_s": times[name],
                "latency_per_image_ms": 1e3 * per_run / case.sample_batch,
                "images_per_s": case.sample_batch / per_run,
                "memory": w.call("sample_memory"),
            }

    def run_experiments(self) -> list[dict[str, Any]]:
        chosen = self.args.experiments
        if chosen == "none":
            return []
        names = set(EXPERIMENT_NAMES if chosen == "all" else chosen.split(","))
        unknown = names - set(EXPERIMENT_NAMES)
        if unknown:
            raise SystemExit(f"unknown --experiments {sorted(unknown)}; known: {EXPERIMENT_NAMES}")
        table = CPU_EXPERIMENT_CASES if self.suite == "cpu" else GPU_EXPERIMENT_CASES
        plan = CPU_EXPERIMENTS if self.suite == "cpu" else GPU_EXPERIMENTS

        def case_of(key: str) -> Case:
            case = table[key]
            if self.quick:
                case = quick_case(table[QUICK_EXPERIMENT_CASE[self.suite]])
            case, notes = for_backend(case, self.backend)
            self.notes += [n for n in notes if n not in self.notes]
            return case

        results = []
        w = None
        try:
            for name, key in plan:
                if name not in names:
                    continue
                if self.over_budget():
                    self.notes.append(f"experiment {name} skipped: over --budget-s")
                    continue
                case = case_of(key)
                self.log(f"experiment {name} on {case.name}")
                if w is None:
                    w = self.jax_worker()
                try:
                    results.append(w.call("experiment", name=name, case=case.to_json(),
                                          windows=case.windows))  # fmt: skip
                except common.WorkerError as e:
                    self.errors.append(f"experiment {name}: {e}")
                    results.append({"name": name, "case": key, "error": str(e)[-4000:]})
                    self.done_with(w)
                    w = None
        finally:
            self.done_with(w)
        if "compile_cache" in names:
            if self.over_budget():
                self.notes.append("experiment compile_cache skipped: over --budget-s")
            else:
                self.log("experiment compile_cache")
                results.append(self.compile_cache(case_of(CACHE_CASE[self.suite])))
        return results

    def compile_cache(self, case: Case) -> dict[str, Any]:
        """Train-step compile time in a fresh process, cold then warm persistent cache."""
        runs = {}
        with tempfile.TemporaryDirectory(prefix="diffjax-xla-cache-") as d:
            for label in ("cold", "warm"):
                with self.worker("jax") as w:
                    runs[label] = w.call("cache_compile", case=case.to_json(), cache_dir=d)
            files = sum(len(f) for _, _, f in os.walk(d))
        return {
            "name": "compile_cache",
            "case": case.name,
            "metric": "train-step compile s (fresh process)",
            "before": "cold",
            "after": "warm",
            "variants": {k: {"compile_s": v["compile_s"], "lower_s": v["lower_s"],
                             "cache_hits": v["cache_hits"]} for k, v in runs.items()},
            "cache_files": files,
            "ratio": runs["cold"]["compile_s"] / max(runs["warm"]["compile_s"], 1e-9),
            "ratio_note": "speed-up (cold / warm compile time)",
        }  # fmt: skip


def _set_mfu(result: dict[str, Any]) -> None:
    """MFU of every training measurement: achieved FLOP/s over the run's peak."""
    peak = result["peak_flops"]
    for c in result["cases"]:
        for fw in _frameworks(c):
            tr = c.get(fw, {}).get("train")
            if tr:
                tr["mfu"] = tr["achieved_flops"] / peak if peak else None


def _ratios(out: dict[str, Any]) -> None:
    """diffjax over the fastest reference: training throughput and sampling speed-up."""
    refs = [k for k in _frameworks(out) if k != "diffjax"]
    trained = [k for k in refs if "train" in out[k]]
    if trained and "train" in out["diffjax"]:
        best = max(trained, key=lambda k: out[k]["train"]["img_per_s"])
        out["train_reference"] = best
        out["train_ratio"] = out["diffjax"]["train"]["img_per_s"] / out[best]["train"]["img_per_s"]
    sampled = [k for k in refs if "sample" in out[k]]
    if sampled and "sample" in out["diffjax"]:
        best = min(sampled, key=lambda k: out[k]["sample"]["latency_per_image_ms"])
        out["sample_reference"] = best
        out["sample_speedup"] = (
            out[best]["sample"]["latency_per_image_ms"]
            / out["diffjax"]["sample"]["latency_per_image_ms"]
        )


def _steps_for(seconds_per_step: float, target_s: float) -> int:
    return max(1, int(round(target_s / max(seconds_per_step, 1e-6))))


def gpu_cases_for(bench: Bench) -> list[Case]:
    cases = common.gpu_cases(bench.quick)
    if bench.args.remat != "none":
        cases = [
            dataclasses.replace(
                c, overrides=c.overrides + (("model.remat_policy", bench.args.remat),)
            )
            for c in cases
        ]
    return cases


def host_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpus_online": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
    }


# ----------------------------------------------------------------------------- report


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _frameworks(case_result: dict[str, Any]) -> list[str]:
    return ["diffjax"] + sorted(k for k in case_result if k.startswith("torch"))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]  # fmt: skip

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def report(result: dict[str, Any]) -> str:
    """Markdown tables of a result dict (also used for BENCHMARKS.md)."""
    j, t = result["jax"], result.get("torch")
    lines = [
        f"suite={result['suite']}{' (quick)' if result['quick'] else ''}  "
        f"device={j['device_kind']} ({j['backend']})  jax {j['jax']}"
        + (f"  torch {t['torch']} diffusers {t['diffusers']}" if t else "  torch: not run"),
        f"host: {result['host']['cpu']}, {result['host']['cpus_allowed']} CPUs allowed"
        + (f"; {result['threads']} threads for each framework" if result["threads"] else ""),
        f"peak for MFU: {result['peak_flops'] / 1e12:.3f} TFLOP/s ({result['peak_source']})"
        if result["peak_flops"]
        else "peak for MFU: unknown device (MFU n/a)",
        f"load average before {result['load_avg_before'][0]:.2f}, "
        f"after {result.get('load_avg_after', [float('nan')])[0]:.2f} (1-min)",
        "",
        "Training (train step: forward + backward + AdamW + EMA; MFU = 3 x forward FLOPs x img/s / peak)",
        "",
    ]
    rows = []
    for c in result["cases"]:
        if "error" in c and "diffjax" not in c:
            rows.append([c["name"], "diffjax", "error", "", "", "", "", "", "", ""])
            continue
        for fw in _frameworks(c):
            r = c.get(fw, {})
            tr = r.get("train")
            if not tr:
                if "error" in r or "dropped" in r:
                    what = "error" if "error" in r else "dropped (>2x slower)"
                    rows.append([c["name"], fw, what, "", "", "", "", "", "", ""])
                continue
            compile_s = (
                f"{r['setup']['lower_s'] + r['setup']['compile_s']:.1f}" if fw == "diffjax" else "-"
            )
            ratio = f"{c['train_ratio']:.2f}x" if fw == "diffjax" and "train_ratio" in c else ""
            if fw == c.get("train_reference"):
                ratio = "(reference)"
            rows.append([
                c["name"], fw, f"{c['params'] / 1e6:.2f}M", str(c["case"]["batch"]),
                f"{tr['img_per_s']:.1f}", f"{tr['step_ms']:.1f}",
                f"{100 * tr['mfu']:.1f}%" if tr["mfu"] is not None else "n/a",
                compile_s, _fmt_bytes(tr["memory"]["peak_bytes"]), ratio,
            ])  # fmt: skip
    lines.append(_table(["case", "framework", "params", "batch", "img/s", "ms/step", "MFU",
                         "compile s", "peak mem", "diffjax/torch"], rows))  # fmt: skip
    lines += ["", "Sampling (dpmpp_2m, CFG batched 2x where conditional; latency per image)", ""]
    rows = []
    for c in result["cases"]:
        for fw in _frameworks(c):
            r = c.get(fw, {})
            s = r.get("sample")
            if not s:
                continue
            setup = r["sample_setup"]
            nfe = f"{setup['nfe']}" + (" x2 (CFG)" if setup["guided"] else "")
            compile_s = f"{setup['compile_s']:.1f}" if fw == "diffjax" else "-"
            ratio = (
                f"{c['sample_speedup']:.2f}x" if fw == "diffjax" and "sample_speedup" in c else ""
            )
            if fw == c.get("sample_reference"):
                ratio = "(reference)"
            rows.append([
                c["name"], fw, str(setup["batch"]), nfe, f"{s['latency_per_image_ms']:.2f}",
                f"{s['images_per_s']:.1f}", compile_s, _fmt_bytes(s["memory"]["peak_bytes"]), ratio,
            ])  # fmt: skip
    lines.append(_table(["case", "framework", "batch", "NFE", "ms/img", "img/s", "compile s",
                         "peak mem", "torch/diffjax latency"], rows))  # fmt: skip
    if result["experiments"]:
        lines += ["", "Experiments (diffjax; ratio = after/before throughput, or speed-up)", ""]
        rows = []
        for e in result["experiments"]:
            if "error" in e:
                rows.append([e["name"], e["case"], "error", "", "", ""])
                continue
            v = e["variants"]
            key = next(
                k for k in ("img_per_s", "latency_per_image_ms", "compile_s") if k in v[e["before"]]
            )
            unit = {"img_per_s": "img/s", "latency_per_image_ms": "ms/img", "compile_s": "s"}[key]
            others = [k for k in v if k not in (e["before"], e["after"])]
            extra = ", ".join(f"{k}: {v[k][key]:.3g}" for k in others)
            if "memory_ratio" in e:
                extra += (", " if extra else "") + f"memory x{e['memory_ratio']:.2f}"
            if "also" in e:
                extra += (", " if extra else "") + e["also"]
            rows.append([
                e["name"], e["case"], f"{e['before']}: {v[e['before']][key]:.3g} {unit}",
                f"{e['after']}: {v[e['after']][key]:.3g} {unit}", f"{e['ratio']:.2f}x", extra,
            ])  # fmt: skip
        lines.append(_table(["experiment", "case", "before", "after", "ratio", "also"], rows))
    for n in result.get("notes", []):
        lines.append(f"note: {n}")
    for err in result.get("errors", []):
        lines.append(f"ERROR: {err.splitlines()[0]}")
    return "\n".join(lines)


def result_path(result: dict[str, Any], out_dir: pathlib.Path, prefix: str = "") -> pathlib.Path:
    """`out_dir/<prefix><suite>[-quick]_<device kind>_<time>.json`."""
    kind = (
        re.sub(r"[^A-Za-z0-9]+", "-", result["jax"]["device_kind"]).strip("-").lower() or "device"
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{prefix}{result['suite']}{'-quick' if result['quick'] else ''}_{kind}_{stamp}.json"
    return out_dir / name


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the logic in seconds")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="cpu suite: CPUs for each framework (default: all allowed)",
    )
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument(
        "--experiments",
        default="all",
        help=f"'all', 'none' or a comma-separated subset of {EXPERIMENT_NAMES}",
    )
    p.add_argument("--remat", default="none", help="gpu suite: remat_policy of the cases")
    p.add_argument(
        "--torch-compile",
        action="store_true",
        help="gpu suite: also time the reference under torch.compile",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip what would start after this many seconds (gpu default 420)",
    )
    p.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    p.add_argument("--report", metavar="JSON", help="print the tables of a saved result and exit")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s is None and args.suite == "gpu" and not args.quick:
        args.budget_s = 420.0
    return args


def worker_main(kind: str, threads: int) -> None:
    if threads:
        common.pin_threads(threads)
    if kind == "jax":
        from benchmarks import jax_bench

        jax_bench.main(threads)
    else:
        from benchmarks import torch_reference

        torch_reference.main(threads)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.threads)
        return {}
    if args.report:
        with open(args.report) as f:
            result = json.load(f)
        print(report(result))
        return result
    result = Bench(args).run()
    text = report(result)
    print(text)
    common.save_result(result, result_path(result, pathlib.Path(args.out)))
    if result["errors"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
