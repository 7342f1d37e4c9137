"""Shared pieces of the benchmark suite: cases, device peaks, memory probes, workers.

Nothing here imports JAX or PyTorch: the orchestrator (`benchmarks/run.py`) stays
framework-free and every measurement runs in a worker process (`Worker`) that
imports exactly one framework. That keeps the two frameworks' thread pools and
allocators apart, lets peak memory be read per process, and lets the
orchestrator interleave timing windows of the two frameworks so that the load of
other processes on a shared machine falls on both alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "benchmarks" / "run.py"

# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked model: a config file plus the overrides the benchmark needs.

    Attributes:
      name: short label in tables and JSON.
      config: config file relative to the repo root, with an optional `:arg`.
      batch: global train batch (one device).
      sample_batch: images per sampling call (guided: the network sees twice as many).
      overrides: dotted config keys -> values (e.g. {'model.dtype': 'bfloat16'}).
      guidance: CFG scale for sampling (ignored for unconditional models); 0 takes the
        config's `sample.guidance`, or 4.0 where that is 1 (guidance off).
      sample_steps: solver steps of the dpmpp_2m sampler.
      train_seconds: target length of one timing window.
      windows: timing windows per framework (interleaved with the reference's).
    """

    name: str
    config: str
    batch: int
    sample_batch: int
    overrides: tuple[tuple[str, Any], ...] = ()
    guidance: float = 0.0
    sample_steps: int = 20
    train_seconds: float = 3.0
    windows: int = 3

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = [list(kv) for kv in self.overrides]
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Case:
        d = dict(d)
        d["overrides"] = tuple(
            (k, tuple(v) if isinstance(v, list) else v) for k, v in d["overrides"]
        )
        return Case(**d)


def cpu_cases(quick: bool) -> list[Case]:
    """The CPU suite: the digits U-Net and a small DiT, fixed batches, float32."""
    if quick:
        tiny_unet = (
            ("model.kwargs.base_channels", 16),
            ("model.kwargs.num_res_blocks", 1),
            ("model.kwargs.num_heads", 2),
            ("model.kwargs.num_groups", 8),
        )
        tiny_dit = (
            ("model.kwargs.depth", 2),
            ("model.kwargs.hidden_size", 64),
            ("model.kwargs.num_heads", 2),
            ("data.image_size", 8),
            ("model.dtype", "float32"),
        )
        return [
            Case("digits_unet", "configs/digits.py", 8, 2, tiny_unet, sample_steps=4,
                 train_seconds=0.2, windows=2),
            Case("dit_tiny", "configs/imagenet256_dit.py:S/4", 8, 2, tiny_dit, sample_steps=4,
                 train_seconds=0.2, windows=2),
        ]  # fmt: skip
    return [
        # configs/digits.py as is: 4.3M params, 8x8x1, 10 classes.
        Case("digits_unet", "configs/digits.py", 128, 32),
        # DiT-S/4 on 16x16x4 latents: 16 tokens, 32.9M params, 1000 classes, learned sigma.
        Case(
            "dit_s4_16px",
            "configs/imagenet256_dit.py:S/4",
            32,
            8,
            (("data.image_size", 16), ("model.dtype", "float32")),
        ),
    ]


