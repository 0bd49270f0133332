"""least_squares against scipy.optimize.least_squares(method='lm'); input errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from jaxopt2.solvers import MINIMIZE_METHODS, least_squares, minimize

pytestmark = pytest.mark.timeout(120)

_T = np.linspace(0.0, 4.0, 25)
_Y = 3.0 * np.exp(-1.3 * _T) + 0.5 + 0.02 * np.random.default_rng(0).standard_normal(25)


def _decay(p, t, y):
    return p["amplitude"] * jnp.exp(-p["rate"] * t) + p["offset"] - y


@functools.cache
def _scipy_fit():
    def res(v):
        return v[0] * np.exp(-v[1] * _T) + v[2] - _Y

    def jac(v):
        e = np.exp(-v[1] * _T)
        return np.stack([e, -v[0] * _T * e, np.ones_like(_T)], axis=1)

    out = scipy.optimize.least_squares(
        res, [1.0, 0.5, 0.0], jac=jac, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
    )
    assert out.success
    # The reference is converged (scipy stops on ftol here with ‖Jᵀr‖ ≈ 6e-11, which puts
    # its x within ~1e-9 of the exact fit).
    assert np.linalg.norm(jac(out.x).T @ res(out.x)) <= 1e-10
    return out.x, 0.5 * np.sum(res(out.x) ** 2)


@pytest.mark.parametrize("method", ["gauss_newton", "levenberg_marquardt"])
def test_exponential_decay_fit_matches_scipy_lm(method):
    x_ref, cost_ref = _scipy_fit()
    x0 = {"amplitude": jnp.asarray(1.0), "rate": jnp.asarray(0.5), "offset": jnp.asarray(0.0)}
    sol = least_squares(_decay, x0, jnp.asarray(_T), jnp.asarray(_Y), method=method)
    assert bool(sol.success) and float(sol.grad_norm) <= 1e-8
    got = np.array([sol.x["amplitude"], sol.x["rate"], sol.x["offset"]])
    np.testing.assert_allclose(got, x_ref, rtol=1e-8)
    np.testing.assert_allclose(float(sol.value), cost_ref, rtol=1e-10)
    assert int(sol.num_hessians) <= int(sol.num_steps)  # Jacobian evaluations


def test_levenberg_marquardt_reuses_the_jacobian_after_a_rejected_step():
    # From far away LM rejects steps (damping grows) without new Jacobians.
    x0 = {"amplitude": jnp.asarray(10.0), "rate": jnp.asarray(5.0), "offset": jnp.asarray(-3.0)}
    sol, hist = least_squares(_decay, x0, jnp.asarray(_T), jnp.asarray(_Y), history=True)
    x_ref, _ = _scipy_fit()
    assert bool(sol.success)
    np.testing.assert_allclose(
        [sol.x["amplitude"], sol.x["rate"], sol.x["offset"]], x_ref, rtol=1e-8
    )
    k = int(sol.num_steps)
    rejected = int(k - np.sum(np.asarray(hist.accepted[1 : k + 1])))
    assert rejected > 0
    # One Jacobian at x0 and one after every accepted step but the last (which converged).
    assert int(sol.num_hessians) == k - rejected


# --- bad input ------------------------------------------------------------------------------


def test_minimize_rejects_a_residual_vector():
    with pytest.raises(ValueError, match=r"fun must return a scalar.*shape \(25,\).*least_squares"):
        minimize(lambda x: x[0] * _T - x[1], jnp.zeros(2))


def test_least_squares_rejects_a_scalar():
    with pytest.raises(
        ValueError, match=r"residual_fn must return a vector of residuals.*use minimize"
    ):
        least_squares(lambda x: jnp.sum(x**2), jnp.zeros(2))


@pytest.mark.parametrize("solver", [minimize, least_squares])
def test_integer_x0_is_rejected(solver):
    fun = (lambda x: jnp.sum(x**2.0)) if solver is minimize else (lambda x: x * 1.0)
    with pytest.raises(TypeError, match="x0 has dtype int32; the variables must be real floating"):
        solver(fun, jnp.array([1, 2], jnp.int32))


def test_unknown_method_lists_the_known_ones():
    known = ", ".join(MINIMIZE_METHODS)
    with pytest.raises(ValueError, match=f"unknown method 'bfgs'; known methods: {known}"):
        minimize(lambda x: jnp.sum(x**2), jnp.zeros(2), method="bfgs")
    with pytest.raises(
        ValueError,
        match="unknown method 'newton'; known methods: gauss_newton, levenberg_marquardt",
    ):
        least_squares(lambda x: x, jnp.zeros(2), method="newton")


def test_unknown_option_and_bad_max_steps():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['radius'\] for method 'newton'"):
        minimize(lambda x: jnp.sum(x**2), jnp.zeros(2), radius=2.0)
    with pytest.raises(ValueError, match="max_steps must be >= 0"):
        minimize(lambda x: jnp.sum(x**2), jnp.zeros(2), max_steps=-1)


def test_complex_or_integer_output_is_rejected():
    with pytest.raises(TypeError, match="fun must return floating-point values"):
        minimize(lambda x: jnp.sum(x > 0), jnp.zeros(2))


def test_errors_are_raised_at_trace_time_inside_jit():
    with pytest.raises(ValueError, match="use least_squares"):
        jax.jit(lambda x0: minimize(lambda x: x * 2.0, x0))(jnp.zeros(3))


def test_gauss_newton_takes_steepest_descent_where_its_line_search_fails():
    """CUTEst's POWELLSQ (Powell 1970: r = (x₁², 10x₁/(x₁ + 0.1) + 2x₂²), from (3, 1)): at
    x₂ → 0 the Jacobian's second column vanishes and the Gauss-Newton direction finds no
    decrease within the backtracks; gauss_newton stopped there after 24 iterations
    (‖Jᵀr‖ = 17.5). It now goes on along -Jᵀr and reaches the solution x₁ = 0."""

    def residual(v):
        return jnp.array([v[0] ** 2, 10.0 * v[0] / (v[0] + 0.1) + 2.0 * v[1] ** 2])

    x0 = jnp.array([3.0, 1.0], jnp.float64)
    f = lambda v: 0.5 * jnp.sum(residual(v) ** 2)
    tol = 1e-6 * float(jnp.linalg.norm(jax.grad(f)(x0)))
    sol = least_squares(residual, x0, method="gauss_newton", tol=tol, max_steps=200)
    assert bool(sol.success), (int(sol.num_steps), int(sol.status), float(sol.grad_norm))
    assert float(jnp.linalg.norm(jax.grad(f)(sol.x))) <= tol
    assert abs(float(sol.x[0])) < 1e-6 and float(f(sol.x)) < 1e-9
