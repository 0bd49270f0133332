"""jit, vmap (frozen members) and implicit differentiation of solutions (both modes)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt2.solvers import least_squares, minimize

pytestmark = pytest.mark.timeout(240)

BATCH = 64


def _shifted_rosenbrock(x, a):
    # Minimum at (a, a²); members with different `a` and starts need different step counts.
    return (a - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


@functools.partial(jax.jit, static_argnames=("method",))
def _solve(x0, a, method):
    return minimize(_shifted_rosenbrock, x0, a, method=method, max_steps=200)


@functools.partial(jax.jit, static_argnames=("method",))
def _solve_batch(x0, a, method):
    return jax.vmap(lambda x, p: minimize(_shifted_rosenbrock, x, p, method=method, max_steps=200))(
        x0, a
    )


@pytest.mark.parametrize("method", ["newton", "trust_region", "newton_cg", "cubic"])
def test_vmap_over_64_problems_equals_64_separate_solves(method):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0.5, 1.5, BATCH))
    x0 = jnp.asarray(rng.uniform(-1.5, 1.5, (BATCH, 2)))
    batch = _solve_batch(x0, a, method)
    steps = np.asarray(batch.num_steps)
    assert np.all(np.asarray(batch.success))
    assert steps.min() < steps.max()  # members finish at different iterations
    for i in range(BATCH):
        one = _solve(x0[i], a[i], method)
        # A member that finished early is frozen: same iterate, same counts.
        assert int(one.num_steps) == steps[i]
        assert int(one.num_hessians) == int(batch.num_hessians[i])
        assert int(one.num_hvps) == int(batch.num_hvps[i])
        np.testing.assert_allclose(batch.x[i], one.x, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(batch.value[i], one.value, rtol=1e-10, atol=1e-16)
    np.testing.assert_allclose(batch.x, np.stack([a, a**2], axis=1), atol=1e-7)


def test_frozen_members_do_not_move_in_the_history():
    x0 = jnp.array([[0.9, 0.8], [-1.2, 1.0]])
    a = jnp.array([1.0, 1.0])

    def solve(x, p):
        return minimize(_shifted_rosenbrock, x, p, method="newton", history=True)

    sol, hist = jax.jit(jax.vmap(solve))(x0, a)
    k0, k1 = int(sol.num_steps[0]), int(sol.num_steps[1])
    assert k0 < k1
    # Past its last step the first member records nothing (NaN) while the second goes on.
    assert np.all(np.isnan(np.asarray(hist.value[0, k0 + 1 :])))
    assert np.all(np.isfinite(np.asarray(hist.value[1, : k1 + 1])))


def test_jit_gives_the_eager_result():
    x0, a = jnp.array([-1.2, 1.0]), jnp.asarray(0.8)
    eager = minimize(_shifted_rosenbrock, x0, a, method="trust_region", max_steps=200)
    jitted = _solve(x0, a, "trust_region")
    assert int(eager.num_steps) == int(jitted.num_steps)
    np.testing.assert_allclose(eager.x, jitted.x, rtol=1e-13)


# --- implicit differentiation -------------------------------------------------------------

_RNG = np.random.default_rng(3)
_A = jnp.asarray(_RNG.standard_normal((12, 4)))


def _smooth_convex(x, c, lam):
    # Strictly convex in x for lam > 0; the minimizer depends nonlinearly on (c, lam).
    return jnp.sum(jax.nn.softplus(_A @ x)) + 0.5 * lam * jnp.sum(x**2) - c @ x


def _outer(c, lam, method):
    sol = minimize(_smooth_convex, jnp.zeros(4), c, lam, method=method, tol=1e-13)
    return jnp.sum(jnp.sin(sol.x)) + 0.3 * sol.value


@pytest.mark.parametrize("method", ["newton", "trust_region", "newton_cg", "cubic"])
def test_implicit_gradient_matches_finite_differences(method):
    c = jnp.asarray(_RNG.standard_normal(4))
    lam = jnp.asarray(0.7)
    outer = jax.jit(functools.partial(_outer, method=method))
    gc, glam = jax.jit(jax.grad(functools.partial(_outer, method=method), argnums=(0, 1)))(c, lam)
    h = 1e-5
    fd_c = np.array([(outer(c + h * e, lam) - outer(c - h * e, lam)) / (2 * h) for e in np.eye(4)])
    fd_lam = (outer(c, lam + h) - outer(c, lam - h)) / (2 * h)
    np.testing.assert_allclose(gc, fd_c, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(glam, fd_lam, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["newton", "newton_cg"])
def test_forward_mode_through_a_solution_equals_reverse_mode(method):
    """jax.jvp / jax.jacfwd of a solution (dense and CG solves) equal jax.grad and finite
    differences: x*(c, λ) and f*(c, λ) as functions of both arguments."""
    c = jnp.asarray(_RNG.standard_normal(4))
    lam = jnp.asarray(0.7)

    def solution(c, lam):
        sol = minimize(_smooth_convex, jnp.zeros(4), c, lam, method=method, tol=1e-13)
        return sol.x, sol.value

    # jacfwd / jacrev with two arguments: (dx/dc, dx/dλ), (df*/dc, df*/dλ).
    (x_c, x_lam), (v_c, v_lam) = jax.jit(jax.jacfwd(solution, argnums=(0, 1)))(c, lam)
    (rx_c, rx_lam), (rv_c, rv_lam) = jax.jit(jax.jacrev(solution, argnums=(0, 1)))(c, lam)
    for fwd, rev in [(x_c, rx_c), (x_lam, rx_lam), (v_c, rv_c), (v_lam, rv_lam)]:
        np.testing.assert_allclose(fwd, rev, rtol=1e-10, atol=1e-12)
    f = jax.jit(solution)
    h = 1e-5
    fd_x = np.stack(
        [(f(c + h * e, lam)[0] - f(c - h * e, lam)[0]) / (2 * h) for e in np.eye(4)], axis=1
    )
    np.testing.assert_allclose(x_c, fd_x, rtol=1e-6, atol=1e-9)
    fd_x_lam = (f(c, lam + h)[0] - f(c, lam - h)[0]) / (2 * h)
    np.testing.assert_allclose(x_lam, fd_x_lam, rtol=1e-6, atol=1e-9)
    fd_value = (f(c, lam + h)[1] - f(c, lam - h)[1]) / (2 * h)
    np.testing.assert_allclose(v_lam, fd_value, rtol=1e-6, atol=1e-9)
    # The envelope theorem: df*/dc = ∂f/∂c = -x*, df*/dλ = ½‖x*‖².
    x_star = f(c, lam)[0]
    np.testing.assert_allclose(v_c, -x_star, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(v_lam, 0.5 * jnp.sum(x_star**2), rtol=1e-9)


def test_implicit_gradient_of_a_least_squares_fit():
    t = jnp.linspace(0.0, 2.0, 15)

    def residual(p, y):
        return p[0] * jnp.exp(-p[1] * t) - y

    def outer(y):
        sol = least_squares(residual, jnp.array([1.0, 1.0]), y, tol=1e-13)
        return sol.x[0] * sol.x[1]

    y = 2.0 * jnp.exp(-1.3 * t) + 0.05 * jnp.asarray(np.random.default_rng(1).standard_normal(15))
    g = jax.jit(jax.grad(outer))(y)
    f = jax.jit(outer)
    h = 1e-6
    fd = np.array([(f(y + h * e) - f(y - h * e)) / (2 * h) for e in np.eye(15)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
    # Forward mode: one JVP along a direction equals the gradient's inner product with it.
    u = jnp.asarray(np.random.default_rng(2).standard_normal(15))
    _, along = jax.jvp(outer, (y,), (u,))
    np.testing.assert_allclose(along, g @ u, rtol=1e-9)


@pytest.mark.parametrize("method", ["newton", "trust_region", "newton_cg", "cubic", "saddle_free"])
def test_tolerance_below_the_rounding_level_of_the_value_is_reached(method):
    # f ≈ 7.9 here, so the last Newton steps change f by less than its rounding error; the
    # solvers must still drive ‖∇f‖ to 1e-13 (this start once stalled at 1e-9).
    c = jnp.asarray(np.random.default_rng(3).standard_normal((13, 4))[12])
    c = c + 1e-5 * jnp.eye(4)[1]
    sol = minimize(_smooth_convex, jnp.zeros(4), c, jnp.asarray(0.7), method=method, tol=1e-13)
    assert bool(sol.success) and float(sol.grad_norm) <= 1e-13
