"""Nonlinear least squares ``min_x ½‖r(x)‖²``: ``gauss_newton`` and ``levenberg_marquardt``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxopt2.solvers import solution as sol
from jaxopt2.solvers._core import (
    Method,
    Objective,
    StepOut,
    armijo,
    call_solver,
    check_max_steps,
    check_method,
    check_output,
    check_x0,
    eps,
    finite,
    measured_decrease,
    refresh,
    run,
    take_options,
    without_aux,
)
from jaxopt2.solvers._implicit import dense_solve, solve_with_implicit_diff

PyTree = Any

__all__ = ["LEAST_SQUARES_METHODS", "least_squares"]

GAUSS_NEWTON_OPTIONS = {"c1": 1e-4, "max_backtracks": 40}
LEVENBERG_MARQUARDT_OPTIONS = {"damping_init": 1e-3}


class _Residual(Objective):
    """``½‖r(z)‖²`` with access to ``r`` and its Jacobian."""

    def __init__(self, residual: Callable[[jax.Array], jax.Array], dtype, num_residuals: int):
        self._res = lambda z: jnp.ravel(residual(z)).astype(dtype)
        super().__init__(lambda z: 0.5 * jnp.sum(self._res(z) ** 2), dtype)
        self._num_residuals = num_residuals

    def residual_and_jacobian(self, z):
        r = self._res(z)
        # Forward mode costs one pass per variable, reverse mode one per residual.
        jac = jax.jacfwd if z.shape[0] <= self._num_residuals else jax.jacrev
        return r, jac(self._res)(z)


def _svd(jac):
    u, s, vt = jnp.linalg.svd(jac, full_matrices=False)
    return u, s, vt


def gauss_newton(opts: dict) -> Method:
    """Gauss-Newton with an Armijo line search.

    Direction ``d = -J⁺r``, the minimum-norm least-squares solution of ``J d = -r`` from the
    SVD of ``J`` (singular values below ``eps · max(m, n) · s_max`` are dropped), which is a
    descent direction for ``½‖r‖²`` whenever ``Jᵀr ≠ 0``. Step by backtracking from 1; when
    no step along ``d`` passes within ``max_backtracks`` halvings, the search goes on along
    ``-Jᵀr`` (as ``minimize``'s ``newton``), and only that failure ends the run.
    """

    def init(obj, x, f, g):
        return ()

    def step(obj, x, f, g, state):
        r, jac = obj.residual_and_jacobian(x)
        u, s, vt = _svd(jac)
        cutoff = eps(obj.dtype) * max(jac.shape) * s[0]
        inv = jnp.where(s > cutoff, 1 / jnp.where(s > 0, s, 1), 0)
        d = -vt.T @ (inv * (u.T @ r))
        d = jnp.where(finite(d) & (jnp.dot(g, d) < 0), d, -g)
        # No decrease along d within the backtracks (d nearly orthogonal to -g where J is
        # ill-conditioned): steepest descent in the same loop.
        ls = armijo(
            obj, x, f, g, d, c1=opts["c1"], max_backtracks=opts["max_backtracks"], fallback=-g
        )
        one = jnp.asarray(1, jnp.int32)
        return StepOut(ls.x, ls.f, ls.g, state, ls.ok, ls.f, ls.alpha, one, 0 * one, ls.status)

    return Method(init, step)


class _LMState(NamedTuple):
    r: jax.Array
    u: jax.Array
    s: jax.Array
    vt: jax.Array
    fresh: jax.Array
    mu: jax.Array  # damping; negative until the first Jacobian sets it
    nu: jax.Array


def levenberg_marquardt(opts: dict) -> Method:
    """Levenberg-Marquardt with Nielsen's damping update (Nielsen 1999; Madsen, Nielsen &
    Tingleff, "Methods for non-linear least squares problems", 2004, Algorithm 3.16).

    Step ``h = -(JᵀJ + μI)⁻¹ Jᵀr``, computed from the SVD of ``J`` (kept across rejected
    steps, so a rejection costs no new Jacobian). Gain ratio
    ``ρ = (F(x) - F(x+h)) / (½ hᵀ(μh - Jᵀr))``: if ``ρ > 0`` the step is taken,
    ``μ ← μ · max(1/3, 1 - (2ρ - 1)³)``, ``ν ← 2``; otherwise ``μ ← μν``, ``ν ← 2ν``.
    Initial ``μ = damping_init · maxᵢ (JᵀJ)ᵢᵢ`` (default ``damping_init = 1e-3``).
    """

    def init(obj, x, f, g):
        n = x.shape[0]
        m = obj._num_residuals
        k = min(m, n)
        z = lambda *shape: jnp.zeros(shape, obj.dtype)
        return _LMState(
            r=z(m),
            u=z(m, k),
            s=z(k),
            vt=z(k, n),
            fresh=jnp.asarray(False),
            mu=jnp.asarray(-1.0, obj.dtype),
            nu=jnp.asarray(2.0, obj.dtype),
        )

    def step(obj, x, f, g, st):
        dtype = obj.dtype

        def evaluate():
            r, jac = obj.residual_and_jacobian(x)
            return (r, *_svd(jac))

        r, u, s, vt = refresh(st.fresh, (st.r, st.u, st.s, st.vt), evaluate)
        # μ₀ = τ · maxᵢ (JᵀJ)ᵢᵢ, the diagonal from the SVD: (JᵀJ)ᵢᵢ = Σₖ s²ₖ V²ᵢₖ
        max_diag = jnp.max(jnp.sum(jnp.square(s[:, None] * vt), axis=0))
        mu = jnp.where(st.mu < 0, opts["damping_init"] * max_diag, st.mu)
        mu = jnp.maximum(mu, jnp.finfo(dtype).tiny)
        h = -vt.T @ (s / (s * s + mu) * (u.T @ r))
        pred = 0.5 * jnp.dot(h, mu * h - g)
        z = x + h
        fz, gz = obj.value_and_grad(z)
        fin = finite(fz, gz)
        actual = measured_decrease(obj, f, fz, g, gz, h, pred)
        rho = jnp.where(pred > 0, actual / jnp.where(pred > 0, pred, 1), -jnp.inf)
        rho = jnp.where(fin, rho, -jnp.inf)
        accepted = rho > 0
        factor = jnp.maximum(1 / 3, 1 - (2 * jnp.where(accepted, rho, 0) - 1) ** 3)
        mu_new = jnp.where(accepted, mu * factor, mu * st.nu)
        nu_new = jnp.where(accepted, 2.0, 2 * st.nu)
        collapsed = (~accepted) & (
            (jnp.linalg.norm(h) <= eps(dtype) * (1 + jnp.linalg.norm(x))) | ~jnp.isfinite(mu_new)
        )
        status = jnp.where(
            collapsed, jnp.where(fin, sol.STEP_TOO_SMALL, sol.NONFINITE), sol.RUNNING
        )
        return StepOut(
            x=jnp.where(accepted, z, x),
            f=jnp.where(accepted, fz, f),
            g=jnp.where(accepted, gz, g),
            state=_LMState(r, u, s, vt, ~accepted, mu_new.astype(dtype), nu_new.astype(dtype)),
            accepted=accepted,
            trial_value=fz,
            step_size=jnp.asarray(1, dtype),
            num_hessians=jnp.where(st.fresh, 0, 1).astype(jnp.int32),
            num_hvps=jnp.asarray(0, jnp.int32),
            status=status.astype(jnp.int32),
        )

    return Method(init, step)


LEAST_SQUARES_METHODS = {
    "gauss_newton": (gauss_newton, GAUSS_NEWTON_OPTIONS),
    "levenberg_marquardt": (levenberg_marquardt, LEVENBERG_MARQUARDT_OPTIONS),
}


def least_squares(
    residual_fn: Callable[..., jax.Array],
    x0: PyTree,
    *args: Any,
    method: str = "levenberg_marquardt",
    tol: float | jax.Array | None = None,
    max_steps: int = 100,
    history: bool = False,
    has_aux: bool = False,
    **options: Any,
):
    """Minimize ``F(x) = ½‖r(x, *args)‖²`` for a vector-valued residual function.

    Args:
      residual_fn: ``(x, *args) -> r``, an array of residuals (any shape with at least one
        dimension; it is flattened). ``x`` has the pytree structure of `x0`.
      x0: the starting point, a pytree of floating-point arrays.
      *args: extra arguments of `residual_fn`, traced (so ``jit``/``vmap`` over them works)
        and differentiable: ``jax.grad`` of a function of the solution with respect to them
        uses implicit differentiation at the optimum (the implicit function theorem, as
        :func:`minimize`).
      method: ``"levenberg_marquardt"`` (default; Nielsen's damping update) or
        ``"gauss_newton"`` (Armijo line search).
      tol: stop when ``‖Jᵀr‖ <= tol`` (the gradient of F). Default: 1e-8 for float64,
        1e-5 for float32, 1e-2 for 16-bit floats.
      max_steps: the maximum number of iterations (rejected LM steps included).
      history: if True, return ``(solution, History)`` with per-iteration values.
      has_aux: `residual_fn` returns a pair ``(residuals, aux)``: the solver fits the
        residuals, and the solution's ``aux`` field holds `aux` at the solution (one more
        evaluation of `residual_fn`).
      **options: method options: ``damping_init`` (LM, default 1e-3); ``c1``,
        ``max_backtracks`` (Gauss-Newton line search, defaults 1e-4 and 40).

    Returns:
      A :class:`~jaxopt2.solvers.Solution`; ``value`` is ``½‖r(x)‖²``, ``num_hessians``
      counts Jacobian evaluations.

    Raises:
      ValueError: unknown `method`, a `residual_fn` that returns a scalar.
      TypeError: integer `x0`, unknown options.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxopt2.solvers import least_squares
      >>> t = jnp.linspace(0.0, 1.0, 5)
      >>> sol = least_squares(lambda p: p[0] * jnp.exp(-p[1] * t) - 2.0 * jnp.exp(-3.0 * t),
      ...                     jnp.array([1.0, 1.0]))
      >>> [round(float(v), 6) for v in sol.x], bool(sol.success)
      ([2.0, 3.0], True)
    """
    who = "least_squares"
    check_method(method, tuple(LEAST_SQUARES_METHODS), who)
    _, defaults = LEAST_SQUARES_METHODS[method]
    opts = take_options(options, defaults, method, who)
    max_steps = check_max_steps(max_steps, who)
    check_x0(x0, who)
    out = jax.eval_shape(without_aux(residual_fn, has_aux, who, "residual_fn"), x0, *args)
    check_output(out, who, "residual_fn", scalar=False)
    result, hist = call_solver(
        _least_squares,
        _least_squares_compiled,
        x0,
        args,
        tol,
        fun=residual_fn,
        has_aux=has_aux,
        method=method,
        opts=opts,
        max_steps=max_steps,
        history=history,
    )
    return (result, hist) if history else result


def _least_squares(x0, args, tol, *, fun, has_aux, method, opts, max_steps, history):
    residual_fn = without_aux(fun, has_aux, "least_squares", "residual_fn")
    num_residuals = math.prod(jax.eval_shape(residual_fn, x0, *args).shape)
    flat0, unravel = ravel_pytree(x0)
    dtype = flat0.dtype
    builder, _ = LEAST_SQUARES_METHODS[method]
    method_impl = builder(dict(opts))

    def residual(z, a):
        return residual_fn(unravel(z), *a)

    def objective(z, a):
        r = jnp.ravel(residual(z, a)).astype(dtype)
        return 0.5 * jnp.sum(r * r)

    def solve(z0, a, tol):
        obj = _Residual(lambda z: residual(z, a), dtype, num_residuals)
        return run(method_impl, obj, z0, tol, max_steps, history)

    result, hist = solve_with_implicit_diff(solve, objective, dense_solve, flat0, args, tol)
    result = result._replace(x=unravel(result.x))
    if has_aux:
        # one more evaluation, at the solution (differentiable through x like the rest)
        result = result._replace(aux=fun(result.x, *args)[1])
    return result, hist


_least_squares_compiled = jax.jit(
    _least_squares, static_argnames=("fun", "has_aux", "method", "opts", "max_steps", "history")
)
