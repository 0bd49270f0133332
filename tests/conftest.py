"""Test configuration shared by the whole suite.

The jax 0.10 CPU deadlock workaround must be in XLA_FLAGS before jax creates its CPU backend,
so it is applied here, at conftest import, before any test runs a computation. float64 is
enabled for the dense references; tests that check float32/bfloat16 behaviour ask for those
dtypes explicitly.
"""

from jaxopt2._cpu_workaround import apply_cpu_deadlock_workaround

apply_cpu_deadlock_workaround()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
