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
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Set here, in the pytest process that starts the xdist workers, so that they and every
# subprocess inherit the same directory.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffjax-test-xla-")
