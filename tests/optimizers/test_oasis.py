"""OASIS against a naive loop with a dense Hessian, its truncation floor and validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jaxopt2
from jaxopt2._tree import random_probes

pytestmark = pytest.mark.timeout(120)


def test_floor_bounds_zero_and_negative_curvature():
    # Diagonal Hessian [0, -4, 4]: Rademacher Hutchinson estimates a diagonal exactly.
    a = jnp.array([0.0, -4.0, 4.0])
    c = jnp.array([1.0, 0.5, 0.0])
    value_fn = lambda w: jnp.sum(c * w) + 0.5 * jnp.sum(a * w**2)
    w = jnp.array([0.3, 0.2, 1.0])
    lr, alpha = 0.1, 0.5
    opt = jaxopt2.oasis(learning_rate=lr, alpha=alpha)
    g = jax.grad(value_fn)(w)
    updates, state = opt.update(g, opt.init(w), w, value_fn=value_fn, key=jax.random.PRNGKey(0))
    expected = -lr * g / jnp.maximum(jnp.abs(a), alpha)
    np.testing.assert_allclose(updates, expected, rtol=1e-6)
    np.testing.assert_allclose(state[0].hessian_diag, a, atol=1e-6)


def _problem():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": 0.5 * jax.random.normal(k[0], (5, 3), jnp.float64), "b": jnp.zeros(3)}
    x = jax.random.normal(k[1], (20, 5), jnp.float64)
    y = jax.random.normal(k[2], (20, 3), jnp.float64)
    value_fn = lambda p: jnp.mean(jnp.sum((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2, 1))
    return params, value_fn


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_against_a_naive_loop(b1):
    params, value_fn = _problem()
    lr, b2, alpha, wd, init_probes, probes = 0.3, 0.9, 0.05, 0.01, 7, 2
    opt = jaxopt2.oasis(
        learning_rate=lr,
        b1=b1,
        b2=b2,
        alpha=alpha,
        weight_decay=wd,
        num_probes=probes,
        init_probes=init_probes,
        stats_dtype=jnp.float64,
    )
    flat, unravel = ravel_pytree(params)
    f = lambda v: value_fn(unravel(v))
    hessian = jax.jit(jax.hessian(f))
    theta = np.asarray(flat)
    d = np.zeros_like(theta)
    m = np.zeros_like(theta)
    p_opt, state = params, opt.init(params)
    for t in range(4):
        key = jax.random.PRNGKey(t)
        _, updates, state = jaxopt2.value_and_update(opt, value_fn, p_opt, state, key=key)
        p_opt = optax.apply_updates(p_opt, updates)
        h = np.asarray(hessian(theta))
        zs = random_probes(key, params, init_probes if t == 0 else probes)
        n = jax.tree.leaves(zs)[0].shape[0]
        zs = np.stack(
            [np.asarray(ravel_pytree(jax.tree.map(lambda z: z[i], zs))[0]) for i in range(n)]
        )
        est = np.mean([z * (h @ z) for z in zs], axis=0)
        d = est if t == 0 else b2 * d + (1 - b2) * est
        g = np.asarray(jax.grad(f)(theta))
        m = b1 * m + (1 - b1) * g
        m_hat = m / (1 - b1 ** (t + 1))
        theta = theta - lr * (m_hat / np.maximum(np.abs(d), alpha) + wd * theta)
        np.testing.assert_allclose(ravel_pytree(p_opt)[0], theta, rtol=1e-9, atol=1e-12)


def test_refresh_every_k_reuses_the_estimate():
    params, value_fn = _problem()
    opt = jaxopt2.oasis(update_every=3)
    state = opt.init(params)
    diags = []
    for t in range(4):
        _, _, state = jaxopt2.value_and_update(
            opt, value_fn, params, state, key=jax.random.PRNGKey(t)
        )
        diags.append(ravel_pytree(state[0].hessian_diag)[0])
    np.testing.assert_array_equal(diags[0], diags[1])
    np.testing.assert_array_equal(diags[1], diags[2])
    assert not np.array_equal(diags[2], diags[3])


def test_validation():
    with pytest.raises(ValueError, match="alpha"):
        jaxopt2.oasis(alpha=0.0)
    with pytest.raises(ValueError, match="b2"):
        jaxopt2.oasis(b2=1.0)
    with pytest.raises(ValueError, match="init_probes"):
        jaxopt2.oasis(init_probes=0)
