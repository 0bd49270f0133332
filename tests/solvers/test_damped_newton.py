"""damped_newton: the O(k⁻³) Root/Universal Newton schedule (default) and AICN.

Root Newton is checked against a naive numpy implementation of the paper's iteration (same
iterates), its step against the regularized model it minimizes, the descent lemma its
analysis rests on along the whole run, and the paper's global bound; AICN against its
cubic-model recursion bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from jaxopt2.solvers import minimize
from jaxopt2.solvers._newton import aicn_step_size, root_newton_regularization

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
        schedule="aicn",
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


@pytest.mark.parametrize(("schedule", "order"), [("root", 5 / 3), ("aicn", 2.0)])
def test_adaptive_constant_needs_far_fewer_steps_and_converges_superlinearly(schedule, order):
    """Backtracked constants: a handful of steps from the far start, then the local rate:
    quadratic for AICN (1 - α = O(G)); order 1 + (q-2)/(q-1) = 5/3 for Root Newton with
    q = 4 (1 - α = O(G^{2/3}), the paper's local superlinear rate)."""
    a, s, mu = jnp.asarray(_A), jnp.asarray(_S), jnp.asarray(_MU)
    sol, hist = minimize(
        _logistic,
        jnp.full((_D,), 20.0),
        a,
        s,
        mu,
        method="damped_newton",
        schedule=schedule,
        history=True,
    )
    assert bool(sol.success) and int(sol.num_steps) <= 12
    k = int(sol.num_steps)
    g = np.asarray(hist.grad_norm[: k + 1])
    assert g[-1] <= 10 * g[-2] ** order + 1e-15
    assert g[-1] > 1e-3 * g[-2] ** 2 or schedule == "aicn"  # Root Newton is not quadratic


# ----------------------------------------------------------------------------- Root Newton


def _third_order_constant():
    """M₄: a Lipschitz constant of ∇³f in the local norms, from bounds.

    The fourth derivative of softplus is σ⁽³⁾ (σ the sigmoid) with |σ⁽³⁾| <= 1/8, so
    |∇⁴f[h,h,h,h]| <= (1/8n) Σ (aᵢᵀh)⁴ <= max‖aᵢ‖² ‖A‖² / (8n) ‖h‖⁴ =: L_E ‖h‖⁴. With
    ‖h‖ₓ >= √μ ‖h‖ everywhere, the operator norm of ∇³f(x) - ∇³f(y) in local norms is at
    most μ^{-3/2} L_E ‖x - y‖ <= μ^{-2} L_E ‖x - y‖ₓ.
    """
    norm_a = np.linalg.norm(_A, 2)
    return np.max(np.linalg.norm(_A, axis=1)) ** 2 * norm_a**2 / (8 * _N) / _MU**2


def _np_derivatives(x):
    z = -_S * (_A @ x)
    p = 1 / (1 + np.exp(-z))  # σ(z)
    f = np.mean(np.logaddexp(0, z)) + 0.5 * _MU * x @ x
    g = _A.T @ (-_S * p) / _N + _MU * x
    h = (_A.T * (p * (1 - p))) @ _A / _N + _MU * np.eye(_D)
    return f, g, h


def _dual_sq(g, h):
    return float(g @ np.linalg.solve(h, g))


def _np_root_newton(x0, smoothness, steps):
    """The paper's Root Newton iteration written out in numpy: iterates, θ_k, Hessians."""
    xs, thetas, hs = [np.asarray(x0, float)], [], []
    for _ in range(steps):
        _, g, h = _np_derivatives(xs[-1])
        n = np.linalg.solve(h, g)
        theta = (9 * smoothness) ** (1 / 3) * np.sqrt(g @ n) ** (2 / 3)
        xs.append(xs[-1] - n / (1 + theta))
        thetas.append(theta)
        hs.append(h)
    return np.array(xs), np.array(thetas), hs


def test_root_newton_regularization_is_the_papers_formula():
    for m, q, g in [(1.0, 4.0, 1.0), (3.0, 4.0, 0.2), (2.0, 3.0, 5.0), (0.5, 2.0, 7.0)]:
        expected = (9 * m) ** (1 / (q - 1)) * g ** ((q - 2) / (q - 1))
        np.testing.assert_allclose(float(root_newton_regularization(m, q, g)), expected)


def test_root_newton_step_minimizes_the_regularized_local_model():
    """α = 1/(1+θ) on the Newton direction minimizes, over all steps d,
    gᵀd + ½‖d‖ₓ² + σ/(2+β) ‖d‖ₓ^{2+β} with σ = θ / (αG)^β (the paper's duality)."""
    x = np.array([1.0, -2.0, 0.5, 3.0])
    _, g, h = _np_derivatives(x)
    gdec = np.sqrt(_dual_sq(g, h))
    beta = 2 / 3
    theta = float(root_newton_regularization(0.7, 4.0, gdec))
    alpha = 1 / (1 + theta)
    sigma = theta / (alpha * gdec) ** beta

    def model(d):
        nrm = np.sqrt(d @ h @ d)
        return g @ d + 0.5 * nrm**2 + sigma / (2 + beta) * nrm ** (2 + beta)

    ref = scipy.optimize.minimize(model, np.zeros(_D), method="BFGS", options={"gtol": 1e-12})
    np.testing.assert_allclose(-alpha * np.linalg.solve(h, g), ref.x, rtol=1e-5, atol=1e-7)


def test_root_newton_from_a_far_start_follows_the_paper(record_property):
    """With a valid M₄: the iterates are the numpy reference's; every step satisfies the
    descent lemma f(x_k) - f(x_{k+1}) >= ‖∇f(x_{k+1})‖*²_{x_k} / (2θ_k); the gap stays under
    Theorem 4's bound 9M D (4D(q-1)/(γk))^{q-1} + G₀ D e^{-k/4}; the slope is reported."""
    a, s, mu = jnp.asarray(_A), jnp.asarray(_S), jnp.asarray(_MU)
    f_star = float(minimize(_logistic, jnp.zeros(_D), a, s, mu, tol=1e-13).value)
    m4 = _third_order_constant()
    x0 = np.full(_D, 20.0)
    sol, hist = minimize(
        _logistic,
        jnp.asarray(x0),
        a,
        s,
        mu,
        method="damped_newton",
        smoothness=m4,
        max_steps=300,
        history=True,
    )
    assert bool(sol.success)
    k = int(sol.num_steps)
    assert np.all(np.asarray(hist.accepted[1 : k + 1]))  # M₄ is valid: nothing rejected
    xs, thetas, hs = _np_root_newton(x0, m4, k)
    values = np.array([_np_derivatives(x)[0] for x in xs])
    np.testing.assert_allclose(np.asarray(hist.value[: k + 1]), values, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(hist.step_size[1 : k + 1]), 1 / (1 + thetas), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(sol.x), xs[-1], rtol=1e-8, atol=1e-10)
    # The descent lemma, step by step (dual local norm at x_k).
    grads = [_np_derivatives(x)[1] for x in xs]
    dual = np.array([_dual_sq(gn, h) for gn, h in zip(grads[1:], hs, strict=True)])
    drop = values[:-1] - values[1:]
    assert np.all(drop >= dual / (2 * thetas) * (1 - 1e-9))
    # Theorem 4's bound. D: the level set of x0 lies in ‖x - x*‖² <= 2 gap0 / μ and local
    # norms are at most √λ_max ‖·‖. γ (how much the dual local norm of ∇f(x_{k+1}) changes
    # between x_k and x_{k+1}) is measured along the run: the smaller of both ratios.
    gap = values - f_star
    _, lam_max = _constants()
    radius = np.sqrt(lam_max * 2 * gap[0] / _MU)
    own = np.array([_dual_sq(gn, _np_derivatives(x)[2]) for gn, x in zip(grads, xs, strict=True)])
    live = own[1:] > 0
    ratio = np.sqrt(dual[live] / own[1:][live])
    gamma = float(min(ratio.min(), (1 / ratio).min()))
    steps = np.arange(1, k + 1)
    bound = 9 * m4 * radius * (4 * radius * 3 / (gamma * steps)) ** 3 + np.sqrt(
        own[0]
    ) * radius * np.exp(-steps / 4)
    assert np.all(gap[1:] <= bound)
    glob = steps[np.asarray(hist.step_size[1 : k + 1]) < 0.5]
    slope = np.polyfit(np.log(glob), np.log(gap[glob]), 1)[0]
    record_property("gap_loglog_slope", float(slope))
    margin = float(np.min(bound / np.maximum(gap[1:], 1e-300)))
    record_property("theorem4_bound_over_gap_min", margin)
    record_property("gamma", gamma)
    assert slope < 0


def test_universal_newton_backtracking_meets_the_descent_condition_at_every_step():
    """Without M: σ is backtracked; each accepted step lies on the Newton ray, satisfies
    2αθ ∇f(z)ᵀn >= ‖∇f(z)‖*²ₓ and lowers f."""
    a, s, mu = jnp.asarray(_A), jnp.asarray(_S), jnp.asarray(_MU)
    x = np.full(_D, 20.0)
    for _ in range(4):  # one iteration at a time, checked in numpy
        sol = minimize(_logistic, jnp.asarray(x), a, s, mu, method="damped_newton", max_steps=1)
        z = np.asarray(sol.x)
        f, g, h = _np_derivatives(x)
        fz, gz, _ = _np_derivatives(z)
        n = np.linalg.solve(h, g)
        alpha = float(np.dot(x - z, n) / np.dot(n, n))
        np.testing.assert_allclose(x - alpha * n, z, rtol=1e-12, atol=1e-12)
        theta = 1 / alpha - 1
        assert 2 * alpha * theta * gz @ n >= _dual_sq(gz, h) * (1 - 1e-12)
        assert fz < f
        x = z


def test_damped_newton_options_belong_to_their_schedule():
    f = lambda x: jnp.sum(x**2)
    with pytest.raises(TypeError, match=r"\['lipschitz'\] belong to schedule='aicn'"):
        minimize(f, jnp.ones(2), method="damped_newton", lipschitz=1.0)
    with pytest.raises(ValueError, match="damped_newton order must be in"):
        minimize(f, jnp.ones(2), method="damped_newton", order=5.0)
    with pytest.raises(ValueError, match="damped_newton schedule must be 'root' or 'aicn'"):
        minimize(f, jnp.ones(2), method="damped_newton", schedule="rn")
