"""Line-search Newton methods with a dense Hessian: ``newton``, ``damped_newton``,
``saddle_free``.

Each builder takes the method's resolved options and returns a :class:`~._core.Method`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt2.solvers import solution as sol
from jaxopt2.solvers._core import (
    Method,
    StepOut,
    armijo,
    cho_solve,
    damped_cholesky,
    finite,
    measured_decrease,
)

NEWTON_OPTIONS = {"c1": 1e-4, "max_backtracks": 40}
SADDLE_FREE_OPTIONS = {"damping": 1e-8, "c1": 1e-4, "max_backtracks": 40}
DAMPED_NEWTON_OPTIONS = {"lipschitz": None, "lipschitz_init": 1.0, "max_backtracks": 60}


def _descent_or_gradient(d, g):
    """`d` if it is a finite descent direction, else steepest descent."""
    ok = finite(d) & (jnp.dot(g, d) < 0)
    return jnp.where(ok, d, -g)


def newton(opts: dict) -> Method:
    """Newton's method with Levenberg-Marquardt damping and an Armijo line search.

    Direction ``d = -(H + τI)⁻¹ g`` with ``τ = 0`` when the Cholesky factorization of ``H``
    succeeds (``H`` positive definite) and otherwise the smallest of ``β, 10β, 100β, ...``
    (``β = 10⁻³ max|Hᵢᵢ|``) that makes it succeed (Nocedal & Wright, Algorithm 3.3), so ``d``
    is always a descent direction. Step size by backtracking from ``α = 1`` (halving) until
    ``f(x + αd) <= f(x) + c1 α gᵀd``.
    """

    def init(obj, x, f, g):
        return ()

    def step(obj, x, f, g, state):
        chol, _ = damped_cholesky(obj.hessian(x))
        d = _descent_or_gradient(-cho_solve(chol, g), g)
        ls = armijo(obj, x, f, g, d, c1=opts["c1"], max_backtracks=opts["max_backtracks"])
        one = jnp.asarray(1, jnp.int32)
        return StepOut(ls.x, ls.f, ls.g, state, ls.ok, ls.f, ls.alpha, one, 0 * one, ls.status)

    return Method(init, step)


def saddle_free(opts: dict) -> Method:
    """Saddle-free Newton (Dauphin et al., 2014): ``d = -|H|⁻¹ g`` with an Armijo line search.

    ``|H| = V diag(max(|λᵢ|, δ)) Vᵀ`` from the eigendecomposition ``H = V diag(λ) Vᵀ``, with
    the damping floor ``δ = damping · maxᵢ|λᵢ|`` (default ``damping = 1e-8``). ``|H|`` is
    positive definite, so ``d`` is a descent direction; along negative-curvature directions
    it moves downhill, away from saddle points, instead of toward them as Newton's step
    does. On a positive-definite Hessian it is Newton's step.
    """

    def init(obj, x, f, g):
        return ()

    def step(obj, x, f, g, state):
        w, v = jnp.linalg.eigh(obj.hessian(x))
        aw = jnp.abs(w)
        floor = jnp.maximum(opts["damping"] * jnp.max(aw), jnp.finfo(w.dtype).tiny)
        d = -v @ ((v.T @ g) / jnp.maximum(aw, floor))
        d = _descent_or_gradient(d, g)
        ls = armijo(obj, x, f, g, d, c1=opts["c1"], max_backtracks=opts["max_backtracks"])
        one = jnp.asarray(1, jnp.int32)
        return StepOut(ls.x, ls.f, ls.g, state, ls.ok, ls.f, ls.alpha, one, 0 * one, ls.status)

    return Method(init, step)


class _DampedState(NamedTuple):
    lipschitz: jax.Array


def aicn_step_size(lipschitz, newton_decrement):
    """AICN step size ``α = (-1 + √(1 + 2LG)) / (LG) = 2 / (1 + √(1 + 2LG))``.

    ``G = ‖∇f(x)‖*ₓ = √(gᵀH⁻¹g)`` is the Newton decrement and ``L`` the semi-strong
    self-concordance constant. ``α`` minimizes ``-αG² + ½α²G² + (L/6)α³G³``, the cubic
    upper model of ``f`` along the Newton direction measured in the local norm
    ``‖h‖ₓ = √(hᵀHh)``; ``α -> 1`` as ``LG -> 0`` (pure Newton near the solution).
    """
    return 2.0 / (1.0 + jnp.sqrt(1.0 + 2.0 * lipschitz * newton_decrement))


def damped_newton(opts: dict) -> Method:
    """Damped Newton with the AICN step-size schedule (Hanzely et al., NeurIPS 2022).

    ``x⁺ = x - α H⁻¹∇f(x)`` with ``α`` from :func:`aicn_step_size`. With
    ``lipschitz=L`` (the semi-strong self-concordance constant, if known) this is exactly
    AICN: one step per iteration, no line search; a step that would increase ``f`` or give
    a non-finite value (only possible if ``L`` is too small) is rejected and ``L`` doubled.
    With ``lipschitz=None`` (default) ``L`` is estimated by backtracking: each iteration
    first halves the previous estimate (starting from ``lipschitz_init``), then doubles it
    until the step satisfies the cubic upper bound
    ``f(x⁺) <= f(x) - αG² + ½α²G² + (L/6)α³G³`` that the analysis rests on.
    If ``H`` is not positive definite the damped Cholesky factorization of ``newton`` is used,
    which keeps the direction a descent direction.
    """
    fixed = opts["lipschitz"] is not None
    max_bt = opts["max_backtracks"]

    def init(obj, x, f, g):
        start = opts["lipschitz"] if fixed else opts["lipschitz_init"]
        return _DampedState(jnp.asarray(start, obj.dtype))

    def step(obj, x, f, g, state):
        dtype = obj.dtype
        chol, _ = damped_cholesky(obj.hessian(x))
        n = cho_solve(chol, g)
        gn = jnp.dot(g, n)
        usable = finite(n) & (gn > 0)
        n = jnp.where(usable, n, g)
        gdec = jnp.sqrt(jnp.where(usable, gn, jnp.dot(g, g)))

        def trial(lip):
            alpha = aicn_step_size(lip, gdec)
            z = x - alpha * n
            fz, gz = obj.value_and_grad(z)
            model = f - alpha * gdec**2 + 0.5 * (alpha * gdec) ** 2 + lip / 6 * (alpha * gdec) ** 3
            fin = finite(fz, gz)
            decrease = measured_decrease(obj, f, fz, g, gz, -alpha * n, alpha * gdec**2)
            if fixed:
                ok = fin & (decrease >= 0)
            else:
                ok = fin & (decrease >= f - model)
            return z, fz, gz, alpha, ok, fin

        if fixed:
            lip = state.lipschitz
            z, fz, gz, alpha, ok, fin = trial(lip)
            new_lip = jnp.where(ok, lip, 2 * lip)
            status = jnp.where(
                ok | (new_lip < 1e300),
                sol.RUNNING,
                jnp.where(fin, sol.STEP_TOO_SMALL, sol.NONFINITE),
            )
        else:
            lip0 = 0.5 * state.lipschitz

            def cond(c):
                i, _, _, _, _, _, ok, _ = c
                return (i < max_bt) & ~ok

            def body(c):
                i, lip, *_ = c
                lip = 2 * lip
                return (i + 1, lip, *trial(lip))

            _, new_lip, z, fz, gz, alpha, ok, fin = jax.lax.while_loop(
                cond, body, (jnp.asarray(0, jnp.int32), lip0, *trial(lip0))
            )
            status = jnp.where(
                ok, sol.RUNNING, jnp.where(fin, sol.LINESEARCH_FAILED, sol.NONFINITE)
            )
        one = jnp.asarray(1, jnp.int32)
        return StepOut(
            x=jnp.where(ok, z, x),
            f=jnp.where(ok, fz, f),
            g=jnp.where(ok, gz, g),
            state=_DampedState(new_lip.astype(dtype)),
            accepted=ok,
            trial_value=fz,
            step_size=alpha,
            num_hessians=one,
            num_hvps=0 * one,
            status=status.astype(jnp.int32),
        )

    return Method(init, step)
