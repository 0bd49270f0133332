"""Test configuration shared by the whole suite.

The jax 0.10 CPU deadlock workaround must be in XLA_FLAGS before jax creates its CPU backend,
so it is applied here, at conftest import, before any test runs a computation. float64 is
enabled for the dense references; tests that check float32/bfloat16 behaviour ask for those
dtypes explicitly.

Compiles are most of the suite's time, and many tests compile the same programs (a run in
process and the same run from the command line, a run and its resume in child processes).
XLA's persistent compilation cache, in a directory made for this session (or the one the user
set in ``JAX_COMPILATION_CACHE_DIR``), lets every process of the session, pytest-xdist
workers and the command-line children included (they inherit the environment), reuse them.
A cached executable is the one a fresh compile would give.

The suite compiles with ``jax_disable_most_optimizations`` (XLA's backend and LLVM
optimizations off), set in the environment so the command-line children inherit it: its
programs are tiny, so compiling is the cost and running them is not (the zoo convergence
and bf16 checks: 198 s -> 82 s). What the tests check is the library's arithmetic, which
does not depend on how XLA optimizes it beyond float rounding, and every tolerance holds
either way. ``JAX_DISABLE_MOST_OPTIMIZATIONS=0 pytest`` runs the suite fully optimized; the
CPU-hang regression tests always run their children with the user's default settings.
"""

import atexit
import os
import shutil
import tempfile

from jaxopt2.cpu import apply_cpu_deadlock_workaround

apply_cpu_deadlock_workaround()

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jaxopt2-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update(
    "jax_disable_most_optimizations",
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() not in ("0", "false", ""),
)
# jax may have read its environment before the lines above (importing jaxopt2 imports it).
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")),
)
