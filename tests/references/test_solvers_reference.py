"""The Newton-type solvers of :func:`jaxopt2.solvers.minimize` against textbook rules and scipy.

``trust_region`` is compared step by step with a numpy float64 transcription of Nocedal &
Wright's Algorithm 4.1 with the radius rule the solver documents (the defaults of scipy's
``trust-exact``: ``ρ < 1/4`` quarters the radius, ``ρ > 3/4`` on the boundary doubles it up to
``max_radius``, the step is taken when ``ρ > η``), whose subproblem is solved exactly from the
eigendecomposition with a root-finder on the secular equation. scipy's ``trust-exact`` solves
the subproblem only approximately (to 10 % of the radius), so against it the comparison is the
pattern of accepted steps and the solution. ``newton_cg`` follows scipy's ``trust-ncg``
(Steihaug-Toint CG with the residual tolerance ``min(½, √‖g‖) ‖g‖``): the iterates agree to
rounding error. ``cubic`` (ARC, Cartis, Gould & Toint 2011) and ``lazy_newton`` (the same step
with a Hessian kept for ``hessian_every`` iterations) are compared with a numpy transcription
of the rules their docstrings state: the global minimizer of the cubic model from the secular
equation ``‖p(λ)‖ = λ/σ``, ``ρ >= η₂`` accepts and halves ``σ``, ``ρ >= η₁`` accepts,
otherwise ``σ`` doubles. ``newton`` (the Levenberg-Marquardt shift of Nocedal & Wright's
Algorithm 3.3 on the sequence ``0, β, 10β, ...``) and ``saddle_free`` (``-|H|⁻¹ g``) are
compared with a numpy transcription with the documented halving Armijo backtracking.
``least_squares``' Levenberg-Marquardt follows Madsen, Nielsen & Tingleff's Algorithm 3.16
(Nielsen's damping update, ``μ₀ = τ maxᵢ (JᵀJ)ᵢᵢ``) iteration by iteration.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so

from jaxopt2.solvers import minimize

pytestmark = pytest.mark.timeout(120)

X0 = np.array([-1.2, 1.0, -1.2, 1.0])  # the extended Rosenbrock function: indefinite early on
# From here the trust-region path has a rejected step with 0 < ρ <= η (iteration 2), a shrink
# after an interior step (iteration 7: a quarter of the radius, not of the step) and growths.
X1 = (2.0, -1.0, 0.5, 1.0)


def _rosen(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


@functools.cache
def _solve(method, start=tuple(X0), max_steps=60):
    run = jax.jit(lambda x: minimize(_rosen, x, method=method, max_steps=max_steps, history=True))
    sol, hist = run(jnp.asarray(start))
    return sol, jax.tree.map(np.asarray, hist)


def _exact_subproblem(g, h, radius):
    """``min gᵀp + ½ pᵀHp`` over ``‖p‖ <= radius``: ``(p, on_boundary)`` (no hard case here)."""
    w, v = np.linalg.eigh(h)
    a = v.T @ g
    if w[0] > 0:
        p = -v @ (a / w)
        if np.linalg.norm(p) <= radius:
            return p, False
    norm = lambda lam: np.linalg.norm(a / (w + lam))
    lo = max(0.0, -w[0])
    hi = lo + np.linalg.norm(g) / radius + 1.0
    while norm(hi) > radius:
        hi *= 2
    lo_eval = lo + 1e-12 * (1 + lo)
    assert norm(lo_eval) > radius, "hard case: not on this path"
    lam = so.brentq(lambda s: 1 / radius - 1 / norm(s), lo_eval, hi, xtol=1e-15, rtol=1e-15)
    return -v @ (a / (w + lam)), True


def reference_trust_region(x0, steps, radius=1.0, max_radius=1000.0, eta=0.15):
    """Per iteration: ``(trial value, accepted, value after)``; Algorithm 4.1."""
    x = np.array(x0)
    out = []
    for _ in range(steps):
        f, g, h = so.rosen(x), so.rosen_der(x), so.rosen_hess(x)
        p, boundary = _exact_subproblem(g, h, radius)
        predicted = -(g @ p + 0.5 * p @ h @ p)
        trial = so.rosen(x + p)
        rho = (f - trial) / predicted
        if rho < 0.25:
            radius = 0.25 * radius
        elif rho > 0.75 and boundary:
            radius = min(2 * radius, max_radius)
        accepted = rho > eta
        if accepted:
            x = x + p
        out.append((trial, accepted, so.rosen(x)))
    return out


@pytest.mark.parametrize("start", [tuple(X0), X1], ids=["x0", "x1"])
def test_trust_region_steps_follow_algorithm_4_1(start):
    """The first 12 iterations (rejections, shrinks and growths among them; the last ones
    still far from the rounding regime): trial values, acceptances and values."""
    steps = 12
    want = reference_trust_region(start, steps)
    _, hist = _solve("trust_region", start)
    trial, accepted, value = (np.array(c) for c in zip(*want, strict=True))
    assert (~accepted).sum() >= 2 and accepted.sum() >= 4
    np.testing.assert_array_equal(hist.accepted[1 : steps + 1], accepted)
    np.testing.assert_allclose(hist.trial_value[1 : steps + 1], trial, rtol=1e-9)
    np.testing.assert_allclose(hist.value[1 : steps + 1], value, rtol=1e-9)


def test_trust_region_accepts_where_scipy_trust_exact_does_and_ends_at_its_solution():
    sol, hist = _solve("trust_region")
    values = []
    res = so.minimize(
        so.rosen, X0, method="trust-exact", jac=so.rosen_der, hess=so.rosen_hess,
        callback=lambda xk: values.append(so.rosen(xk)), options={"gtol": 1e-8, "maxiter": 60},
    )  # fmt: skip
    rejected = lambda v: np.flatnonzero(np.diff(np.concatenate([[so.rosen(X0)], v])) == 0)
    n = int(sol.num_steps)
    np.testing.assert_array_equal(rejected(hist.value[1 : n + 1])[:3], rejected(values)[:3])
    assert abs(n - res.nit) <= 2
    np.testing.assert_allclose(np.asarray(sol.x), res.x, atol=1e-8)


def test_newton_cg_iterates_match_scipy_trust_ncg():
    """Every iteration of the 49 Rosenbrock needs: the values of the iterates agree."""
    sol, hist = _solve("newton_cg")
    values = []
    res = so.minimize(
        so.rosen, X0, method="trust-ncg", jac=so.rosen_der, hessp=so.rosen_hess_prod,
        callback=lambda xk: values.append(so.rosen(xk)), options={"gtol": 1e-8, "maxiter": 60},
    )  # fmt: skip
    n = int(sol.num_steps)
    assert n == res.nit and n > 40
    big = np.array(values) > 1e-6
    np.testing.assert_allclose(hist.value[1 : n + 1][big], np.array(values)[big], rtol=1e-8)
    np.testing.assert_allclose(np.asarray(sol.x), res.x, atol=1e-10)


def _cubic_subproblem(g, h, sigma):
    """The global minimizer of ``gᵀp + ½ pᵀHp + (σ/3)‖p‖³`` (no hard case here)."""
    w, v = np.linalg.eigh(h)
    a = v.T @ g
    gap = lambda lam: np.linalg.norm(a / (w + lam)) - lam / sigma
    lo = max(0.0, -w[0])
    lo_eval = lo + 1e-12 * (1 + lo)
    assert gap(lo_eval) > 0, "hard case: not on this path"
    hi = lo + 1.0
    while gap(hi) > 0:
        hi *= 2
    lam = so.brentq(gap, lo_eval, hi, xtol=1e-15, rtol=1e-15)
    return -v @ (a / (w + lam))


def reference_cubic(steps, hessian_every=1, sigma=1.0, eta1=0.1, eta2=0.9, gamma=2.0):
    """Per iteration: ``(trial value, accepted, value after)``."""
    x = X0.copy()
    out = []
    for k in range(steps):
        f, g = so.rosen(x), so.rosen_der(x)
        if k % hessian_every == 0:
            h = so.rosen_hess(x)
        p = _cubic_subproblem(g, h, sigma)
        predicted = -(g @ p + 0.5 * p @ h @ p) - sigma / 3 * np.linalg.norm(p) ** 3
        trial = so.rosen(x + p)
        rho = (f - trial) / predicted
        accepted = rho >= eta1
        if rho >= eta2:
            sigma = max(sigma / gamma, 1e-10)
        elif not accepted:
            sigma = gamma * sigma
        if accepted:
            x = x + p
        out.append((trial, accepted, so.rosen(x)))
    return out


@pytest.mark.parametrize("method, every", [("cubic", 1), ("lazy_newton", 3)])
def test_cubic_steps_follow_the_arc_rules(method, every):
    """The first 15 iterations: trial values, acceptances (rejections among them) and values;
    ``lazy_newton`` keeps each Hessian for three iterations, rejected ones included."""
    steps = 15
    want = reference_cubic(steps, hessian_every=every)
    opts = {"hessian_every": every} if method == "lazy_newton" else {}
    run = jax.jit(
        lambda x: minimize(_rosen, x, method=method, max_steps=steps, history=True, **opts)
    )
    hist = jax.tree.map(np.asarray, run(jnp.asarray(X0))[1])
    trial, accepted, value = (np.array(c) for c in zip(*want, strict=True))
    assert (~accepted).sum() >= 2 and accepted.sum() >= 5
    np.testing.assert_array_equal(hist.accepted[1:], accepted)
    np.testing.assert_allclose(hist.trial_value[1:], trial, rtol=1e-9)
    np.testing.assert_allclose(hist.value[1:], value, rtol=1e-9)


def _damped_newton_direction(g, h):
    """``-(H + τI)⁻¹ g``: τ = 0 if ``H`` has a Cholesky factor, else the first of ``β, 10β, ...``
    (``β = 10⁻¹² max|Hᵢᵢ|``, the library's documented start) that gives one."""
    tau, beta = 0.0, 1e-12 * np.max(np.abs(np.diag(h)))
    while True:
        try:
            np.linalg.cholesky(h + tau * np.eye(len(g)))
            break
        except np.linalg.LinAlgError:
            tau = beta if tau == 0 else 10 * tau
    return -np.linalg.solve(h + tau * np.eye(len(g)), g), tau


def _saddle_free_direction(g, h, damping=1e-8):
    w, v = np.linalg.eigh(h)
    aw = np.abs(w)
    return -v @ ((v.T @ g) / np.maximum(aw, damping * aw.max())), 0.0


def reference_line_search_newton(direction, steps, c1=1e-4):
    """Per iteration: ``(step size, value after, damped)``; halving from ``α = 1`` until
    ``f(x + αd) <= f(x) + c1 α gᵀd``."""
    x = X0.copy()
    out = []
    for _ in range(steps):
        f, g = so.rosen(x), so.rosen_der(x)
        d, tau = direction(g, so.rosen_hess(x))
        alpha = 1.0
        while so.rosen(x + alpha * d) > f + c1 * alpha * (g @ d):
            alpha /= 2
        x = x + alpha * d
        out.append((alpha, so.rosen(x), tau > 0))
    return out


@pytest.mark.parametrize(
    "method, direction",
    [("newton", _damped_newton_direction), ("saddle_free", _saddle_free_direction)],
    ids=["newton", "saddle_free"],
)
def test_line_search_newton_steps(method, direction):
    """The first 10 iterations: step sizes (backtracked ones among them) and values; Newton's
    path starts on an indefinite Hessian, so the Levenberg-Marquardt shift is on it too."""
    steps = 10
    want = reference_line_search_newton(direction, steps)
    alpha, value, damped = (np.array(c) for c in zip(*want, strict=True))
    assert np.any(alpha < 1) and (method != "newton" or np.any(damped))
    run = jax.jit(lambda x: minimize(_rosen, x, method=method, max_steps=steps, history=True))
    hist = jax.tree.map(np.asarray, run(jnp.asarray(X0))[1])
    np.testing.assert_array_equal(hist.step_size[1:], alpha)
    np.testing.assert_allclose(hist.value[1:], value, rtol=1e-9)


# ------------------------------------------------------------------------------------------
# Levenberg-Marquardt (least_squares) against Madsen, Nielsen & Tingleff's Algorithm 3.16.
# ------------------------------------------------------------------------------------------


def _rosen_residuals(x, xp=np):
    """Rosenbrock's function as ½‖r‖²."""
    return xp.stack([10.0 * (x[1] - x[0] ** 2), 1.0 - x[0]])


def _lm_reference(residual, x, steps, tau=1e-3):
    """Algorithm 3.16 (Nielsen's damping update) in numpy float64, with the Jacobian by
    central differences of the numpy residuals: per iteration (trial F, accepted, μ, ν)."""

    def jac(x, h=1e-6):
        cols = [(residual(x + h * e) - residual(x - h * e)) / (2 * h) for e in np.eye(len(x))]
        return np.stack(cols, axis=1)

    F = lambda x: 0.5 * residual(x) @ residual(x)
    r, J = residual(x), jac(x)
    A, g = J.T @ J, J.T @ r
    mu, nu = tau * np.max(np.diag(A)), 2.0
    out = []
    for _ in range(steps):
        h = np.linalg.solve(A + mu * np.eye(len(x)), -g)
        x_new = x + h
        rho = (F(x) - F(x_new)) / (0.5 * h @ (mu * h - g))
        out.append((F(x_new), rho > 0, mu, nu))
        if rho > 0:
            x = x_new
            r, J = residual(x), jac(x)
            A, g = J.T @ J, J.T @ r
            mu, nu = mu * max(1 / 3, 1 - (2 * rho - 1) ** 3), 2.0
        else:
            mu, nu = mu * nu, 2 * nu
    return out


def test_levenberg_marquardt_follows_nielsens_damping_update():
    from jaxopt2.solvers import least_squares

    # from the classic start with a small initial damping, LM rejects four steps in a row,
    # then accepts and rejects in turn: every branch of the update acts
    x0, tau, steps = np.array([-1.2, 1.0]), 1e-6, 12
    ref = _lm_reference(_rosen_residuals, x0.copy(), steps, tau)
    accepted = [a for _, a, _, _ in ref]
    # the fixture has what the update rules act on: a rejection after an accepted step that
    # followed a rejection (ν must be back at 2 there), and several rejections in a row
    pattern = "".join("a" if a else "r" for a in accepted)
    assert "rar" in pattern and "rrr" in pattern, pattern
    residual = functools.partial(_rosen_residuals, xp=jnp)
    run = jax.jit(
        lambda x: least_squares(
            residual, x, max_steps=steps, tol=0.0, history=True, damping_init=tau
        )
    )
    _, hist = run(jnp.asarray(x0))
    hist = jax.tree.map(np.asarray, hist)
    np.testing.assert_array_equal(hist.accepted[1 : steps + 1], accepted, err_msg=pattern)
    np.testing.assert_allclose(
        hist.trial_value[1 : steps + 1], [f for f, _, _, _ in ref], rtol=1e-7, err_msg=pattern
    )


# ------------------------------------------------- newton_cg with the diagonal preconditioner
# A separable objective: the Hessian is diagonal, so Hutchinson's estimate of its diagonal is
# exact whatever the probes, and the solver's preconditioner is M = diag(|Hᵢᵢ|) / mean|Hᵢᵢ|.
_PC_A = np.geomspace(1e-2, 1e3, 6)
_PC_B = np.array([0.5, 0.0, 30.0, 0.0, 2e3, 0.0])  # cos terms: negative curvature early on
_PC_C = np.array([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])
_PC_X0 = np.array([0.64, 1.38, 0.26, 2.61, 1.9, -2.98])


def _pc_f(x, xp=np):
    return xp.sum(0.5 * _PC_A * (x - _PC_C) ** 2 + _PC_B * xp.cos(x))


def _pc_g(x):
    return _PC_A * (x - _PC_C) - _PC_B * np.sin(x)


def _pc_hdiag(x):
    return _PC_A - _PC_B * np.cos(x)


def _preconditioned_steihaug(g, hdiag, m, radius):
    """Nocedal & Wright's Algorithm 7.2 with a preconditioner M (Conn, Gould & Toint,
    Algorithm 7.5.1): CG on ``Hp = -g`` with ``y = M⁻¹r``, the region ``‖p‖_M <= radius``,
    the residual measured as ``‖r‖_{M⁻¹} <= min(½, √‖g‖) ‖g‖_{M⁻¹}``."""
    mnorm = lambda v: np.sqrt(v @ (m * v))
    hv = lambda v: hdiag * v
    rtol = min(0.5, np.sqrt(np.linalg.norm(g))) * np.sqrt(g @ (g / m))

    def to_boundary(z, d):
        a, b, c = d @ (m * d), 2 * z @ (m * d), z @ (m * z) - radius**2
        return (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)

    z, r = np.zeros_like(g), g.copy()
    y = r / m
    d = -y
    for _ in range(10 * g.size):
        kappa = d @ hv(d)
        if kappa <= 0:
            return z + to_boundary(z, d) * d, True
        alpha = (r @ y) / kappa
        if mnorm(z + alpha * d) >= radius:
            return z + to_boundary(z, d) * d, True
        z = z + alpha * d
        r_new = r + alpha * hv(d)
        y_new = r_new / m
        if np.sqrt(r_new @ y_new) <= rtol:
            return z, False
        d = -y_new + (r_new @ y_new) / (r @ y) * d
        r, y = r_new, y_new
    return z, False


def reference_preconditioned_newton_cg(x0, steps, radius=1.0, max_radius=1000.0, eta=0.15):
    """Per iteration ``(trial value, accepted, value after)``: the radius rule of Algorithm 4.1
    with the step and the region in the M-norm."""
    x = np.array(x0)
    out = []
    for _ in range(steps):
        f, g, hd = _pc_f(x), _pc_g(x), _pc_hdiag(x)
        a = np.abs(hd)
        m = np.maximum(a, np.sqrt(np.finfo(float).eps) * a.max())
        m = m / m.mean()  # D² = M, normalized to a root-mean-square of 1
        p, boundary = _preconditioned_steihaug(g, hd, m, radius)
        predicted = -(g @ p + 0.5 * p @ (hd * p))
        trial = _pc_f(x + p)
        rho = (f - trial) / predicted
        if rho < 0.25:
            radius = 0.25 * radius
        elif rho > 0.75 and boundary:
            radius = min(2 * radius, max_radius)
        if rho > eta:
            x = x + p
        out.append((trial, rho > eta, _pc_f(x)))
    return out, x


def test_newton_cg_diagonal_preconditioner_follows_preconditioned_steihaug():
    """Every iteration's trial value, acceptance and value, and the solution, of
    ``preconditioner="diagonal"`` against the textbook preconditioned Steihaug-CG (a change
    of variables done wrong — D for D⁻¹, or the radius in the Euclidean norm — takes other
    steps)."""
    run = jax.jit(
        lambda x: minimize(
            lambda z: _pc_f(z, jnp), x, method="newton_cg", preconditioner="diagonal",
            diagonal_probes=2, max_steps=60, history=True,
        )
    )  # fmt: skip
    sol, hist = run(jnp.asarray(_PC_X0))
    steps = int(sol.num_steps)
    want, _ = reference_preconditioned_newton_cg(_PC_X0, steps)
    trial, accepted, value = (np.array(c) for c in zip(*want, strict=True))
    assert (~accepted).sum() >= 1 and accepted.sum() >= 5, accepted
    np.testing.assert_array_equal(np.asarray(hist.accepted[1 : steps + 1]), accepted)
    np.testing.assert_allclose(np.asarray(hist.trial_value[1 : steps + 1]), trial, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(hist.value[1 : steps + 1]), value, rtol=1e-9)
    _, x_ref = reference_preconditioned_newton_cg(_PC_X0, steps)
    assert bool(sol.success)
    np.testing.assert_allclose(np.asarray(sol.x), x_ref, rtol=1e-9, atol=1e-12)