def gpu_cases(quick: bool) -> list[Case]:
    """The GPU suite: DiT-B/2 and DiT-XL/2 on 32x32x4 latents, the DDPM CIFAR-10 U-Net.

    bf16 compute with cuDNN attention (the model's `attention_impl`); with `quick`
    tiny stand-ins of the same configs, for checking the script on a CPU.
    """
    dit = (("model.dtype", "bfloat16"), ("model.kwargs.attention_impl", "cudnn"))
    unet = (("model.dtype", "bfloat16"), ("model.kwargs.attention_impl", "cudnn"))
    if quick:
        tiny = (
            ("model.kwargs.depth", 2),
            ("model.kwargs.hidden_size", 64),
            ("model.kwargs.num_heads", 2),
            ("data.image_size", 8),
        )
        tiny_unet = (
            ("model.kwargs.base_channels", 16),
            ("model.kwargs.channel_mult", (1, 2)),
            ("model.kwargs.num_res_blocks", 1),
            ("model.kwargs.num_groups", 8),
            ("data.image_size", 16),
        )
        return [
            Case("DiT-B/2", "configs/imagenet256_dit.py:B/2", 4, 2, dit + tiny,
                 sample_steps=4, train_seconds=0.2, windows=2),
            Case("DiT-XL/2", "configs/imagenet256_dit.py:XL/2", 4, 2, dit + tiny,
                 sample_steps=4, train_seconds=0.2, windows=2),
            Case("ddpm_cifar10", "configs/cifar10_ddpm.py", 4, 2, unet + tiny_unet,
                 sample_steps=4, train_seconds=0.2, windows=2),
        ]  # fmt: skip
    # Batches keep the activations kept for the backward pass (model_summary's upper
    # bound: 31 / 27 / 8 GiB without remat) plus params and AdamW state well inside 80 GB.
    return [
        Case("DiT-B/2", "configs/imagenet256_dit.py:B/2", 128, 64, dit, train_seconds=2.0),
        Case("DiT-XL/2", "configs/imagenet256_dit.py:XL/2", 32, 32, dit, train_seconds=3.0),
        Case("ddpm_cifar10", "configs/cifar10_ddpm.py", 128, 128, unet, train_seconds=2.0),
    ]


# ----------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM) since start or the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (not Linux?).")


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- threads


def pin_threads(threads: int) -> list[int]:
    """Restricts this process to its first `threads` allowed CPUs; returns them.

    Called before JAX or PyTorch start: XLA:CPU sizes its intra-op pool from the
    schedulable CPUs, and PyTorch is then told the same count with
    `torch.set_num_threads`, so both frameworks compute on the same cores.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if threads <= 0 or threads > len(allowed):
        raise ValueError(f"--threads must be in 1..{len(allowed)}, got {threads}.")
    cpus = allowed[:threads]
    os.sched_setaffinity(0, cpus)
    return cpus


# ----------------------------------------------------------------------------- workers


class WorkerError(RuntimeError):
    """A worker process failed; the message carries its traceback and stderr tail."""


class Worker:
    """A child process serving JSON requests (`serve`) on its stdin/stdout.

    `call(cmd, **args)` sends one request and waits for its reply. The child's
    stderr goes to a temporary file whose tail is attached to any error.
    """

    def __init__(self, kind: str, *, threads: int = 0, env: dict[str, str] | None = None):
        self.kind = kind
        self._log = tempfile.NamedTemporaryFile(
            "w+", prefix=f"bench-{kind}-", suffix=".log", delete=False
        )
        cmd = [sys.executable, str(RUN_PY), "--worker", kind, "--threads", str(threads)]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=str(ROOT),
            env=env,
        )

    def call(self, cmd: str, **args: Any) -> Any:
        if self._proc.poll() is not None:
            raise WorkerError(
                f"{self.kind} worker exited ({self._proc.returncode}).\n{self.tail()}"
            )
        self._proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=30)
            raise WorkerError(
                f"{self.kind} worker died during {cmd!r} (exit {self._proc.returncode}).\n"
                f"{self.tail()}"
            )
        reply = json.loads(line)
        if not reply["ok"]:
            raise WorkerError(f"{self.kind} worker failed in {cmd!r}:\n{reply['error']}")
        return reply["result"]

    def tail(self, chars: int = 4000) -> str:
        self._log.flush()
        with open(self._log.name) as f:
            return f.read()[-chars:]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except Exception:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        os.unlink(self._log.name)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(handlers: dict[str, Callable[..., Any]]) -> None:
    """The worker side: answers JSON requests from stdin until it closes.

    Library output written to stdout (warnings, progress) would corrupt the
    protocol, so the protocol keeps a private copy of stdout and fd 1 is pointed
    at stderr.
    """
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            if req["cmd"] not in handlers:
                raise ValueError(f"unknown command {req['cmd']!r}; known: {sorted(handlers)}")
            reply = {"ok": True, "result": handlers[req["cmd"]](**req["args"])}
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def save_result(result: dict[str, Any], path: pathlib.Path) -> None:
    """Writes a benchmark's result JSON to `path` (creating its folder) and records it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"\nwrote {path}")
    result["path"] = str(path)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
