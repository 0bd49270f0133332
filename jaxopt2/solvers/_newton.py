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
DAMPED_NEWTON_OPTIONS = {
    "schedule": "root",
    "smoothness": None,
    "order": 4.0,
    "sigma_init": 1.0,
    "lipschitz": None,
    "lipschitz_init": 1.0,
    "max_backtracks": 60,
}


def _descent_or_gradient(d, g):
    """`d` if it is a finite descent direction, else steepest descent."""
    ok = finite(d) & (jnp.dot(g, d) < 0)
    return jnp.where(ok, d, -g)


def newton(opts: dict) -> Method:
    """Newton's method with Levenberg-Marquardt damping and an Armijo line search.

    Direction ``d = -(H + τI)⁻¹ g`` with ``τ = 0`` when the Cholesky factorization of ``H``
    succeeds (``H`` positive definite) and otherwise the smallest of ``β, 10β, 100β, ...``
    (``β = 10⁻¹² max|Hᵢᵢ|``) that makes it succeed (Nocedal & Wright, Algorithm 3.3, which
    starts at 10⁻³), so ``d`` is always a descent direction. Step size by backtracking from
    ``α = 1`` (halving) until ``f(x + αd) <= f(x) + c1 α gᵀd``; when no step along ``d``
    passes within `max_backtracks` halvings (a nearly singular ``H + τI`` can make ``d`` far
    too long), the same search runs along ``-g``, and only its failure ends the run.
    """

    def init(obj, x, f, g):
        return ()

    def step(obj, x, f, g, state):
        chol, _ = damped_cholesky(obj.hessian(x))
        d = _descent_or_gradient(-cho_solve(chol, g), g)
        # No acceptable step along the Newton direction (a nearly singular H + τI can make
        # it too long for the backtracking to reach a decrease): steepest descent instead.
        ls = armijo(
            obj, x, f, g, d, c1=opts["c1"], max_backtracks=opts["max_backtracks"], fallback=-g
        )
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
    constant: jax.Array  # the current estimate of L (AICN) or σ (Universal Newton)


def aicn_step_size(lipschitz, newton_decrement):
    """AICN step size ``α = (-1 + √(1 + 2LG)) / (LG) = 2 / (1 + √(1 + 2LG))``.

    ``G = ‖∇f(x)‖*ₓ = √(gᵀH⁻¹g)`` is the Newton decrement and ``L`` the semi-strong
    self-concordance constant. ``α`` minimizes ``-αG² + ½α²G² + (L/6)α³G³``, the cubic
    upper model of ``f`` along the Newton direction measured in the local norm
    ``‖h‖ₓ = √(hᵀHh)``; ``α -> 1`` as ``LG -> 0`` (pure Newton near the solution).
    """
    return 2.0 / (1.0 + jnp.sqrt(1.0 + 2.0 * lipschitz * newton_decrement))


def root_newton_regularization(smoothness, order, newton_decrement):
    """Root Newton's implicit regularization ``θ = (9 M_q)^{1/(q-1)} G^{(q-2)/(q-1)}``.

    ``M_q`` is the Hölder constant of order ``q = p + ν ∈ [2, 4]`` measured in local norms
    (``q = 4``: a Lipschitz third derivative, the O(k⁻³) case; ``q = 3``: a Lipschitz
    Hessian), ``G = ‖∇f(x)‖*ₓ`` the Newton decrement. The step size is ``α = 1 / (1 + θ)``.
    """
    q = order
    return (9.0 * smoothness) ** (1.0 / (q - 1.0)) * newton_decrement ** ((q - 2.0) / (q - 1.0))


