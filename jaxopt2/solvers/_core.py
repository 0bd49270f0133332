"""The machinery every solver shares: input checks, the flat objective, the one
``lax.while_loop`` that runs a method, the Armijo line search and the dense Newton solve.

A *method* is a pair of pure functions on flat vectors (see :class:`Method`): ``init``
builds its state at ``x0`` and ``step`` runs one iteration. The driver (:func:`run`) owns
everything else: stopping on ``‖∇f‖ <= tol`` or ``max_steps``, keeping the last finite
iterate, freezing a finished member of a ``vmap`` batch, counting, and the optional history.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt2.solvers import solution as sol

PyTree = Any

# Default stopping tolerance on ‖∇f‖ by dtype (documented in ``minimize``).
_DEFAULT_TOL = {8: 1e-8, 4: 1e-5, 2: 1e-2}


def default_tol(dtype) -> float:
    """1e-8 for float64, 1e-5 for float32, 1e-2 for 16-bit floats."""
    return _DEFAULT_TOL[jnp.dtype(dtype).itemsize]


# --------------------------------------------------------------------------- input checks


def check_x0(x0: PyTree, who: str) -> None:
    leaves = jax.tree_util.tree_leaves(x0)
    if not leaves:
        raise ValueError(f"{who}: x0 is an empty pytree; there is nothing to optimize.")
    for path, leaf in jax.tree_util.tree_leaves_with_path(x0):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{who}: x0{jax.tree_util.keystr(path)} has dtype {dtype}; the variables must "
                "be real floating-point arrays (write x0 as floats, e.g. jnp.asarray(x0, float))."
            )


def check_output(out: jax.ShapeDtypeStruct, who: str, name: str, scalar: bool) -> None:
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(f"{who}: {name} must return one array, got {out!r}.")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{who}: {name} must return floating-point values, got dtype {out.dtype}.")
    if scalar and out.shape != ():
        raise ValueError(
            f"{who}: fun must return a scalar, but it returns an array of shape {out.shape}. "
            "To fit a vector of residuals r(x) (minimizing ½‖r(x)‖²), use least_squares."
        )
    if not scalar and out.shape == ():
        raise ValueError(
            f"{who}: residual_fn must return a vector of residuals, but it returns a scalar. "
            "To minimize a scalar function, use minimize."
        )


def without_aux(fun: Callable[..., Any], has_aux: bool, who: str, name: str) -> Callable[..., Any]:
    """`fun` itself, or with `has_aux` the function returning the first of its pair
    ``(value, aux)`` (a TypeError, at trace time, when `fun` returns no pair)."""
    if not has_aux:
        return fun

    def value_only(x: Any, *args: Any) -> Any:
        out = fun(x, *args)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(
                f"{who}(has_aux=True): {name} must return a pair (value, aux), got "
                f"{type(out).__name__}."
            )
        return out[0]

    return value_only


def check_method(method: str, known: tuple[str, ...], who: str) -> None:
    if method not in known:
        raise ValueError(f"{who}: unknown method {method!r}; known methods: {', '.join(known)}.")


def take_options(options: dict, defaults: dict, method: str, who: str) -> dict:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(
            f"{who}: unknown option(s) {unknown} for method {method!r}; it takes "
            f"{sorted(defaults) or 'no options'}."
        )
    return {**defaults, **options}


def check_max_steps(max_steps: Any, who: str) -> int:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer):
        raise TypeError(f"{who}: max_steps must be a Python int, got {max_steps!r}.")
    if max_steps < 0:
        raise ValueError(f"{who}: max_steps must be >= 0, got {max_steps}.")
    return int(max_steps)


# --------------------------------------------------------------------------- the objective


class Objective:
    """A scalar function of a flat vector, with its derivatives (args closed over)."""

    def __init__(self, fn: Callable[[jax.Array], jax.Array], dtype):
        self.dtype = dtype
        self._fn = lambda z: fn(z).astype(dtype)
        self._vg = jax.value_and_grad(self._fn)

    def value(self, z):
        return self._fn(z)

    def value_and_grad(self, z):
        f, g = self._vg(z)
        return f, g.astype(self.dtype)

    def hessian(self, z):
        h = jax.hessian(self._fn)(z).astype(self.dtype)
        return 0.5 * (h + h.T)

    def hvp_operator(self, z):
        """``v -> H v``, forward-over-reverse, linearized once at `z`."""
        _, lin = jax.linearize(jax.grad(self._fn), z)
        return lin


def measured_decrease(obj, f, fz, g, gz, p, predicted) -> jax.Array:
    """The decrease ``f(x) - f(x+p)`` a step is judged by.

    Once the predicted decrease is below ``√eps · |f|``, the difference of two values is
    dominated by rounding error (the more so when ``f`` sums large terms that cancel), so
    the decrease is estimated from the gradients instead, ``-½ (∇f(x) + ∇f(x+p))ᵀp``
    (exact for quadratics, error ``O(‖p‖³)``), provided the value does not rise by more than
    ``√eps · |f|``: the approximate Armijo condition of Hager & Zhang (2005).
    """
    slack = eps(obj.dtype) ** 0.5 * jnp.abs(f)
    regime = (predicted <= slack) & (fz <= f + slack)
    estimate = -0.5 * jnp.dot(g + gz, p)
    return jnp.where(regime, estimate, f - fz)


def finite(*xs) -> jax.Array:
    out = jnp.asarray(True)
    for x in xs:
        out = out & jnp.all(jnp.isfinite(x))
    return out


def eps(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


# --------------------------------------------------------------------------- methods and driver


class StepOut(NamedTuple):
    """What one iteration of a method produces.

    ``x, f, g`` are the new iterate when ``accepted`` and the old one otherwise. ``status``
    is :data:`~jaxopt2.solvers.solution.RUNNING` unless the method cannot continue.
    """

    x: jax.Array
    f: jax.Array
    g: jax.Array
    state: Any
    accepted: jax.Array
    trial_value: jax.Array
    step_size: jax.Array
    num_hessians: jax.Array
    num_hvps: jax.Array
    status: jax.Array


class Method(NamedTuple):
    init: Callable[[Objective, jax.Array, jax.Array, jax.Array], Any]
    step: Callable[[Objective, jax.Array, jax.Array, jax.Array, Any], StepOut]


class _Loop(NamedTuple):
    x: jax.Array
    f: jax.Array
    g: jax.Array
    gnorm: jax.Array
    state: Any
    k: jax.Array
    nh: jax.Array
    nhvp: jax.Array
    status: jax.Array
    done: jax.Array
    history: Any


def _status_at(gnorm, tol, k, max_steps, status):
    """Why the loop stops at this point (RUNNING if it goes on); convergence wins."""
    return jnp.where(
        gnorm <= tol,
        sol.CONVERGED,
        jnp.where(
            status != sol.RUNNING,
            status,
            jnp.where(k >= max_steps, sol.MAX_STEPS, sol.RUNNING),
        ),
    ).astype(jnp.int32)


def run(
    method: Method,
    obj: Objective,
    x0: jax.Array,
    tol: jax.Array,
    max_steps: int,
    history: bool,
) -> tuple[sol.Solution, sol.History | None]:
    """Run `method` from the flat `x0` in one ``lax.while_loop``; x in the result is flat."""
    dtype = obj.dtype
    f0, g0 = obj.value_and_grad(x0)
    gnorm0 = jnp.linalg.norm(g0)
    ok0 = finite(f0, g0)
    status0 = jnp.where(ok0, sol.RUNNING, sol.NONFINITE).astype(jnp.int32)
    status0 = jnp.where(ok0, _status_at(gnorm0, tol, 0, max_steps, status0), status0)
    i32 = lambda v: jnp.asarray(v, jnp.int32)

    hist = None
    if history:
        n = max_steps + 1
        nan = jnp.full((n,), jnp.nan, dtype)
        hist = sol.History(
            value=nan.at[0].set(f0),
            grad_norm=nan.at[0].set(gnorm0),
            trial_value=nan,
            accepted=jnp.zeros((n,), bool),
            step_size=nan,
        )

    init = _Loop(
        x=x0,
        f=f0,
        g=g0,
        gnorm=gnorm0,
        state=method.init(obj, x0, f0, g0),
        k=i32(0),
        nh=i32(0),
        nhvp=i32(0),
        status=status0,
        done=status0 != sol.RUNNING,
        history=hist,
    )

    def cond(s: _Loop):
        return ~s.done

    def body(s: _Loop):
        out = method.step(obj, s.x, s.f, s.g, s.state)
        moved = out.accepted & finite(out.f, out.g)
        # A method that accepts a non-finite point is overruled: keep the last finite iterate.
        status = jnp.where(
            out.accepted & ~moved, sol.NONFINITE, out.status.astype(jnp.int32)
        ).astype(jnp.int32)
        x = jnp.where(moved, out.x, s.x)
        f = jnp.where(moved, out.f, s.f)
        g = jnp.where(moved, out.g, s.g)
        gnorm = jnp.where(moved, jnp.linalg.norm(out.g), s.gnorm)
        k = s.k + 1
        status = _status_at(gnorm, tol, k, max_steps, status)
        hist = s.history
        if hist is not None:
            hist = sol.History(
                value=hist.value.at[k].set(f),
                grad_norm=hist.grad_norm.at[k].set(gnorm),
                trial_value=hist.trial_value.at[k].set(out.trial_value.astype(dtype)),
                accepted=hist.accepted.at[k].set(moved),
                step_size=hist.step_size.at[k].set(
                    jnp.where(moved, out.step_size, 0).astype(dtype)
                ),
            )
        new = _Loop(
            x=x,
            f=f,
            g=g,
            gnorm=gnorm,
            state=out.state,
            k=k,
            nh=s.nh + i32(out.num_hessians),
            nhvp=s.nhvp + i32(out.num_hvps),
            status=status,
            done=status != sol.RUNNING,
            history=hist,
        )
        # Under vmap the loop runs until every member is done; jax's batching of while_loop
        # keeps a finished member's carry (a select on the batched predicate), so it does
        # not move (tested).
        return new

    s = jax.lax.while_loop(cond, body, init)
    result = sol.Solution(
        x=s.x,
        value=s.f,
        grad_norm=s.gnorm,
        num_steps=s.k,
        num_hessians=s.nh,
        num_hvps=s.nhvp,
        success=s.status == sol.CONVERGED,
        status=s.status,
    )
    return result, s.history


# --------------------------------------------------------------------------- shared pieces


class LineSearch(NamedTuple):
    x: jax.Array
    f: jax.Array
    g: jax.Array
    alpha: jax.Array
    ok: jax.Array
    status: jax.Array  # RUNNING on success, else LINESEARCH_FAILED or NONFINITE


def armijo(
    obj: Objective,
    x: jax.Array,
    f: jax.Array,
    g: jax.Array,
    d: jax.Array,
    *,
    c1: float = 1e-4,
    shrink: float = 0.5,
    max_backtracks: int = 40,
    alpha0: float | jax.Array = 1.0,
    fallback: jax.Array | None = None,
) -> LineSearch:
    """Backtracking line search for the Armijo condition ``f(x+αd) <= f + c1 α ∇fᵀd``.

    `d` must be a descent direction (``∇fᵀd < 0``). Trials with a non-finite value or
    gradient are treated as failures (the step shrinks). The decrease is measured by
    :func:`measured_decrease` (gradient-based once it is below the rounding level of f).

    With a `fallback` direction, a search along `d` that fails after `max_backtracks`
    halvings goes on along `fallback` from ``α = alpha0``, in the same loop: under ``vmap``
    a member whose first search succeeded stops there (two separate searches behind a
    ``lax.cond`` would run both for every member, ``cond`` becoming ``select``).
    """
    dtype = obj.dtype
    per = max_backtracks + 1  # trials along one direction
    total = per if fallback is None else 2 * per
    fb = d if fallback is None else fallback
    gd0, gd1 = jnp.dot(g, d), jnp.dot(g, fb)
    a0 = jnp.asarray(alpha0, dtype)

    def trial(t, alpha):
        second = t >= per
        dd = jnp.where(second, fb, d)
        gd = jnp.where(second, gd1, gd0)
        z = x + alpha * dd
        fz, gz = obj.value_and_grad(z)
        ok_finite = finite(fz, gz)
        decrease = measured_decrease(obj, f, fz, g, gz, alpha * dd, -alpha * gd)
        return z, fz, gz, ok_finite & (decrease >= -c1 * alpha * gd), ok_finite

    def cond(c):
        t, _, _, _, _, ok, _ = c
        return (~ok) & (t < total - 1)

    def body(c):
        t, alpha, _, _, _, _, _ = c
        t = t + 1
        alpha = jnp.where(t == per, a0, alpha * shrink)  # the fallback starts afresh
        z, fz, gz, ok, fin = trial(t, alpha)
        return t, alpha, z, fz, gz, ok, fin

    t0 = jnp.asarray(0, jnp.int32)
    z, fz, gz, ok, fin = trial(t0, a0)
    t, alpha, z, fz, gz, ok, fin = jax.lax.while_loop(cond, body, (t0, a0, z, fz, gz, ok, fin))
    descent = jnp.where(t >= per, gd1, gd0) < 0
    ok = ok & descent
    status = jnp.where(
        ok, sol.RUNNING, jnp.where(fin | ~descent, sol.LINESEARCH_FAILED, sol.NONFINITE)
    )
    return LineSearch(z, fz, gz, alpha, ok, status.astype(jnp.int32))


# The first shift tried, relative to max|Hᵢᵢ|. Nocedal & Wright's Algorithm 3.3 starts at
# 10⁻³ (absolute); on CUTEst's nonlinear least-squares problems, whose Hessians far from the
# solution are indefinite by a sliver next to eigenvalues of 10⁵ and more, a shift of
# 10⁻³·max|Hᵢᵢ| damps the step by orders of magnitude more than positive definiteness needs:
# line-search Newton crawled for 500 iterations on 9 problems that it solves (in 1-451) once
# the sequence starts near the needed shift (experiments/bench_cutest.py, docs/benchmarks.md).
FIRST_SHIFT = 1e-12


def damped_cholesky(h: jax.Array, max_tries: int = 60) -> tuple[jax.Array, jax.Array]:
    """Cholesky factor of ``H + τI`` with the smallest ``τ`` of the sequence 0, β, 10β, ...
    that makes it positive definite (Nocedal & Wright, Algorithm 3.3, with a tenfold
    increase), ``β = 10⁻¹²·max|Hᵢᵢ|`` (:data:`FIRST_SHIFT`): the ``τ`` found is within a
    factor 10 of the smallest shift on that grid, so a Hessian that is indefinite by a sliver
    is damped by a sliver.

    Returns ``(L, τ)`` with ``L Lᵀ = H + τI``; ``τ = 0`` whenever ``H`` is positive definite.
    """
    n = h.shape[0]
    eye = jnp.eye(n, dtype=h.dtype)
    scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(h))), jnp.finfo(h.dtype).tiny ** 0.5)
    beta = FIRST_SHIFT * scale
    chol0 = jnp.linalg.cholesky(h)

    def cond(c):
        i, _, chol = c
        return (~finite(chol)) & (i < max_tries)

    def body(c):
        i, tau, _ = c
        tau = jnp.where(i == 0, beta, 10 * tau)
        return i + 1, tau, jnp.linalg.cholesky(h + tau * eye)

    _, tau, chol = jax.lax.while_loop(
        cond, body, (jnp.asarray(0, jnp.int32), jnp.zeros((), h.dtype), chol0)
    )
    return chol, tau


def cho_solve(chol: jax.Array, b: jax.Array) -> jax.Array:
    return jax.scipy.linalg.cho_solve((chol, True), b)


def refresh(fresh: jax.Array, cached: Any, compute: Callable[[], Any]) -> Any:
    """`cached` when `fresh`, else `compute()` (skipped when fresh, outside of vmap)."""
    return jax.lax.cond(fresh, lambda: cached, compute)


def call_solver(core: Callable[..., Any], jitted: Callable[..., Any], x0: Any, args: Any,
                tol: Any, **static: Any) -> Any:  # fmt: skip
    """Run a solver's `core` on the checked inputs: `tol` resolved in the dtype of `x0`
    (its default when None), the options frozen into a hashable tuple, and the call routed
    through `jitted` (the solver as one compiled program, cached by jax on the static
    arguments: the function, method and options) when it applies. Called outside
    ``jax.jit``, the plain solver would dispatch its loop and, under ``jax.grad``, the
    implicit rule op by op, compiling hundreds of one-op programs on a first call. Python
    numbers among the extra `args` (a function may branch on them) or unhashable options keep
    the plain call."""
    from jax.flatten_util import ravel_pytree

    dtype = jax.eval_shape(lambda x: ravel_pytree(x)[0], x0).dtype
    tol = jnp.asarray(default_tol(dtype) if tol is None else tol, dtype)
    static["opts"] = tuple(sorted(static["opts"].items()))
    solve = core
    try:
        hash(tuple(static.values()))
    except TypeError:
        return core(x0, args, tol, **static)
    if all(isinstance(leaf, jax.Array | np.ndarray) for leaf in jax.tree.leaves(args)):
        solve = jitted
    return solve(x0, args, tol, **static)
