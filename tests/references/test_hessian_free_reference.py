"""Hessian-free (``jaxopt2.hessian_free``) against a numpy float64 transcription of its
documented Levenberg-Marquardt damping (Martens, "Deep learning via Hessian-free
optimization", ICML 2010, section 4.1).

With the Hessian as curvature on a 4-parameter L2-regularized logistic regression (convex, so
``H + λI`` is positive definite) and CG run to a tight residual, the step is the exact damped
Newton step ``s = (H + λI)⁻¹ g``. The reference then takes ``ρ = (f(θ - s) - f(θ)) / q(-s)``
with ``q(-s) = -gᵀs + ½ sᵀ(H + λI)s``, rejects the step when ``ρ <= 0``, and sets
``λ ← 3/2 λ`` when ``ρ < 1/4`` and ``λ ← 2/3 λ`` when ``ρ > 3/4``. From the start below the
path has rejected steps, small ratios, ratios above 3/4 and ratios in (1/2, 3/4], where the
damping must stay put; the parameters, ``ρ`` and ``λ`` of every step are compared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt2

pytestmark = pytest.mark.timeout(120)

_RNG = np.random.default_rng(0)
A = _RNG.normal(size=(20, 4))
B = (_RNG.uniform(size=20) < 0.5).astype(np.float64)
L2 = 1e-2
THETA0 = 3.0 * np.array([1.0, -2.0, 1.5, 3.0])
DAMPING0 = 1e-2
STEPS = 10


def _f(t):
    z = A @ t
    return np.mean(np.logaddexp(0, z) - B * z) + 0.5 * L2 * t @ t


def _grad(t):
    p = 1 / (1 + np.exp(-(A @ t)))
    return A.T @ (p - B) / len(B) + L2 * t


def _hess(t):
    p = 1 / (1 + np.exp(-(A @ t)))
    return (A.T * (p * (1 - p))) @ A / len(B) + L2 * np.eye(len(t))


def _reference():
    t, lam, out = THETA0.copy(), DAMPING0, []
    for _ in range(STEPS):
        g, m = _grad(t), _hess(t) + lam * np.eye(len(t))
        s = np.linalg.solve(m, g)
        rho = (_f(t - s) - _f(t)) / (-g @ s + 0.5 * s @ m @ s)
        lam = lam * 1.5 if rho < 0.25 else (lam * 2 / 3 if rho > 0.75 else lam)
        t = t - s if rho > 0 else t
        out.append((t.copy(), rho, lam))
    return out


def _loss(t):
    z = jnp.asarray(A) @ t
    return jnp.mean(jnp.logaddexp(0.0, z) - jnp.asarray(B) * z) + 0.5 * L2 * t @ t


def test_hessian_free_damping_follows_the_levenberg_marquardt_rule():
    ref = _reference()
    rhos = np.array([r for _, r, _ in ref])
    # the fixture exercises every branch of the rule (and the band where λ stays)
    assert (rhos <= 0).any() and ((rhos > 0) & (rhos < 0.25)).any(), rhos
    assert ((rhos > 0.5) & (rhos <= 0.75)).any() and (rhos > 0.75).any(), rhos

    opt = jaxopt2.hessian_free(
        damping=DAMPING0,
        curvature="hessian",
        max_cg_iters=50,
        cg_rtol=1e-13,
        stats_dtype=jnp.float64,
    )

    @jax.jit
    def step(t, state):
        _, u, state = jaxopt2.value_and_update(opt, _loss, t, state)
        return t + u, state

    t, state = jnp.asarray(THETA0), opt.init(jnp.asarray(THETA0))
    for i, (t_ref, rho_ref, lam_ref) in enumerate(ref):
        t, state = step(t, state)
        where = f"step {i + 1}: rho {rho_ref:.3f}"
        np.testing.assert_allclose(
            float(optax.tree_utils.tree_get(state, "rho")), rho_ref, rtol=1e-7, err_msg=where
        )
        np.testing.assert_allclose(
            float(optax.tree_utils.tree_get(state, "damping")), lam_ref, rtol=1e-12, err_msg=where
        )
        np.testing.assert_allclose(np.asarray(t), t_ref, rtol=1e-8, atol=1e-10, err_msg=where)
