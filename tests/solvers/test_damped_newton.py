"""damped_newton (AICN): the global bound from a far start, the step size, the local phase."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from jaxopt2.solvers import minimize
from jaxopt2.solvers.newton import aicn_step_size

pytestmark = pytest.mark.timeout(120)

_RNG = np.random.default_rng(0)
_N, _D, _MU = 60, 4, 0.05
_A = _RNG.standard_normal((_N, _D))
_S = np.sign(_RNG.standard_normal(_N))


def _logistic(x, a, s, mu):
    return jnp.mean(jax.nn.softplus(-s * (a @ x))) + 0.5 * mu * jnp.sum(x**2)


def _constants():
    """A semi-strong self-concordance constant L and the level-set radius D, from bounds.

    The Hessian is μI + (1/n) Aᵀ diag(σ'(Ax)) A. |σ''| <= 1/(6√3) makes it Lipschitz with
    L₂ = max‖aᵢ‖ ‖A‖² / (6√3 n); with ‖h‖ₓ >= √μ ‖h‖, the cubic bound
    |f(x+h) - f(x) - gᵀh - ½‖h‖ₓ²| <= (L₂/6)‖h‖³ <= (L/6)‖h‖ₓ³ holds with L = L₂ / μ^{3/2}.
    On the level set of x0, ‖x - x*‖² <= 2 (f(x0) - f*) / μ and ‖·‖ₓ² <= λ_max ‖·‖² with
    λ_max <= μ + ‖A‖² / (4n), so D = √(λ_max · 2 (f(x0) - f*) / μ).
    """
    norm_a = np.linalg.norm(_A, 2)
    l2 = np.max(np.linalg.norm(_A, axis=1)) * norm_a**2 / (6 * np.sqrt(3) * _N)
    lip = l2 / _MU**1.5
    lam_max = _MU + norm_a**2 / (4 * _N)
    return lip, lam_max


def _bound(gap0, lip, radius, steps):
    """u₀ = f(x0) - f*, u_{k+1} = min_{t∈[0,1]} (1-t) u_k + (L/3) t³ D³.

    AICN's step minimizes the cubic upper model over all directions (the model depends on h
    only through gᵀh and ‖h‖ₓ, and the Newton direction minimizes gᵀh on every sphere), so
    f(x_{k+1}) <= min_y f(y) + (L/3)‖y - x_k‖³ₓ; y = x_k + t(x* - x_k) and convexity give
    the recursion, which is O(L D³ / k²) (Hanzely et al. 2022, Theorem 2).
    """
    c = lip * radius**3
    u = [gap0]
    for _ in range(steps):
        t = min(1.0, np.sqrt(u[-1] / c))
        u.append((1 - t) * u[-1] + c / 3 * t**3)
    return np.array(u)


def test_aicn_step_size_minimizes_the_cubic_model_along_the_newton_direction():
    for lip, g in [(0.0, 1.0), (1.0, 1.0), (10.0, 0.3), (1e4, 2.0), (1e-6, 1e-3)]:
        model = lambda t: -t * g**2 + 0.5 * t**2 * g**2 + lip / 6 * t**3 * g**3
        ref = scipy.optimize.minimize_scalar(
            model, bounds=(0, 1), method="bounded", options={"xatol": 1e-12}
        )
        np.testing.assert_allclose(float(aicn_step_size(lip, g)), ref.x, rtol=1e-6, atol=1e-9)


def test_gap_from_a_far_start_stays_under_the_aicn_bound(record_property):
    a, s, mu = jnp.asarray(_A), jnp.asarray(_S), jnp.asarray(_MU)
    f_star = float(minimize(_logistic, jnp.zeros(_D), a, s, mu, tol=1e-13).value)
    x0 = jnp.full((_D,), 20.0)
    gap0 = float(_logistic(x0, a, s, mu)) - f_star
    lip, lam_max = _constants()
    radius = np.sqrt(lam_max * 2 * gap0 / _MU)
    sol, hist = minimize(
        _logistic,
        x0,
        a,
        s,
        mu,
        method="damped_newton",
        lipschitz=lip,
        max_steps=200,
        history=True,
    )
    assert bool(sol.success)
    k = int(sol.num_steps)
    gap = np.asarray(hist.value[: k + 1]) - f_star
    bound = _bound(gap0, lip, radius, k)
    assert np.all(gap <= bound + 1e-12)
    assert np.all(np.asarray(hist.accepted[1 : k + 1]))  # L is valid: no step is rejected
    # Step sizes grow from the damped global phase to 1 (pure Newton, local phase).
    steps = np.asarray(hist.step_size[1 : k + 1])
    assert steps[0] < 0.1 and steps[-1] > 0.99
    # Log-log slope of the gap over the global phase (step size < 1/2).
    glob = np.arange(1, k + 1)[steps < 0.5]
    slope = np.polyfit(np.log(glob), np.log(gap[glob]), 1)[0]
    bound_slope = np.polyfit(np.log(glob), np.log(bound[glob]), 1)[0]
    record_property("gap_loglog_slope", float(slope))
    record_property("bound_loglog_slope", float(bound_slope))
    assert slope <= -2.0  # at least as fast as O(1/k²) on this (strongly convex) problem


def test_adaptive_constant_needs_far_fewer_steps_and_converges_quadratically():
    a, s, mu = jnp.asarray(_A), jnp.asarray(_S), jnp.asarray(_MU)
    sol, hist = minimize(
        _logistic, jnp.full((_D,), 20.0), a, s, mu, method="damped_newton", history=True
    )
    assert bool(sol.success) and int(sol.num_steps) <= 12
    k = int(sol.num_steps)
    g = np.asarray(hist.grad_norm[: k + 1])
    # Local quadratic convergence: the last steps square the gradient norm (up to a constant).
    assert g[-1] <= 10 * g[-2] ** 2 + 1e-15
