"""Probe groups (batch_size) give the same estimates as one vmap over all probes; "auto"
chooses cache-sized groups on a CPU and one vmap for small matvecs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt2.curvature import estimators as E
from jaxopt2.curvature import (
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def operator():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 12))
    m = jnp.asarray(a + a.T)
    like = {"u": jnp.zeros(5), "w": jnp.zeros((7,))}

    def matvec(v):
        flat = jnp.concatenate([v["u"], v["w"]])
        out = m @ flat
        return {"u": out[:5], "w": out[5:]}

    return matvec, like


@pytest.mark.parametrize("batch_size", [1, 3, 7, 50, "auto"])
def test_batched_probes_match_vmap(operator, batch_size):
    matvec, like = operator
    key = jax.random.PRNGKey(3)
    full = hutchinson_trace(matvec, like, key, 7, batch_size=None)
    grouped = hutchinson_trace(matvec, like, key, 7, batch_size=batch_size)
    np.testing.assert_allclose(grouped, full, rtol=1e-12)
    d_full = hutchinson_diagonal(matvec, like, key, 7, dist="gaussian", batch_size=None)
    d_grouped = hutchinson_diagonal(matvec, like, key, 7, dist="gaussian", batch_size=batch_size)
    chex.assert_trees_all_close(d_grouped, d_full, rtol=1e-12)
    pp_full = hutchpp_trace(matvec, like, key, 10, batch_size=None)
    pp_grouped = hutchpp_trace(matvec, like, key, 10, batch_size=batch_size)
    np.testing.assert_allclose(pp_grouped, pp_full, rtol=1e-10)
    n_full, w_full = spectral_density(matvec, like, key, num_iters=6, num_probes=7, batch_size=None)
    n_grp, w_grp = spectral_density(
        matvec, like, key, num_iters=6, num_probes=7, batch_size=batch_size
    )
    np.testing.assert_allclose(n_grp, n_full, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w_grp, w_full, rtol=1e-10, atol=1e-12)


def test_bad_batch_size(operator):
    matvec, like = operator
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        hutchinson_trace(matvec, like, jax.random.PRNGKey(0), 4, batch_size=0)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 1\.5"):
        spectral_density(
            matvec, like, jax.random.PRNGKey(0), num_iters=3, num_probes=2, batch_size=1.5
        )
    with pytest.raises(
        ValueError, match="batch_size must be None, 'auto' or a positive integer, got 'fast'"
    ):
        hutchinson_trace(matvec, like, jax.random.PRNGKey(0), 4, batch_size="fast")


def test_groups_run_sequentially(operator):
    """batch_size really changes the program: the groups run in a loop, not one vmap."""
    matvec, like = operator
    key = jax.random.PRNGKey(0)
    grouped = str(jax.make_jaxpr(lambda k: hutchinson_trace(matvec, like, k, 8, batch_size=2))(key))
    single = str(
        jax.make_jaxpr(lambda k: hutchinson_trace(matvec, like, k, 8, batch_size=None))(key)
    )
    assert "scan" in grouped
    assert "scan" not in single


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="'auto' groups only on a CPU")
def test_auto_groups_by_the_largest_intermediate_on_cpu(operator):
    n = 1 << 17  # a @ v is n float32 values: 512 KiB, the matvec's largest intermediate
    a = jnp.asarray(np.random.default_rng(1).normal(size=(n, 8)) / np.sqrt(n), jnp.float32)
    like = jnp.zeros(8, jnp.float32)

    def matvec(v):
        return (a @ v) @ a  # aᵀ(a v) without a transposed copy of a

    assert E._peak_intermediate_bytes(matvec, like) == n * 4
    group = E.CPU_PROBE_GROUP_BYTES // (n * 4)
    assert 1 < group < 10
    assert E._resolve_batch_size("auto", 10, matvec, like) == group
    assert E._resolve_batch_size("auto", 1, matvec, like) is None  # nothing to batch
    assert E._resolve_batch_size(None, 10, matvec, like) is None
    small_matvec, small_like = operator
    assert E._resolve_batch_size("auto", 10, small_matvec, small_like) is None  # all fit

    key = jax.random.PRNGKey(5)
    auto = jax.jit(lambda k: hutchinson_trace(matvec, like, k, 10))(key)
    grouped = jax.jit(lambda k: hutchinson_trace(matvec, like, k, 10, batch_size=group))(key)
    full = jax.jit(lambda k: hutchinson_trace(matvec, like, k, 10, batch_size=None))(key)
    np.testing.assert_array_equal(auto, grouped)
    np.testing.assert_allclose(auto[0], full[0], rtol=1e-5)  # float32 sums over 2^17 rows
    np.testing.assert_allclose(auto[1], full[1], rtol=1e-3)  # stderr: a small difference
    assert "scan" in str(jax.make_jaxpr(lambda k: hutchinson_trace(matvec, like, k, 10))(key))
