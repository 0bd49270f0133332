"""FOSI against dense float64 eigendecompositions: the Newton part, the base part, refreshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt2

pytestmark = pytest.mark.timeout(120)

DIM = 8


def _quadratic():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    eigs = np.array([200.0, 90.0, 40.0, 10.0, 4.0, 2.0, 1.0, 0.5])
    a = (q * eigs) @ q.T
    a = jnp.asarray(0.5 * (a + a.T))
    x_star = jnp.asarray(rng.standard_normal(DIM))
    value_fn = lambda x: 0.5 * (x - x_star) @ a @ (x - x_star)
    return a, x_star, value_fn, jnp.asarray(rng.standard_normal(DIM))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_full_subspace_is_a_newton_step(alpha):
    a, x_star, value_fn, x = _quadratic()
    opt = jaxopt2.fosi(k=DIM, num_iters=DIM, alpha=alpha, stats_dtype=jnp.float64)
    g = jax.grad(value_fn)(x)
    updates, _ = opt.update(g, opt.init(x), x, value_fn=value_fn, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(updates, -alpha * np.linalg.solve(a, g), rtol=1e-8, atol=1e-10)
    if alpha == 1.0:
        np.testing.assert_allclose(x + updates, x_star, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("base_name", ["sgd", "adam"])
def test_complement_gets_the_base_update_of_the_projected_gradient(base_name):
    a, _, value_fn, x = _quadratic()
    k, alpha = 3, 0.7
    base = optax.sgd(0.01) if base_name == "sgd" else optax.adam(0.1)
    opt = jaxopt2.fosi(base=base, k=k, num_iters=DIM, alpha=alpha, stats_dtype=jnp.float64)
    g = jax.grad(value_fn)(x)
    updates, state = opt.update(g, opt.init(x), x, value_fn=value_fn, key=jax.random.PRNGKey(0))
    lam, vecs = np.linalg.eigh(np.asarray(a))
    v = vecs[:, ::-1][:, :k].T  # top-k, [k, n]
    lam = lam[::-1][:k]
    proj = v.T @ v
    newton = v.T @ ((v @ g) / np.abs(lam))
    rest = np.asarray(g) - proj @ g
    base_u, _ = base.update(jnp.asarray(rest), base.init(x), x)
    expected = -alpha * newton + (np.eye(DIM) - proj) @ np.asarray(base_u)
    np.testing.assert_allclose(updates, expected, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(state.eigvals, lam, rtol=1e-8)


def test_smallest_eigenpairs_get_absolute_value_newton_steps():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    eigs = np.array([50.0, 8.0, 3.0, 1.0, 0.5, 0.2, -2.0, -6.0])
    h = jnp.asarray((q * eigs) @ q.T)
    value_fn = lambda x: 0.5 * x @ h @ x
    x = jnp.asarray(rng.standard_normal(DIM))
    base = optax.sgd(0.0)
    opt = jaxopt2.fosi(base=base, k=1, num_smallest=2, num_iters=DIM, stats_dtype=jnp.float64)
    g = jax.grad(value_fn)(x)
    updates, state = opt.update(g, opt.init(x), x, value_fn=value_fn, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(state.eigvals, [50.0, -6.0, -2.0], rtol=1e-8)
    v = np.asarray(q[:, [0, 7, 6]]).T
    expected = -v.T @ ((v @ g) / np.array([50.0, 6.0, 2.0]))
    np.testing.assert_allclose(updates, expected, rtol=1e-7, atol=1e-10)
    assert float(jnp.vdot(updates, g)) < 0  # never an ascent direction


def test_eigenpairs_refresh_every_approx_every_steps():
    _, _, value_fn, x = _quadratic()
    opt = jaxopt2.fosi(k=2, num_iters=DIM, approx_every=3)
    state = opt.init(x)
    seen = []
    for t in range(4):
        _, u, state = jaxopt2.value_and_update(opt, value_fn, x, state, key=jax.random.PRNGKey(t))
        x = optax.apply_updates(x, u)
        seen.append(np.asarray(state.eigvecs))
    np.testing.assert_array_equal(seen[0], seen[2])
    assert not np.array_equal(seen[2], seen[3])


def test_validation():
    x = jnp.zeros(4)
    with pytest.raises(ValueError, match=r"k \+ num_smallest = 5 exceeds the number of param"):
        jaxopt2.fosi(k=5).init(x)
    with pytest.raises(ValueError, match=r"num_iters=2 is below k \+ num_smallest = 3"):
        jaxopt2.fosi(k=3, num_iters=2).init(x)
    with pytest.raises(TypeError, match=r"base must be an optax\.GradientTransformation"):
        jaxopt2.fosi(base=lambda g: g)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        jaxopt2.fosi(k=0)
