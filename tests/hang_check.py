"""Run a script in fresh processes that never set the XLA CPU flag, with a timeout.

The jax 0.10 CPU deadlock (several batched LAPACK calls at once) shows up in a fraction of
processes, so the script runs in two processes side by side; a hang fails the test after
`timeout` seconds instead of stalling the suite.
"""

import os
import subprocess
import sys

import pytest

# variables the suite sets that a user's process does not have
USER_DEFAULTS = ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS")


def run_without_xla_flag(code: str, what: str, *, processes: int = 2, timeout: float = 150):
    """Run `code` in `processes` fresh interpreters; return their standard outputs."""
    # the user's defaults: no XLA flag, and XLA's optimizations on (the suite turns them off)
    env = {k: v for k, v in os.environ.items() if k not in USER_DEFAULTS}
    env["JAXOPT2_NO_CPU_WORKAROUND"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{what} hung for {timeout:.0f} s without the XLA flag")
        assert proc.returncode == 0, err[-2000:]
        outs.append(out)
    return outs
