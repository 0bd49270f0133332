"""``minimize``: second-order unconstrained minimization of a scalar function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxopt2.solvers import _cubic as cubic
from jaxopt2.solvers import _newton as newton
from jaxopt2.solvers import _trust_region as trust_region
from jaxopt2.solvers._core import (
    Objective,
    call_solver,
    check_max_steps,
    check_method,
    check_output,
    check_x0,
    run,
    take_options,
    without_aux,
)
from jaxopt2.solvers._implicit import cg_solve, dense_solve, solve_with_implicit_diff

PyTree = Any

__all__ = ["MINIMIZE_METHODS", "minimize"]

# name -> (builder, option defaults)
MINIMIZE_METHODS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "newton": (newton.newton, newton.NEWTON_OPTIONS),
    "trust_region": (trust_region.trust_region, trust_region.TRUST_REGION_OPTIONS),
    "newton_cg": (trust_region.newton_cg, trust_region.NEWTON_CG_OPTIONS),
    "cubic": (cubic.cubic, cubic.CUBIC_OPTIONS),
    "lazy_newton": (cubic.lazy_newton, cubic.LAZY_NEWTON_OPTIONS),
    "damped_newton": (newton.damped_newton, newton.DAMPED_NEWTON_OPTIONS),
    "saddle_free": (newton.saddle_free, newton.SADDLE_FREE_OPTIONS),
}


def minimize(
    fun: Callable[..., jax.Array],
    x0: PyTree,
    *args: Any,
    method: str = "newton",
    tol: float | jax.Array | None = None,
    max_steps: int = 100,
    history: bool = False,
    has_aux: bool = False,
    **options: Any,
):
    """Minimize a scalar function with a second-order method, in one ``lax.while_loop``.

    The iteration stops as soon as ``‖∇f(x)‖ <= tol`` (status ``CONVERGED``), after
    `max_steps` iterations, or when the method cannot make progress (see
    :data:`~jaxopt2.solvers.STATUS`). A trial point with a non-finite value or gradient is
    never accepted: the solution is always the last finite iterate. Every method takes only
    steps that decrease ``f``, indefinite Hessians included. Once the predicted decrease is
    below ``√eps · |f|``, where differences of values are mostly rounding error, the
    decrease is measured from gradients instead, ``-½(∇f(x) + ∇f(x+p))ᵀp`` (Hager-Zhang's
    approximate Armijo condition), and the value may then move by rounding error.

    Methods (all use exact second derivatives from jax; "dense" ones form the ``n × n``
    Hessian of the flattened variables with ``jax.hessian``):

    * ``"newton"``: Newton's method; Levenberg-Marquardt damping ``H + τI`` with ``τ = 0``
      when the Cholesky factorization of ``H`` succeeds and otherwise increased until it does;
      backtracking Armijo line search. Options ``c1`` (1e-4), ``max_backtracks`` (40).
    * ``"trust_region"``: trust-region Newton with the exact subproblem solution from the
      eigendecomposition of ``H`` (Moré-Sorensen, hard case included), like scipy's
      ``trust-exact``. Options ``initial_radius`` (1), ``max_radius`` (1000), ``eta`` (0.15).
    * ``"newton_cg"``: matrix-free trust-region Newton-CG (Steihaug-Toint) on
      Hessian-vector products (forward-over-reverse), counted in ``num_hvps``. Options as
      ``trust_region`` plus ``cg_maxiter`` (default ``10·dim``) and ``preconditioner``:
      ``None`` (default) or ``"diagonal"``, Jacobi preconditioning with ``√|diag H|``
      estimated each iteration from ``diagonal_probes`` (8) Rademacher probes (Hutchinson;
      the trust region becomes ``‖Dp‖ <= Δ``), which pays on badly scaled problems.
    * ``"cubic"``: adaptive cubic regularization (Nesterov-Polyak / ARC), the cubic
      subproblem solved exactly (eigendecomposition + secular equation). Options ``sigma``
      (initial regularization, 1), ``sigma_min``, ``eta1``, ``eta2``, ``gamma``.
    * ``"lazy_newton"``: the cubic step with a Hessian recomputed only every
      ``hessian_every`` iterations (default 5) and a fresh gradient every iteration
      (Doikov, Chayti & Jaggi 2023). Options as ``cubic`` plus ``hessian_every``.
    * ``"damped_newton"``: ``x - α H⁻¹∇f`` with an explicit step size, no line search on
      ``f``. ``schedule="root"`` (default): ``α = 1/(1+θ)`` with
      ``θ = (9 M_q)^{1/(q-1)} G^{(q-2)/(q-1)}``, ``G = √(∇fᵀH⁻¹∇f)``, the global O(k⁻³)
      schedule for a Lipschitz third derivative (Hanzely, Abdukhakimov & Takáč 2024).
      Options ``smoothness`` (``M_q``; default None: ``θ = σ G^{(q-2)/(q-1)}`` with ``σ``
      backtracked from ``sigma_init = 1``), ``order`` (``q ∈ [2, 4]``, 4). ``schedule="aicn"``:
      ``α = 2/(1+√(1+2LG))`` (Hanzely et al. 2022, O(k⁻²)); options ``lipschitz`` (``L``;
      default None: backtracked from ``lipschitz_init = 1``). ``max_backtracks`` (60).
    * ``"saddle_free"``: ``-|H|⁻¹∇f`` with ``|H|`` from the eigendecomposition, eigenvalue
      magnitudes floored at ``damping · max|λ|`` (``damping = 1e-8``), Armijo line search
      (Dauphin et al. 2014). Options ``damping``, ``c1``, ``max_backtracks``.

    Args:
      fun: ``(x, *args) -> scalar``; ``x`` has the pytree structure of `x0`. A function
        returning a vector of residuals belongs to :func:`least_squares`.
      x0: the starting point, a pytree of floating-point arrays (flattened internally with
        ``jax.flatten_util.ravel_pytree``; the solution comes back in the same structure).
      *args: extra arguments of `fun`. They are traced, so the solve works under
        ``jax.jit`` and ``jax.vmap`` over `x0` and `args` (a batch member that has finished
        stays frozen while the others continue), and differentiable: ``jax.grad``,
        ``jax.jvp``, ``jax.jacfwd`` / ``jacrev`` of a function of the solution with respect
        to `args` use implicit differentiation at the optimum, ``dx*/da = -H⁻¹ ∂ₐ∇ₓf``, in
        forward and reverse mode (the loop itself is not differentiated; values closed over
        by `fun` are treated as constants).
      method: one of the names above (a static Python string).
      tol: stop when ``‖∇f(x)‖₂ <= tol``. Default by the dtype of the flattened `x0`:
        1e-8 for float64, 1e-5 for float32, 1e-2 for float16/bfloat16.
      max_steps: the maximum number of iterations (a static int). Every iteration counts,
        rejected trust-region / regularization steps included (like scipy's ``nit``).
      history: if True, return ``(solution, History)``, with per-iteration values, gradient
        norms, trial values, acceptance flags and step sizes in arrays of length
        ``max_steps + 1``.
      has_aux: `fun` returns a pair ``(value, aux)``, as with
        ``jax.value_and_grad(has_aux=True)``: the solver minimizes the value, and the
        solution's ``aux`` field holds `aux` at the solution (one more evaluation of `fun`).
      **options: method options (static Python values), listed above.

    Returns:
      A :class:`~jaxopt2.solvers.Solution` ``(x, value, grad_norm, num_steps, num_hessians,
      num_hvps, success, status)``; with ``history=True`` a pair ``(solution, history)``.

    Raises:
      ValueError: unknown `method`; `fun` does not return a scalar (a residual vector:
        use :func:`least_squares`).
      TypeError: `x0` has integer (non-floating) leaves; unknown option for the method.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxopt2.solvers import minimize
      >>> rosen = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
      >>> sol = minimize(rosen, jnp.array([-1.2, 1.0]), method="trust_region")
      >>> bool(sol.success), [round(float(v), 8) for v in sol.x]
      (True, [1.0, 1.0])
    """
    who = "minimize"
    check_method(method, tuple(MINIMIZE_METHODS), who)
    _, defaults = MINIMIZE_METHODS[method]
    opts = take_options(options, defaults, method, who)
    max_steps = check_max_steps(max_steps, who)
    check_x0(x0, who)
    check_output(jax.eval_shape(without_aux(fun, has_aux, who, "fun"), x0, *args), who, "fun",
                 scalar=True)  # fmt: skip
    result, hist = call_solver(
        _minimize,
        _minimize_compiled,
        x0,
        args,
        tol,
        fun=fun,
        has_aux=has_aux,
        method=method,
        opts=opts,
        max_steps=max_steps,
        history=history,
    )
    return (result, hist) if history else result


def _minimize(x0, args, tol, *, fun, has_aux, method, opts, max_steps, history):
    value_fn = without_aux(fun, has_aux, "minimize", "fun")
    flat0, unravel = ravel_pytree(x0)
    dtype = flat0.dtype
    builder, _ = MINIMIZE_METHODS[method]
    method_impl = builder(dict(opts))

    def objective(z, a):
        return jnp.asarray(value_fn(unravel(z), *a)).astype(dtype)

    def solve(z0, a, tol):
        obj = Objective(lambda z: objective(z, a), dtype)
        return run(method_impl, obj, z0, tol, max_steps, history)

    linear_solve = cg_solve if method == "newton_cg" else dense_solve
    result, hist = solve_with_implicit_diff(solve, objective, linear_solve, flat0, args, tol)
    result = result._replace(x=unravel(result.x))
    if has_aux:
        # one more evaluation, at the solution (differentiable through x like the rest)
        result = result._replace(aux=fun(result.x, *args)[1])
    return result, hist


_minimize_compiled = jax.jit(
    _minimize, static_argnames=("fun", "has_aux", "method", "opts", "max_steps", "history")
)