def _newton_direction(obj, x, g):
    """``(n, G, chol)``: the Newton direction ``n = H⁻¹g`` (damped Cholesky when ``H`` is not
    positive definite), the Newton decrement ``G = √(gᵀn)`` and the factor of ``H``.
    Where ``n`` is not a finite descent direction it falls back to ``g`` (``G = ‖g‖``)."""
    chol, _ = damped_cholesky(obj.hessian(x))
    n = cho_solve(chol, g)
    gn = jnp.dot(g, n)
    usable = finite(n) & (gn > 0)
    n = jnp.where(usable, n, g)
    return n, jnp.sqrt(jnp.where(usable, gn, jnp.dot(g, g))), chol


def _backtrack(trial, start, max_bt):
    """Double the constant from ``start / 2`` until ``trial(c)`` is accepted (or `max_bt`
    doublings): the usual "try a smaller constant first" of adaptive regularization. The
    last element says whether every trial was finite."""
    c0 = 0.5 * start

    def cond(c):
        i, _, _, _, _, _, ok, _ = c
        return (i < max_bt) & ~ok

    def body(c):
        i, const, *_, all_finite = c
        const = 2 * const
        z, fz, gz, alpha, ok, fin = trial(const)
        return (i + 1, const, z, fz, gz, alpha, ok, all_finite & fin)

    return jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), c0, *trial(c0)))[1:]


def _check_damped_options(opts: dict) -> None:
    schedule = opts["schedule"]
    if schedule not in ("root", "aicn"):
        raise ValueError(
            f"minimize: damped_newton schedule must be 'root' or 'aicn', got {schedule!r}."
        )
    own = {"root": ("smoothness", "order", "sigma_init"), "aicn": ("lipschitz", "lipschitz_init")}
    other = "aicn" if schedule == "root" else "root"
    given = [k for k in own[other] if opts[k] != DAMPED_NEWTON_OPTIONS[k]]
    if given:
        raise TypeError(
            f"minimize: damped_newton option(s) {given} belong to schedule={other!r}, "
            f"not to schedule={schedule!r}."
        )
    q = opts["order"]
    if not 2.0 <= q <= 4.0:
        raise ValueError(f"minimize: damped_newton order must be in [2, 4], got {q}.")
    for k in ("smoothness", "lipschitz"):
        if opts[k] is not None and not opts[k] > 0:
            raise ValueError(f"minimize: damped_newton {k} must be positive, got {opts[k]}.")


