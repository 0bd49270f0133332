"""Workarounds for jax on CPU, for programs that run jaxopt2's optimizers outside its runner.

The ``jaxopt2`` command line applies both itself. Each one changes an environment variable
that jax or OpenBLAS read when they start, so call it before the first jax computation; a
value the user already set wins. See the troubleshooting guide.
"""

from jaxopt2._cpu_workaround import apply_cpu_deadlock_workaround, limit_lapack_threads

__all__ = ["apply_cpu_deadlock_workaround", "limit_lapack_threads"]
