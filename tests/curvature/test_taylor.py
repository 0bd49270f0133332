"""Taylor-mode (STDE) estimators against dense derivatives of a tiny float64 MLP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt2.curvature import (
    biharmonic,
    directional_derivatives,
    laplacian,
    stde_biharmonic,
    stde_laplacian,
)

pytestmark = pytest.mark.timeout(180)

_RNG = np.random.default_rng(0)
_W1 = jnp.asarray(_RNG.standard_normal((4, 6)) / 2)
_B1 = jnp.asarray(_RNG.standard_normal(6) / 4)
_W2 = jnp.asarray(_RNG.standard_normal(6))
X = jnp.asarray([0.3, -0.8, 0.5, 1.1])


def mlp(x):
    """A scalar function of 4 inputs whose derivatives of every order mix all coordinates."""
    return jnp.dot(jnp.tanh(x @ _W1 + _B1), _W2) + 0.1 * jnp.sin(x[0] * x[2])


@pytest.fixture(scope="module")
def dense():
    """Dense derivative tensors up to order 4 (nested jacfwd of the Hessian, jitted)."""
    h = jax.jit(jax.hessian(mlp))(X)
    d3 = jax.jit(jax.jacfwd(jax.hessian(mlp)))(X)
    d4 = jax.jit(jax.jacfwd(jax.jacfwd(jax.hessian(mlp))))(X)
    return jax.grad(mlp)(X), h, d3, d4


def test_directional_derivatives_match_dense_tensors(dense):
    g, h, d3, d4 = dense
    v = jnp.asarray([0.7, -1.3, 0.2, 0.9])
    got = jax.jit(directional_derivatives, static_argnums=(0, 3))(mlp, X, v, 4)
    want = [
        g @ v,
        v @ h @ v,
        jnp.einsum("ijk,i,j,k", d3, v, v, v),
        jnp.einsum("ijkl,i,j,k,l", d4, v, v, v, v),
    ]
    np.testing.assert_allclose(got, want, rtol=1e-11)


def test_exact_operators_match_dense_traces(dense):
    _, h, _, d4 = dense
    lap = jax.jit(laplacian, static_argnums=0)(mlp, X)
    np.testing.assert_allclose(lap, jnp.trace(h), rtol=1e-12)
    np.testing.assert_allclose(
        jax.jit(biharmonic, static_argnums=0)(mlp, X), jnp.einsum("iijj", d4), rtol=1e-10
    )


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_stde_laplacian_is_unbiased(dense, dist):
    """The estimate is the mean of the second directional derivatives along the key's
    directions, and over 4,000 directions it lies within 5 standard errors of tr H (which
    are a small fraction of it, so a biased rule would fail)."""
    _, h, _, _ = dense
    key, n = jax.random.key(1), 4000
    est = jax.jit(lambda x, k: stde_laplacian(mlp, x, k, n, dist=dist))(X, key)
    draw = jax.random.rademacher if dist == "rademacher" else jax.random.normal
    vs = np.asarray(draw(key, (n, 4), dtype=jnp.float64))
    samples = np.einsum("si,ij,sj->s", vs, np.asarray(h), vs)
    np.testing.assert_allclose(est, samples.mean(), rtol=1e-10)
    se = samples.std(ddof=1) / np.sqrt(n)
    exact = float(jnp.trace(h))
    assert se < 0.05 * abs(exact), (se, exact)
    assert abs(float(est) - exact) <= 5 * se, (float(est), exact, se)


def test_stde_biharmonic_is_unbiased(dense):
    """A third of the mean fourth directional derivative over Gaussian directions: within 5
    standard errors of Σᵢⱼ ∂ᵢ²∂ⱼ²u over 20,000 directions (without the 1/3, or with
    Rademacher directions, the estimate is off by many standard errors)."""
    _, _, _, d4 = dense
    key, n = jax.random.key(2), 20_000
    est = float(jax.jit(stde_biharmonic, static_argnums=(0, 3))(mlp, X, key, n))
    vs = np.asarray(jax.random.normal(key, (n, 4), dtype=jnp.float64))
    samples = np.einsum("ijkl,si,sj,sk,sl->s", np.asarray(d4), vs, vs, vs, vs) / 3
    np.testing.assert_allclose(est, samples.mean(), rtol=1e-9)
    se = samples.std(ddof=1) / np.sqrt(n)
    exact = float(jnp.einsum("iijj", d4))
    assert se < 0.1 * abs(exact), (se, exact)
    assert abs(est - exact) <= 5 * se, (est, exact, se)
    rad = np.asarray(jax.random.rademacher(key, (n, 4), dtype=jnp.float64))
    biased = np.einsum("ijkl,si,sj,sk,sl->s", np.asarray(d4), rad, rad, rad, rad).mean() / 3
    assert abs(biased - exact) > 5 * se  # why the directions must be Gaussian


def test_estimators_vmap_over_collocation_points():
    pts = jnp.stack([X, -X, 0.5 * X])
    batched = jax.jit(jax.vmap(lambda p: laplacian(mlp, p)))(pts)
    one_by_one = jax.jit(jax.vmap(lambda p: jnp.trace(jax.hessian(mlp)(p))))(pts)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-12)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: stde_laplacian(lambda x: x**2, X, jax.random.key(0)), ValueError,
         "stde_laplacian: fn must return a scalar"),
        (lambda: laplacian(mlp, jnp.arange(4)), TypeError,
         "laplacian: x has dtype int"),
        (lambda: stde_laplacian(mlp, X, jax.random.key(0), 0), ValueError,
         "num_samples must be a positive integer"),
        (lambda: stde_laplacian(mlp, X, jax.random.key(0), dist="sphere"), ValueError,
         "dist must be one of"),
        (lambda: directional_derivatives(mlp, X, jnp.ones(3), 2), ValueError,
         "v has shape \\(3,\\) but x has shape \\(4,\\)"),
    ],
)  # fmt: skip
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