def damped_newton(opts: dict) -> Method:
    """Damped Newton ``x⁺ = x - α H⁻¹∇f(x)`` with an explicit step-size schedule.

    ``schedule="root"`` (default): Root Newton / Universal Newton of Hanzely, Abdukhakimov &
    Takáč, "Damped Newton Method with Near-Optimal Global O(k⁻³) Convergence Rate" (2024;
    later "Newton Method Revisited: Global Convergence Rates up to O(k⁻³) for Stepsize
    Schedules and Linesearch Procedures"). The step is the minimizer of the Newton model
    plus a ``(2+β)``-th power regularizer in the local norm, which lies on the Newton
    direction with ``α = 1/(1+θ)`` for an implicit regularization ``θ``:

    * ``smoothness=M_q`` known (Root Newton): ``θ = (9 M_q)^{1/(q-1)} G^{(q-2)/(q-1)}``
      (:func:`root_newton_regularization`, ``q = order``, default 4: Lipschitz third
      derivative, global rate ``O(M_q D^q / k^{q-1}) = O(k⁻³)``). One Hessian and one
      gradient per iteration, no line search. A step that increases ``f`` or is not finite
      (only possible when ``M_q`` is too small) is rejected and ``M_q`` doubled.
    * ``smoothness=None`` (default, Universal Newton): ``θ = σ G^{(q-2)/(q-1)}`` with ``σ``
      found by backtracking: each iteration first halves the previous ``σ`` (from
      ``sigma_init``), then doubles it until the trial point ``z = x - αn`` satisfies the
      descent condition the analysis rests on, ``2αθ ∇f(z)ᵀn >= ‖∇f(z)‖*ₓ²`` (dual local
      norm at ``x``, from the Cholesky factor already computed), and ``f(z) <= f(x)``.
      Under convexity the condition gives ``f(x) - f(z) >= ‖∇f(z)‖*ₓ² / (2θ)``.

    ``schedule="aicn"``: AICN (Hanzely et al., NeurIPS 2022), ``α = 2/(1+√(1+2LG))``
    (:func:`aicn_step_size`), the O(k⁻²) schedule; ``lipschitz=L`` known (rejected steps
    double ``L``) or backtracking on ``L`` from ``lipschitz_init`` until
    ``f(x⁺) <= f(x) - αG² + ½α²G² + (L/6)α³G³``.

    ``G = ‖∇f(x)‖*ₓ = √(∇fᵀH⁻¹∇f)`` is the Newton decrement; both schedules give ``α -> 1``
    as ``G -> 0`` (Newton's local quadratic rate). If ``H`` is not positive definite the
    damped Cholesky factorization of ``newton`` is used, so the direction stays a descent
    direction.
    """
    _check_damped_options(opts)
    aicn = opts["schedule"] == "aicn"
    known = opts["lipschitz"] if aicn else opts["smoothness"]
    fixed = known is not None
    start = known if fixed else (opts["lipschitz_init"] if aicn else opts["sigma_init"])
    q = float(opts["order"])
    beta = (q - 2.0) / (q - 1.0)
    max_bt = opts["max_backtracks"]

    def init(obj, x, f, g):
        return _DampedState(jnp.asarray(start, obj.dtype))

    def step(obj, x, f, g, state):
        n, gdec, chol = _newton_direction(obj, x, g)

        def trial(const):
            if aicn:
                alpha = aicn_step_size(const, gdec)
            elif fixed:
                alpha = 1.0 / (1.0 + root_newton_regularization(const, q, gdec))
            else:
                alpha = 1.0 / (1.0 + const * gdec**beta)
            z = x - alpha * n
            fz, gz = obj.value_and_grad(z)
            fin = finite(fz, gz)
            decrease = measured_decrease(obj, f, fz, g, gz, -alpha * n, alpha * gdec**2)
            if fixed:
                ok = fin & (decrease >= 0)
            elif aicn:
                model = -alpha * gdec**2 + 0.5 * (alpha * gdec) ** 2
                ok = fin & (decrease >= -model - const / 6 * (alpha * gdec) ** 3)
            else:
                theta = 1.0 / alpha - 1.0
                dual = jnp.dot(gz, cho_solve(chol, gz))
                ok = fin & (decrease >= 0) & (2 * alpha * theta * jnp.dot(gz, n) >= dual)
            return z, fz, gz, alpha, ok, fin

        if fixed:
            const = state.constant
            z, fz, gz, alpha, ok, fin = trial(const)
            new_const = jnp.where(ok, const, 2 * const)
            status = jnp.where(
                ok | (new_const < 1e300),
                sol.RUNNING,
                jnp.where(fin, sol.STEP_TOO_SMALL, sol.NONFINITE),
            )
        else:
            new_const, z, fz, gz, alpha, ok, fin = _backtrack(trial, state.constant, max_bt)
            # A step that no longer moves x (rounding) ends the run: pressed against a region
            # where f is not finite, the backtracking would otherwise shrink it forever.
            stalled = ok & jnp.all(z == x)
            status = jnp.where(
                ok & ~stalled,
                sol.RUNNING,
                jnp.where(
                    fin, jnp.where(ok, sol.STEP_TOO_SMALL, sol.LINESEARCH_FAILED), sol.NONFINITE
                ),
            )
        one = jnp.asarray(1, jnp.int32)
        return StepOut(
            x=jnp.where(ok, z, x),
            f=jnp.where(ok, fz, f),
            g=jnp.where(ok, gz, g),
            state=_DampedState(new_const.astype(obj.dtype)),
            accepted=ok,
            trial_value=fz,
            step_size=alpha,
            num_hessians=one,
            num_hvps=0 * one,
            status=status.astype(jnp.int32),
        )

    return Method(init, step)
