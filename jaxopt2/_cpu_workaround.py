"""Protection against a deadlock of jax 0.10's CPU runtime, and against OpenBLAS's spinning
threads slowing the steps after a preconditioner refresh (:func:`limit_lapack_threads`).

On jaxlib 0.10.0-0.10.2, a jitted function that runs several independent ``eigh`` + matmul
branches (what a Shampoo or K-FAC preconditioner refresh does for blocks of different shapes)
can hang forever inside XLA's CPU runtime. Disabling XLA's concurrency-optimized CPU
scheduler avoids it. The flag must be in ``XLA_FLAGS`` before jax creates its CPU backend,
and a jaxlib that does not know the flag aborts the process, so it is only added for
jaxlib versions known to accept it.

This module never imports jax: it reads the installed version from package metadata.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from importlib import metadata

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_FLAG_NAME = FLAG.split("=")[0]
# jaxlib releases known to accept the flag (checked); the hang was seen on 0.10.0-0.10.2.
_KNOWN_GOOD = ((0, 9), (0, 10))


def _jaxlib_minor() -> tuple[int, int] | None:
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def apply_cpu_deadlock_workaround(environ: MutableMapping[str, str] | None = None) -> bool:
    """Append the XLA flag that avoids the jax 0.10 CPU deadlock to ``XLA_FLAGS``.

    Call it before the first jax computation in your program (importing jax is fine; running
    anything is not). It appends to, never replaces, a user's ``XLA_FLAGS``; leaves them alone
    if they already mention the scheduler flag; and does nothing on a jaxlib not known to
    accept the flag (an unknown flag would abort the process) or when
    ``JAXOPT2_NO_CPU_WORKAROUND=1`` is set.

    Returns:
      True if the flag is (now) present in ``XLA_FLAGS``.
    """
    env = os.environ if environ is None else environ
    current = env.get("XLA_FLAGS", "")
    if _FLAG_NAME in current:
        return FLAG in current
    if env.get("JAXOPT2_NO_CPU_WORKAROUND", "") not in ("", "0"):
        return False
    if _jaxlib_minor() not in _KNOWN_GOOD:
        return False
    env["XLA_FLAGS"] = f"{current} {FLAG}".strip()
    return True


LAPACK_THREADS_VAR = "OPENBLAS_NUM_THREADS"


def limit_lapack_threads(environ: MutableMapping[str, str] | None = None) -> bool:
    """Run jax's CPU LAPACK calls (``eigh``, ``cholesky``, ...) on one OpenBLAS thread.

    jaxlib runs its CPU linear-algebra kernels through the OpenBLAS that ships with scipy.
    After each call OpenBLAS's worker threads spin, waiting for more work, for tens of
    milliseconds: on a machine with few cores they take a core away from the XLA program
    that follows. Measured on 2 cores: the K-FAC steps after an inverse refresh ran at 27 ms
    instead of 16 ms until the spinning stopped (three steps later). One OpenBLAS thread has
    no workers to spin. ``OPENBLAS_NUM_THREADS`` is read when OpenBLAS loads, so call this
    before the first jax computation (and before importing scipy).

    Leaves a user's ``OPENBLAS_NUM_THREADS`` alone, and does nothing when
    ``JAXOPT2_NO_CPU_WORKAROUND=1`` is set.

    Returns:
      True if the variable is (now) ``1``.
    """
    env = os.environ if environ is None else environ
    if LAPACK_THREADS_VAR in env:
        return env[LAPACK_THREADS_VAR] == "1"
    if env.get("JAXOPT2_NO_CPU_WORKAROUND", "") not in ("", "0"):
        return False
    env[LAPACK_THREADS_VAR] = "1"
    return True
