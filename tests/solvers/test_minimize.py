"""minimize: convergence against scipy / scikit-learn references, counts, statuses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from jaxopt2.solvers import (
    CONVERGED,
    NONFINITE,
    STATUS,
    minimize,
    status_message,
)

from .problems import MINIMIZE_METHODS, breast_cancer, logistic_objective, rosenbrock

pytestmark = pytest.mark.timeout(240)


@functools.partial(jax.jit, static_argnames=("method", "history", "max_steps"))
def _logistic(a, s, method, history=False, max_steps=100):
    w0 = jnp.zeros(a.shape[1], a.dtype)
    return minimize(
        logistic_objective, w0, a, s, method=method, history=history, max_steps=max_steps
    )


@pytest.fixture(scope="module")
def logistic_solutions():
    a, s, w_ref = breast_cancer()
    sols = {m: _logistic(jnp.asarray(a), jnp.asarray(s), m) for m in MINIMIZE_METHODS}
    return a, s, w_ref, sols


def test_newton_solves_a_strictly_convex_quadratic_in_one_step():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    h = (q * np.geomspace(0.1, 100.0, 6)) @ q.T
    b = rng.standard_normal(6)
    fun = lambda x: 0.5 * x @ h @ x - b @ x
    sol = minimize(fun, jnp.zeros(6))
    assert int(sol.num_steps) == 1 and int(sol.num_hessians) == 1 and bool(sol.success)
    np.testing.assert_allclose(sol.x, np.linalg.solve(h, b), rtol=1e-12, atol=1e-13)


def test_scikit_learn_reference_is_converged():
    a, s, w_ref = breast_cancer()
    g = jax.grad(logistic_objective)(jnp.asarray(w_ref), jnp.asarray(a), jnp.asarray(s))
    assert float(jnp.linalg.norm(g)) <= 1e-12


@pytest.mark.parametrize("method", MINIMIZE_METHODS)
def test_logistic_regression_matches_scikit_learn(logistic_solutions, method):
    _, _, w_ref, sols = logistic_solutions
    sol = sols[method]
    assert int(sol.status) == CONVERGED, status_message(sol.status)
    assert float(sol.grad_norm) <= 1e-8
    rel = np.linalg.norm(np.asarray(sol.x) - w_ref) / np.linalg.norm(w_ref)
    assert rel <= 1e-6
    if method == "newton_cg":
        assert int(sol.num_hessians) == 0 and int(sol.num_hvps) > 0
    else:
        assert int(sol.num_hvps) == 0 and 1 <= int(sol.num_hessians) <= int(sol.num_steps)


def test_lazy_newton_needs_fewer_hessians_than_newton(logistic_solutions):
    *_, sols = logistic_solutions
    lazy, newton = sols["lazy_newton"], sols["newton"]
    assert bool(lazy.success) and bool(newton.success)
    assert int(lazy.num_hessians) < int(newton.num_hessians)
    # One Hessian per `hessian_every` = 5 iterations, the first one included.
    assert int(lazy.num_hessians) == -(-int(lazy.num_steps) // 5)


def test_trust_region_on_rosenbrock_needs_no_more_iterations_than_scipy_trust_exact():
    x0 = np.array([-1.2, 1.0])
    ref = scipy.optimize.minimize(
        scipy.optimize.rosen,
        x0,
        jac=scipy.optimize.rosen_der,
        hess=scipy.optimize.rosen_hess,
        method="trust-exact",
        options={"gtol": 1e-8},
    )
    assert ref.success and ref.nit == 25  # 25 iterations on scipy 1.11-1.17
    sol = minimize(rosenbrock, jnp.asarray(x0), method="trust_region", tol=1e-8)
    assert bool(sol.success)
    assert int(sol.num_steps) <= ref.nit
    np.testing.assert_allclose(sol.x, [1.0, 1.0], rtol=0, atol=1e-8)
    assert float(sol.value) <= 1e-16
    # Rejected steps reuse the Hessian: fewer Hessians than iterations.
    assert int(sol.num_hessians) < int(sol.num_steps)


@pytest.mark.parametrize("method", MINIMIZE_METHODS)
def test_rosenbrock_every_method(method):
    sol = minimize(rosenbrock, jnp.array([-1.2, 1.0]), method=method)
    assert bool(sol.success), status_message(sol.status)
    np.testing.assert_allclose(sol.x, [1.0, 1.0], rtol=0, atol=1e-7)


def _saddle(x):
    # Saddle at 0; minima at (0, ±1/√2) with value -1/4.
    return x[0] ** 2 - x[1] ** 2 + x[1] ** 4


@pytest.mark.parametrize("method", MINIMIZE_METHODS)
def test_indefinite_hessian_never_gives_an_ascent_step(method):
    # Start where the Hessian diag(2, -2 + 12 y²) is indefinite.
    sol, hist = minimize(_saddle, jnp.array([0.7, 0.05]), method=method, history=True)
    k = int(sol.num_steps)
    values = np.asarray(hist.value[: k + 1])
    accepted = np.asarray(hist.accepted[1 : k + 1])
    trials = np.asarray(hist.trial_value[1 : k + 1])
    # Values never rise, except by rounding error once the predicted decrease is below it.
    rounding = 64 * np.finfo(np.float64).eps * np.abs(values[:-1])
    assert np.all(np.diff(values) <= rounding)
    assert np.all(trials[accepted] <= (values[:-1] + rounding)[accepted])
    # Before the rounding regime every accepted step strictly decreases the value.
    big = np.abs(np.diff(values)) > 1e-12
    assert np.all(np.diff(values)[big] < 0)
    assert bool(sol.success), status_message(sol.status)
    np.testing.assert_allclose(float(sol.value), -0.25, rtol=1e-12)
    np.testing.assert_allclose(np.abs(np.asarray(sol.x)), [0.0, 0.5**0.5], atol=1e-8)


@pytest.mark.parametrize("method", ["trust_region", "cubic"])
def test_exact_subproblems_leave_a_saddle_ridge_through_the_hard_case(method):
    # On y = 0 the gradient has no component along the negative-curvature direction: the
    # subproblems are in the hard case and must still step along it.
    sol = minimize(_saddle, jnp.array([0.5, 0.0]), method=method)
    assert bool(sol.success)
    np.testing.assert_allclose(float(sol.value), -0.25, rtol=1e-12)


def _nan_beyond_one(x):
    # Minimum at 3 lies in the region where the function is undefined.
    return jnp.where(x[0] < 1.0, jnp.sum((x - 3.0) ** 2), jnp.nan)


@pytest.mark.parametrize("method", MINIMIZE_METHODS)
def test_nonfinite_values_keep_the_last_finite_iterate(method):
    sol = minimize(_nan_beyond_one, jnp.array([0.0, 0.0]), method=method, max_steps=200)
    assert int(sol.status) == NONFINITE, status_message(sol.status)
    assert not bool(sol.success)
    assert float(sol.x[0]) < 1.0 and np.isfinite(float(sol.value))
    np.testing.assert_allclose(float(sol.value), float(_nan_beyond_one(sol.x)))
    assert float(sol.value) < float(_nan_beyond_one(jnp.zeros(2)))
    # It got to the edge of the region where the function is defined.
    assert float(sol.x[0]) > 0.99


def test_nonfinite_start_returns_x0_without_iterating():
    sol = minimize(_nan_beyond_one, jnp.array([2.0, 0.0]))
    assert int(sol.status) == NONFINITE and int(sol.num_steps) == 0
    np.testing.assert_array_equal(sol.x, [2.0, 0.0])


def test_max_steps_status_and_messages():
    sol = minimize(rosenbrock, jnp.array([-1.2, 1.0]), method="newton", max_steps=3)
    assert int(sol.num_steps) == 3 and not bool(sol.success)
    assert status_message(sol.status) == STATUS[int(sol.status)]
    assert "max_steps" in status_message(sol.status)
    assert set(STATUS) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="unknown status code 9"):
        status_message(9)


def test_pytree_variables_and_float32_default_tolerance():
    fun = lambda p: rosenbrock(jnp.stack([p["a"], p["b"][0]]))
    x0 = {"a": jnp.asarray(-1.2, jnp.float32), "b": jnp.array([1.0], jnp.float32)}
    sol = minimize(fun, x0, method="trust_region")
    assert jax.tree.structure(sol.x) == jax.tree.structure(x0)
    assert sol.x["a"].dtype == jnp.float32 and sol.value.dtype == jnp.float32
    assert bool(sol.success) and float(sol.grad_norm) <= 1e-5
    np.testing.assert_allclose([sol.x["a"], sol.x["b"][0]], [1.0, 1.0], atol=1e-4)


@pytest.mark.parametrize("cond", [1e4, 1e6])
@pytest.mark.parametrize("method", MINIMIZE_METHODS)
def test_ill_conditioned_quadratic(method, cond):
    # f sums terms ~cond·‖x‖² that cancel: value differences are rounding error long before
    # ‖∇f‖ reaches 1e-8 (newton_cg once stalled here at 3e-7).
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    h = (q * np.geomspace(1.0, cond, 20)) @ q.T
    b = rng.standard_normal(20)
    sol = minimize(lambda x: 0.5 * x @ h @ x - b @ x, jnp.zeros(20), method=method)
    assert bool(sol.success), status_message(sol.status)
    np.testing.assert_allclose(sol.x, np.linalg.solve(h, b), rtol=1e-6, atol=1e-7)


def test_an_eager_call_is_one_compiled_program_reused_for_the_same_function():
    """Outside jit, minimize runs as one compiled program cached on the function and the
    options (a second call compiles nothing); Python numbers among the extra arguments keep
    the plain path; both give the same solution."""
    import importlib  # (jaxopt2.solvers.minimize is the function; the module by its path)

    compiled = importlib.import_module("jaxopt2.solvers.minimize")._minimize_compiled
    f = lambda w, x, c: jnp.sum((x @ w - c) ** 2) + 0.1 * jnp.sum(w**4)
    x = jnp.arange(12.0).reshape(4, 3) / 10
    before = compiled._cache_size()
    first = minimize(f, jnp.zeros(3), x, jnp.asarray(1.0))
    assert compiled._cache_size() == before + 1
    again = minimize(f, jnp.ones(3), x, jnp.asarray(2.0))
    assert compiled._cache_size() == before + 1  # same function, shapes and options
    minimize(f, jnp.zeros(3), x, jnp.asarray(1.0), method="trust_region")
    assert compiled._cache_size() == before + 2  # another method: another program
    plain = minimize(f, jnp.zeros(3), x, 1.0)  # a Python number: not through the cache
    assert compiled._cache_size() == before + 2
    np.testing.assert_allclose(plain.x, first.x, rtol=1e-12)
    assert not np.allclose(again.x, first.x)


def test_newton_solves_nist_rat42_from_its_first_start():
    """CUTEst's RAT42LS (NIST StRD, Ratkowsky 1983): far from the solution the Hessian is
    indefinite by a sliver next to eigenvalues of ~10⁵. With the damping shift starting at
    10⁻³·max|Hᵢᵢ| line-search Newton crawled for 500 iterations; it now reaches NIST's
    certified values within 40."""
    x = jnp.array([9.0, 14.0, 21.0, 28.0, 42.0, 57.0, 63.0, 70.0, 79.0], jnp.float64)
    y = jnp.array([8.93, 10.80, 18.59, 22.33, 39.35, 56.11, 61.73, 64.62, 67.08], jnp.float64)

    def sse(b, x, y):
        return jnp.sum((b[0] / (1.0 + jnp.exp(b[1] - b[2] * x)) - y) ** 2)

    b0 = jnp.array([100.0, 1.0, 0.1], jnp.float64)
    tol = 1e-6 * float(jnp.linalg.norm(jax.grad(sse)(b0, x, y)))
    sol = minimize(sse, b0, x, y, method="newton", tol=tol, max_steps=40)
    assert bool(sol.success), (int(sol.num_steps), float(sol.grad_norm))
    certified = [72.462237576, 2.6180768402, 0.067359200066]  # NIST StRD, RAT42
    np.testing.assert_allclose(sol.x, certified, rtol=1e-6)
    np.testing.assert_allclose(sol.value, 8.0565229338, rtol=1e-8)


@pytest.mark.parametrize("problem", ["QING", "EGGCRATE"])
def test_newton_takes_steepest_descent_where_the_newton_line_search_fails(problem):
    """CUTEst's QING (n = 100, f = Σ (xᵢ² − i)², from xᵢ = 1) and EGGCRATE (f = x² + y² +
    25 (sin² x + sin² y), from (1, 2)): at an indefinite Hessian the damped Newton direction
    can be too long for the backtracking to find a decrease; `newton` stopped there (a
    failed line search after 2-3 iterations). It now takes a steepest-descent step instead
    and reaches a local minimum."""
    if problem == "QING":
        i = jnp.arange(1.0, 101.0, dtype=jnp.float64)
        fun = lambda x: jnp.sum((x**2 - i) ** 2)
        x0 = jnp.ones(100, jnp.float64)
    else:
        fun = lambda v: v[0] ** 2 + v[1] ** 2 + 25.0 * (jnp.sin(v[0]) ** 2 + jnp.sin(v[1]) ** 2)
        x0 = jnp.array([1.0, 2.0], jnp.float64)
    tol = 1e-6 * float(jnp.linalg.norm(jax.grad(fun)(x0)))
    sol = minimize(fun, x0, method="newton", tol=tol, max_steps=60)
    assert bool(sol.success), (int(sol.num_steps), int(sol.status), float(sol.grad_norm))
    assert float(jnp.linalg.norm(jax.grad(fun)(sol.x))) <= tol
    assert np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(fun))(sol.x))).min() > 0  # a minimum
    if problem == "QING":  # its minima: xᵢ = ±√i, f = 0
        np.testing.assert_allclose(np.abs(sol.x), np.sqrt(np.asarray(i)), rtol=1e-6)


def test_newton_cg_diagonal_preconditioner_pays_on_a_badly_scaled_problem():
    """Curvatures spread over six decades with a weak coupling between neighbours: plain
    Steihaug-CG needs many Hessian-vector products per step, Jacobi-preconditioned CG (the
    diagonal from 8 Hutchinson probes, counted) few; both reach the same minimizer, which
    scipy's trust-ncg confirms."""
    a = jnp.geomspace(1e-3, 1e3, 40)

    def fun(x):
        return jnp.sum(0.5 * a * (x - 1) ** 2 + 0.25 * a * (x - 1) ** 4) + 1e-3 * jnp.sum(
            (x[1:] - x[:-1]) ** 2
        )

    x0 = jnp.zeros(40)
    run = jax.jit(
        lambda x, pc: minimize(fun, x, method="newton_cg", preconditioner=pc, max_steps=300),
        static_argnums=1,
    )
    plain, pre = run(x0, None), run(x0, "diagonal")
    assert bool(plain.success) and bool(pre.success)
    # 130 against 480 products here
    assert int(pre.num_hvps) * 3 < int(plain.num_hvps), (int(pre.num_hvps), int(plain.num_hvps))
    g = jax.jit(jax.grad(fun))
    hvp = jax.jit(lambda x, v: jax.jvp(jax.grad(fun), (x,), (v,))[1])
    ref = scipy.optimize.minimize(
        lambda x: float(fun(jnp.asarray(x))), np.zeros(40), jac=lambda x: np.asarray(g(x)),
        hessp=lambda x, v: np.asarray(hvp(x, v)), method="trust-ncg", options={"gtol": 1e-9},
    )  # fmt: skip
    np.testing.assert_allclose(pre.x, ref.x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(plain.x, ref.x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"preconditioner": "jacobi"}, "newton_cg: unknown preconditioner 'jacobi'"),
        ({"preconditioner": "diagonal", "diagonal_probes": 0}, "diagonal_probes must be at"),
    ],
)
def test_newton_cg_preconditioner_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        minimize(lambda x: jnp.sum(x**2), jnp.ones(3), method="newton_cg", **options)
