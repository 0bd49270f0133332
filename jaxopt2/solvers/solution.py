"""What the solvers return: :class:`Solution`, :class:`History` and the status codes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

__all__ = [
    "CONVERGED",
    "LINESEARCH_FAILED",
    "MAX_STEPS",
    "NONFINITE",
    "STATUS",
    "STEP_TOO_SMALL",
    "History",
    "Solution",
    "status_message",
]

RUNNING = -1  # internal: the loop is still going (never returned)
CONVERGED = 0
MAX_STEPS = 1
NONFINITE = 2
LINESEARCH_FAILED = 3
STEP_TOO_SMALL = 4

STATUS: dict[int, str] = {
    CONVERGED: "converged: the gradient norm is at most tol",
    MAX_STEPS: "max_steps reached before the gradient norm got below tol",
    NONFINITE: "non-finite value or gradient: stopped at the last finite iterate",
    LINESEARCH_FAILED: "line search failed: no step along the search direction decreases the value",
    STEP_TOO_SMALL: (
        "step too small: the trust region (or regularization) shrank until steps no longer "
        "change the iterate"
    ),
}


def status_message(code) -> str:
    """The reason behind a :class:`Solution` status code (an int or a 0-d array).

    >>> status_message(0)
    'converged: the gradient norm is at most tol'
    """
    code = int(code)
    if code not in STATUS:
        raise ValueError(f"unknown status code {code}; known codes: {sorted(STATUS)}.")
    return STATUS[code]


class Solution(NamedTuple):
    """The result of :func:`jaxopt2.solvers.minimize` or :func:`~jaxopt2.solvers.least_squares`.

    Every field is an array, so a solution passes through ``jit`` and ``vmap`` (batched fields
    gain a leading axis).

    Attributes:
      x: the final iterate, a pytree shaped like ``x0``.
      value: the objective at `x` (for ``least_squares``: ``½‖r(x)‖²``).
      grad_norm: the Euclidean norm of the gradient at `x` (for ``least_squares``: of
        ``J(x)ᵀ r(x)``).
      num_steps: iterations run, rejected trust-region / regularization steps included (like
        scipy's ``nit``), int32.
      num_hessians: dense Hessian evaluations (for ``least_squares``: Jacobian evaluations),
        int32.
      num_hvps: Hessian-vector products (``newton_cg``; 0 for the dense methods), int32.
      success: ``status == CONVERGED``.
      status: an int32 code; :func:`status_message` (or the :data:`STATUS` table) says why the
        solver stopped.
      aux: with ``has_aux=True``, the auxiliary output of the function at `x` (a pytree);
        None otherwise.
    """

    x: object
    value: jax.Array
    grad_norm: jax.Array
    num_steps: jax.Array
    num_hessians: jax.Array
    num_hvps: jax.Array
    success: jax.Array
    status: jax.Array
    aux: Any = None


class History(NamedTuple):
    """Per-iteration record, returned with ``history=True``; arrays of length ``max_steps + 1``.

    Entry 0 describes ``x0``; entry ``k`` the state after iteration ``k``; entries past
    ``num_steps`` are NaN (``accepted``: False).

    Attributes:
      value: the objective at the current iterate (unchanged by a rejected step).
      grad_norm: the gradient norm at the current iterate.
      trial_value: the objective at the point tried in iteration ``k`` (the accepted point for
        line-search methods; NaN at entry 0).
      accepted: whether iteration ``k`` moved the iterate.
      step_size: the line-search or damped-Newton step size ``α`` of iteration ``k`` (1 for
        trust-region and cubic steps; 0 when rejected).
    """

    value: jax.Array
    grad_norm: jax.Array
    trial_value: jax.Array
    accepted: jax.Array
    step_size: jax.Array
