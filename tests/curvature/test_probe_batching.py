"""Probe groups (batch_size) give the same estimates as one vmap over all probes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt2.curvature import hutchinson_diagonal, hutchinson_trace, spectral_density

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


@pytest.mark.parametrize("batch_size", [1, 3, 7, 50])
def test_batched_probes_match_vmap(operator, batch_size):
    matvec, like = operator
    key = jax.random.PRNGKey(3)
    full = hutchinson_trace(matvec, like, key, 7)
    grouped = hutchinson_trace(matvec, like, key, 7, batch_size=batch_size)
    np.testing.assert_allclose(grouped, full, rtol=1e-12)
    d_full = hutchinson_diagonal(matvec, like, key, 7, dist="gaussian")
    d_grouped = hutchinson_diagonal(matvec, like, key, 7, dist="gaussian", batch_size=batch_size)
    for a, b in zip(jax.tree.leaves(d_grouped), jax.tree.leaves(d_full), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    n_full, w_full = spectral_density(matvec, like, key, num_iters=6, num_probes=7)
    n_grp, w_grp = spectral_density(
        matvec, like, key, num_iters=6, num_probes=7, batch_size=batch_size
    )
    np.testing.assert_allclose(n_grp, n_full, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w_grp, w_full, rtol=1e-10, atol=1e-12)


def test_bad_batch_size(operator):
    matvec, like = operator
    with pytest.raises(ValueError, match="batch_size"):
        hutchinson_trace(matvec, like, jax.random.PRNGKey(0), 4, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        spectral_density(
            matvec, like, jax.random.PRNGKey(0), num_iters=3, num_probes=2, batch_size=1.5
        )


def test_groups_run_sequentially(operator):
    """batch_size really changes the program: the groups run in a loop, not one vmap."""
    matvec, like = operator
    key = jax.random.PRNGKey(0)
    grouped = str(jax.make_jaxpr(lambda k: hutchinson_trace(matvec, like, k, 8, batch_size=2))(key))
    single = str(jax.make_jaxpr(lambda k: hutchinson_trace(matvec, like, k, 8))(key))
    assert "scan" in grouped
    assert "scan" not in single
