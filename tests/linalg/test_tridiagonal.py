"""The dense-backed tridiagonal eigensolver against scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxopt2.linalg import eigh_tridiagonal

pytestmark = pytest.mark.timeout(120)


def _random(seed, *shape):
    rng = np.random.default_rng(seed)
    m = shape[-1]
    return rng.standard_normal(shape), rng.standard_normal((*shape[:-1], m - 1))


def _check_against_scipy(alphas, betas, w, v):
    want_w, want_v = scipy.linalg.eigh_tridiagonal(alphas, betas)
    np.testing.assert_allclose(w, want_w, rtol=1e-12, atol=1e-12)
    # Eigenvectors are defined up to sign (the eigenvalues here are simple).
    np.testing.assert_allclose(np.abs(np.sum(v * want_v, axis=0)), 1.0, atol=1e-10)
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    np.testing.assert_allclose(t @ v, v * w, atol=1e-12)
    np.testing.assert_allclose(v.T @ v, np.eye(len(alphas)), atol=1e-12)


def test_matches_scipy_eigh_tridiagonal():
    alphas, betas = _random(0, 12)
    w, v = jax.jit(eigh_tridiagonal)(alphas, betas)
    assert w.shape == (12,) and v.shape == (12, 12)
    assert np.all(np.diff(w) > 0), "eigenvalues come ascending"
    _check_against_scipy(alphas, betas, np.asarray(w), np.asarray(v))


def test_batches_vmap_and_size_one():
    alphas, betas = _random(1, 3, 7)
    w, v = eigh_tridiagonal(alphas, betas)
    assert w.shape == (3, 7) and v.shape == (3, 7, 7)
    wv, _ = jax.vmap(eigh_tridiagonal)(alphas, betas)
    np.testing.assert_allclose(wv, w, atol=1e-12)
    for i in range(3):
        _check_against_scipy(alphas[i], betas[i], np.asarray(w[i]), np.asarray(v[i]))
    w1, v1 = eigh_tridiagonal(jnp.array([2.5]), jnp.zeros((0,)))
    np.testing.assert_allclose(w1, [2.5])
    np.testing.assert_allclose(np.abs(v1), [[1.0]])


def test_zero_off_diagonal_and_dtype():
    # A block-diagonal T (a Lanczos restart writes beta = 0): eigenvalues of both blocks.
    alphas = np.array([1.0, 2.0, 5.0, 3.0])
    betas = np.array([1.0, 0.0, 1.0])
    w, _ = eigh_tridiagonal(alphas, betas)
    want = np.sort(
        np.r_[np.linalg.eigvalsh([[1, 1], [1, 2]]), np.linalg.eigvalsh([[5, 1], [1, 3]])]
    )
    np.testing.assert_allclose(w, want, rtol=1e-12)
    w32, v32 = eigh_tridiagonal(jnp.asarray(alphas, jnp.float32), jnp.asarray(betas, jnp.float32))
    assert w32.dtype == jnp.float32 and v32.dtype == jnp.float32
    np.testing.assert_allclose(w32, want, rtol=1e-5)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"betas must have shape \(3,\) to go with alphas"):
        eigh_tridiagonal(jnp.ones(4), jnp.ones(4))
    with pytest.raises(ValueError, match=r"betas must have shape \(2, 3\) to go with alphas"):
        eigh_tridiagonal(jnp.ones((2, 4)), jnp.ones((3, 3)))
    with pytest.raises(
        ValueError, match=r"alphas must have shape \[..., m\] with m >= 1, got \(\)"
    ):
        eigh_tridiagonal(jnp.ones(()), jnp.ones(0))
    with pytest.raises(
        ValueError, match=r"alphas must have shape \[..., m\] with m >= 1, got \(0,\)"
    ):
        eigh_tridiagonal(jnp.ones(0), jnp.ones(0))
