"""The jax 0.10 CPU deadlock: the flag handling, and a regression run in a subprocess."""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxopt2 import _cpu_workaround as cw
from tests.hang_check import USER_DEFAULTS

pytestmark = pytest.mark.timeout(240)


def test_appends_to_user_flags(monkeypatch):
    monkeypatch.setattr(cw, "_jaxlib_minor", lambda: (0, 10))
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert cw.apply_cpu_deadlock_workaround(env)
    assert env["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {cw.FLAG}"
    # idempotent
    assert cw.apply_cpu_deadlock_workaround(env)
    assert env["XLA_FLAGS"].count(cw._FLAG_NAME) == 1


def test_respects_user_choice_and_unknown_versions(monkeypatch):
    monkeypatch.setattr(cw, "_jaxlib_minor", lambda: (0, 10))
    env = {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
    assert not cw.apply_cpu_deadlock_workaround(env)
    assert env["XLA_FLAGS"].endswith("=true")
    env = {"JAXOPT2_NO_CPU_WORKAROUND": "1"}
    assert not cw.apply_cpu_deadlock_workaround(env)
    assert "XLA_FLAGS" not in env
    # A jaxlib not known to accept the flag would abort on it: leave XLA_FLAGS alone.
    monkeypatch.setattr(cw, "_jaxlib_minor", lambda: (0, 99))
    env = {}
    assert not cw.apply_cpu_deadlock_workaround(env)
    assert env == {}


def test_flag_is_active_in_this_suite():
    if cw._jaxlib_minor() in cw._KNOWN_GOOD:
        assert cw.FLAG in os.environ.get("XLA_FLAGS", "")


_REFRESH = textwrap.dedent(
    """
    from jaxopt2.cpu import apply_cpu_deadlock_workaround
    apply_cpu_deadlock_workaround()
    import jax, jax.numpy as jnp

    def inverse_fourth_root(m):
        w, v = jnp.linalg.eigh(m)
        s = jnp.maximum(w, 1e-6) ** -0.25
        return (v * s[:, None, :]) @ jnp.swapaxes(v, -1, -2)

    # Blocks of several shapes and batch sizes refreshed in one jitted call: the pattern
    # that deadlocks jax 0.10's CPU runtime without the workaround.
    mats = []
    for n, batch in [(64, 8), (64, 2), (32, 3), (16, 5)]:
        x = jax.random.normal(jax.random.PRNGKey(n + batch), (batch, n, n))
        mats.append(x @ jnp.swapaxes(x, -1, -2) + 1e-3 * jnp.eye(n))
    roots = jax.jit(lambda ms: [inverse_fourth_root(m) for m in ms])
    for _ in range(15):
        jax.block_until_ready(roots(mats))
    print("finished")
    """
)


def test_multi_shape_eigh_refresh_does_not_hang():
    env = {k: v for k, v in os.environ.items() if k not in USER_DEFAULTS}
    try:
        out = subprocess.run(
            [sys.executable, "-c", _REFRESH],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a multi-shape eigh refresh hung for 120 s: the CPU deadlock is back")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "finished" in out.stdout


def test_limit_lapack_threads_sets_one_thread_unless_the_user_chose():
    env = {}
    assert cw.limit_lapack_threads(env) and env == {cw.LAPACK_THREADS_VAR: "1"}
    env = {cw.LAPACK_THREADS_VAR: "4"}
    assert not cw.limit_lapack_threads(env) and env[cw.LAPACK_THREADS_VAR] == "4"
    env = {"JAXOPT2_NO_CPU_WORKAROUND": "1"}
    assert not cw.limit_lapack_threads(env) and cw.LAPACK_THREADS_VAR not in env
