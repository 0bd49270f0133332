"""Conjugate gradients for symmetric positive-definite operators on pytrees.

``jax.scipy.sparse.linalg.cg`` solves the same systems but returns only the solution (its
``info`` is always ``None``): it does not say how many iterations it ran, how small the
residual got, or whether the tolerance was met. Truncated-Newton and Hessian-free methods
need exactly that, so :func:`cg` reports all three. Like jax's solver it is a single
``lax.while_loop``, so it runs under ``jit`` and ``vmap`` and accepts traced tolerances.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt2._tree import (
    add_scale,
    check_hyperparameter,
    check_inexact,
    check_like,
    check_positive_int,
)

PyTree = Any

__all__ = ["CGResult", "cg"]


class CGResult(NamedTuple):
    """What :func:`cg` returns.

    Attributes:
      x: the approximate solution, a pytree shaped like ``b``.
      num_iters: the number of CG iterations run (one matvec each), an int32 scalar.
      residual_norm: the Euclidean norm of the final (recursively updated) residual
        ``b - A x``.
      converged: whether ``residual_norm <= max(rtol * ||b||, atol)``.
    """

    x: PyTree
    num_iters: jax.Array
    residual_norm: jax.Array
    converged: jax.Array


def cg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    *,
    x0: PyTree | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
) -> CGResult:
    """Solve ``A x = b`` by conjugate gradients, for a symmetric positive-definite ``A``.

    The iteration stops when ``||b - A x|| <= max(rtol * ||b||, atol)``, after `maxiter`
    iterations, or when it meets a direction of non-positive curvature ``pᵀ A p <= 0`` (then
    ``A`` is not positive definite; the iterate reached so far is returned and ``converged``
    is False unless the residual test already holds).

    Args:
      matvec: the linear map ``v -> A v`` on pytrees shaped like `b`. ``A`` must be
        symmetric positive definite (for example a damped Gauss-Newton or Fisher product).
      b: the right-hand side, a pytree of real floating-point arrays.
      x0: the starting guess, shaped like `b` (default zeros).
      rtol: relative tolerance on the residual norm (relative to ``||b||``).
      atol: absolute tolerance on the residual norm.
      maxiter: the maximum number of iterations (default ``10 * dim``).

    Returns:
      A :class:`CGResult` ``(x, num_iters, residual_norm, converged)``.

    Raises:
      TypeError: if `b` has non-floating leaves.
      ValueError: if `x0` does not match `b`, a tolerance is negative, or `maxiter` is not a
        positive integer.

    References:
      M. R. Hestenes and E. Stiefel, "Methods of conjugate gradients for solving linear
      systems", J. Res. Nat. Bur. Standards 49 (1952).
      J. Nocedal and S. J. Wright, "Numerical Optimization", 2nd ed., Algorithm 5.2.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxopt2.linalg import cg
      >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
      >>> res = cg(lambda v: A @ v, jnp.array([1.0, 2.0]), rtol=1e-6)
      >>> int(res.num_iters), bool(res.converged)
      (2, True)
    """
    check_inexact(b, "b")
    if x0 is not None:
        check_like(x0, b, "x0", "b")
    check_hyperparameter(rtol, "rtol", low=0.0)
    check_hyperparameter(atol, "atol", low=0.0)
    if maxiter is None:
        maxiter = 10 * optax.tree.size(b)
    maxiter = check_positive_int(maxiter, "maxiter")

    b = jax.tree.map(jnp.asarray, b)
    if x0 is None:
        x = jax.tree.map(jnp.zeros_like, b)
        r = b
    else:
        x = jax.tree.map(lambda u, v: jnp.asarray(u, v.dtype), x0, b)
        r = add_scale(b, -1.0, matvec(x))
    rs = optax.tree.vdot(r, r)
    dtype = rs.dtype
    threshold = jnp.maximum(rtol * jnp.sqrt(optax.tree.vdot(b, b)), atol).astype(dtype)
    threshold_sq = threshold * threshold

    def cond(carry):
        _, _, _, rs, i, curvature_ok = carry
        return (i < maxiter) & (rs > threshold_sq) & curvature_ok

    def body(carry):
        x, r, p, rs, i, _ = carry
        ap = matvec(p)
        pap = optax.tree.vdot(p, ap).astype(dtype)
        curvature_ok = pap > 0
        alpha = jnp.where(curvature_ok, rs / jnp.where(curvature_ok, pap, 1), 0).astype(dtype)
        x = add_scale(x, alpha, p)
        r = add_scale(r, -alpha, ap)
        rs_new = optax.tree.vdot(r, r).astype(dtype)
        beta = rs_new / jnp.where(rs > 0, rs, 1)
        p = add_scale(r, beta, p)
        return x, r, p, rs_new, i + 1, curvature_ok

    init = (x, r, r, rs, jnp.asarray(0, jnp.int32), jnp.asarray(True))
    x, _, _, rs, num_iters, _ = jax.lax.while_loop(cond, body, init)
    return CGResult(
        x=x,
        num_iters=num_iters,
        residual_norm=jnp.sqrt(rs),
        converged=rs <= threshold_sq,
    )
