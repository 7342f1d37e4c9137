"""Test set-up: 8 simulated CPU devices, set before JAX initializes its backend, and one
compilation cache for the whole session.

The cache starts empty in every session (a fresh temporary directory), so the suite runs
as on a machine with a cold cache; within the session, a program compiled by one test,
xdist worker or subprocess (the commands read JAX_COMPILATION_CACHE_DIR) is loaded by the
next instead of compiled again. Set JAX_COMPILATION_CACHE_DIR to keep one across sessions.
"""

import os
import tempfile

# One BLAS thread per process, set before anything imports numpy (the xdist workers and
# every subprocess inherit it). The suite runs two workers on two cores beside XLA's own
# threads; OpenBLAS's spinning worker threads then fight over the cores, and small
# float64 work such as fitting the digits classifier (eval/digits.py) went from ~1.5 s
# to 30-60 s.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# XLA:CPU's code generation at -O0 without the expensive LLVM passes: the tests check
# logic on tiny models that run a few steps, where compiling dominates (a tiny U-Net's
# train step compiles in ~2/3 of the time). Set DIFFJAX_TEST_XLA_OPT=1 to test with the
# optimizing backend. Benchmarks time the optimized code; these flags are tests' only.
FAST_XLA_FLAGS = (
    ()
    if os.environ.get("DIFFJAX_TEST_XLA_OPT") == "1"
    else (
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
        "--xla_cpu_use_fusion_emitters=false",
    )
)
for _flag in FAST_XLA_FLAGS:
    if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " " + _flag


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test's subprocess: the fast flags, and `devices` CPU devices
    (None: XLA's default of one)."""
    count = () if devices is None else (f"--xla_force_host_platform_device_count={devices}",)
    return " ".join((*FAST_XLA_FLAGS, *count))


os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every program goes to the session's cache, not only those that took over 1 s to
# compile: the many subprocesses (launch/*.py) then load the small ones too.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Set here, in the pytest process that starts the xdist workers, so that they and every
# subprocess inherit the same directory.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffjax-test-xla-")
