"""Conjugate gradients on pytrees against dense solves."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxopt2.linalg import CGResult, cg

pytestmark = pytest.mark.timeout(120)

DIM = 17


def _tree(flat):
    """A two-leaf pytree ({"b": [5], "w": [3, 4]}) holding a flat vector of size 17.

    The split follows ravel_pytree's order (sorted dict keys), so `_flat` inverts it.
    """
    flat = jnp.asarray(flat)
    return {"b": flat[..., :5], "w": flat[..., 5:].reshape(*flat.shape[:-1], 3, 4)}


def _flat(tree):
    return ravel_pytree(tree)[0]


def _spd(seed, eigenvalues=None, dim=DIM):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    if eigenvalues is None:
        eigenvalues = np.geomspace(0.5, 50.0, dim)
    return (q * eigenvalues) @ q.T


@partial(jax.jit, static_argnames=("maxiter",))
def _solve(a, b, rtol=1e-10, atol=0.0, maxiter=None, x0=None):
    matvec = lambda v: _tree(a @ _flat(v))
    return cg(matvec, b, x0=x0, rtol=rtol, atol=atol, maxiter=maxiter)


def test_solves_an_spd_system_on_a_pytree_and_reports_iterations():
    a = _spd(0)
    b_flat = np.random.default_rng(1).standard_normal(DIM)
    res = _solve(a, _tree(b_flat))
    assert isinstance(res, CGResult)
    assert jax.tree.structure(res.x) == jax.tree.structure(_tree(b_flat))
    want = np.linalg.solve(a, b_flat)
    np.testing.assert_allclose(_flat(res.x), want, rtol=1e-8, atol=1e-10)
    assert bool(res.converged)
    # At most DIM steps in exact arithmetic; a few more are allowed for rounding.
    assert 5 <= int(res.num_iters) <= DIM + 5
    true_residual = np.linalg.norm(b_flat - a @ _flat(res.x))
    assert float(res.residual_norm) <= 1e-10 * np.linalg.norm(b_flat)
    np.testing.assert_allclose(true_residual, float(res.residual_norm), atol=1e-12)
    # Same answer as jax's own solver, which cannot tell how many iterations it ran.
    x_jax, info = jax.scipy.sparse.linalg.cg(lambda v: a @ v, b_flat, tol=1e-12)
    assert info is None
    np.testing.assert_allclose(_flat(res.x), x_jax, rtol=1e-8)


def test_iteration_count_equals_the_number_of_distinct_eigenvalues():
    eigenvalues = np.repeat([1.0, 4.0, 9.0], [6, 6, 5])
    a = _spd(2, eigenvalues)
    b = _tree(np.random.default_rng(3).standard_normal(DIM))
    res = _solve(a, b)
    assert int(res.num_iters) == 3 and bool(res.converged)


def test_starting_point_maxiter_tolerances_and_zero_rhs():
    a = _spd(4)
    b_flat = np.random.default_rng(5).standard_normal(DIM)
    b = _tree(b_flat)
    x_star = _tree(np.linalg.solve(a, b_flat))
    res = _solve(a, b, x0=x_star)
    assert int(res.num_iters) == 0 and bool(res.converged)
    res = _solve(a, b, maxiter=2)
    assert int(res.num_iters) == 2 and not bool(res.converged)
    assert float(res.residual_norm) > 1e-10 * np.linalg.norm(b_flat)
    tight, loose = _solve(a, b, rtol=1e-10), _solve(a, b, rtol=1e-2)  # traced tolerances
    assert int(loose.num_iters) < int(tight.num_iters)
    assert float(loose.residual_norm) <= 1e-2 * np.linalg.norm(b_flat)
    by_atol = _solve(a, b, rtol=0.0, atol=1e-3)
    assert bool(by_atol.converged) and float(by_atol.residual_norm) <= 1e-3
    zero = _solve(a, _tree(np.zeros(DIM)))
    assert int(zero.num_iters) == 0 and bool(zero.converged)
    np.testing.assert_array_equal(_flat(zero.x), 0.0)


def test_indefinite_operator_stops_without_nan():
    a = _spd(6, np.linspace(-3.0, 5.0, DIM))
    res = _solve(a, _tree(np.ones(DIM)), maxiter=100)
    assert not bool(res.converged)
    assert np.all(np.isfinite(_flat(res.x))) and np.isfinite(float(res.residual_norm))
    assert int(res.num_iters) < 100


def test_vmap_over_right_hand_sides_and_float32():
    a = _spd(7)
    bs = np.random.default_rng(8).standard_normal((4, DIM))
    res = jax.jit(jax.vmap(lambda b: cg(lambda v: _tree(a @ _flat(v)), _tree(b), rtol=1e-10)))(bs)
    assert res.num_iters.shape == (4,) and bool(jnp.all(res.converged))
    xs = jax.vmap(_flat)(res.x)
    np.testing.assert_allclose(xs, np.linalg.solve(a, bs.T).T, rtol=1e-8, atol=1e-10)
    a32 = jnp.asarray(a, jnp.float32)
    res32 = cg(lambda v: a32 @ v, jnp.asarray(bs[0], jnp.float32), rtol=1e-5)
    assert res32.x.dtype == jnp.float32 and bool(res32.converged)
    np.testing.assert_allclose(res32.x, np.linalg.solve(a, bs[0]), rtol=1e-3, atol=1e-4)


def test_bad_inputs_raise_naming_the_argument():
    b = _tree(np.ones(DIM))
    mv = lambda v: v
    with pytest.raises(TypeError, match=r"b\['w'\] has dtype int32"):
        cg(mv, {"w": jnp.ones((3, 4), jnp.int32)})
    with pytest.raises(ValueError, match="x0 must have the same pytree structure as b"):
        cg(mv, b, x0={"w": jnp.zeros((3, 4))})
    with pytest.raises(ValueError, match=r"x0\['w'\] has shape \(4, 3\) but b has shape \(3, 4\)"):
        cg(mv, b, x0={"w": jnp.zeros((4, 3)), "b": jnp.zeros(5)})
    with pytest.raises(ValueError, match=r"rtol must lie in \[0.0, inf\], got -1.0"):
        cg(mv, b, rtol=-1.0)
    with pytest.raises(ValueError, match=r"atol must lie in \[0.0, inf\], got -0.001"):
        cg(mv, b, atol=-1e-3)
    with pytest.raises(ValueError, match="maxiter must be a positive integer, got 0"):
        cg(mv, b, maxiter=0)
