"""``has_aux`` on minimize and least_squares: the function returns ``(value, aux)``; the
solution is the one without aux, and ``solution.aux`` is aux at the solution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt2.solvers import least_squares, minimize


def _rosen(x, scale):
    return (1 - x[0]) ** 2 + scale * (x[1] - x[0] ** 2) ** 2


def _rosen_aux(x, scale):
    return _rosen(x, scale), {"x_sum": jnp.sum(x), "scale": scale}


def _residuals(x, t):
    return x[0] * jnp.exp(x[1] * t) - jnp.exp(0.5 * t) * 2.0


def _residuals_aux(x, t):
    r = _residuals(x, t)
    return r, r**2


X0 = jnp.array([-1.2, 1.0])
T = jnp.linspace(0.0, 1.0, 8)


@pytest.mark.parametrize("method", ["newton", "trust_region", "newton_cg"])
def test_minimize_aux_at_the_solution_and_the_same_solve(method):
    plain = minimize(_rosen, X0, 100.0, method=method)
    sol = minimize(_rosen_aux, X0, 100.0, method=method, has_aux=True)
    assert plain.aux is None
    for a, b in zip(plain[:-1], sol[:-1], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(sol.aux["x_sum"], jnp.sum(sol.x), rtol=1e-6)
    assert float(sol.aux["scale"]) == 100.0


def test_minimize_has_aux_under_jit_vmap_and_with_history():
    solve = jax.jit(lambda x0: minimize(_rosen_aux, x0, 100.0, has_aux=True))
    sol = solve(X0)
    np.testing.assert_allclose(sol.aux["x_sum"], jnp.sum(sol.x), rtol=1e-6)
    batch = jax.vmap(lambda x0: minimize(_rosen_aux, x0, 100.0, has_aux=True))(
        jnp.stack([X0, X0 + 0.1])
    )
    assert batch.aux["x_sum"].shape == (2,)
    sol_h, hist = minimize(_rosen_aux, X0, 100.0, has_aux=True, history=True)
    np.testing.assert_array_equal(sol_h.x, minimize(_rosen, X0, 100.0).x)
    assert hist.value.shape[0] == 101


def test_minimize_aux_is_differentiable_through_the_solution():
    """d aux / d scale goes through x*(scale) (implicit) like any function of the solution."""

    def via_aux(scale):
        return minimize(_rosen_aux, X0, scale, has_aux=True).aux["x_sum"]

    def via_x(scale):
        return jnp.sum(minimize(_rosen, X0, scale).x)

    np.testing.assert_allclose(jax.grad(via_aux)(100.0), jax.grad(via_x)(100.0), atol=1e-6)


def test_minimize_has_aux_needs_a_pair():
    with pytest.raises(TypeError, match=r"has_aux=True.*pair \(value, aux\)"):
        minimize(_rosen, X0, 100.0, has_aux=True)


@pytest.mark.parametrize("method", ["levenberg_marquardt", "gauss_newton"])
def test_least_squares_aux(method):
    x0 = jnp.array([1.0, 0.0])
    plain = least_squares(_residuals, x0, T, method=method)
    sol = jax.jit(lambda x0: least_squares(_residuals_aux, x0, T, method=method, has_aux=True))(x0)
    assert plain.aux is None
    for a, b in zip(plain[:-1], sol[:-1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sol.aux, _residuals(sol.x, T) ** 2, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="residual_fn must return a pair"):
        least_squares(_residuals, x0, T, has_aux=True)
