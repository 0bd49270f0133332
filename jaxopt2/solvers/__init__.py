"""Second-order solvers for small and medium unconstrained problems.

:func:`minimize` (Newton with damping and line search, exact trust region, Newton-CG, cubic
regularization, lazy-Hessian cubic Newton, damped Newton with the O(k⁻³) Root Newton or the
AICN step-size schedule, saddle-free Newton) and :func:`least_squares` (Gauss-Newton,
Levenberg-Marquardt). Each solve is one
``lax.while_loop`` over flat vectors, so it runs under ``jax.jit`` and ``jax.vmap``; the
solution is differentiable with respect to the extra arguments by implicit differentiation.
"""

from jaxopt2.solvers.least_squares import LEAST_SQUARES_METHODS, least_squares
from jaxopt2.solvers.minimize import MINIMIZE_METHODS, minimize
from jaxopt2.solvers.solution import (
    CONVERGED,
    LINESEARCH_FAILED,
    MAX_STEPS,
    NONFINITE,
    STATUS,
    STEP_TOO_SMALL,
    History,
    Solution,
    status_message,
)

__all__ = [
    "CONVERGED",
    "LEAST_SQUARES_METHODS",
    "LINESEARCH_FAILED",
    "MAX_STEPS",
    "MINIMIZE_METHODS",
    "NONFINITE",
    "STATUS",
    "STEP_TOO_SMALL",
    "History",
    "Solution",
    "least_squares",
    "minimize",
    "status_message",
]
