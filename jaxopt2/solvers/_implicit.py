"""Differentiating a solution with respect to ``args`` by the implicit function theorem.

At a minimizer ``x*(a)`` of ``f(·, a)`` the gradient vanishes, ``∇ₓf(x*(a), a) = 0``;
differentiating this identity gives ``dx*/da = -H⁻¹ ∂ₐ∇ₓf`` with ``H = ∇²ₓₓf(x*, a)``. The
forward-mode rule for a tangent ``ȧ`` is therefore ``ẋ = -H⁻¹ (∂ₐ∇ₓf) ȧ``: one Jacobian-vector
product of ``a -> ∇ₓf(x*, a)`` and one linear solve with ``H``. The optimal value
``f(x*(a), a)`` has ``df*/da = ∂ₐf(x*, a)`` (the envelope theorem, ``∇ₓf = 0``). The rule is
linear in ``ȧ`` and transposable, so jax derives reverse mode from it
(``ā = -(∂ₐ∇ₓf)ᵀ H⁻¹ x̄``, the same solve transposed: ``H`` is symmetric). The loop itself is
never differentiated; ``x0`` gets a zero tangent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt2.linalg import cg

PyTree = Any


def dense_solve(objective, xs, args, rhs):
    """``H⁻¹ rhs`` with the dense Hessian of ``objective(·, args)`` at ``xs``, as a linear
    function of ``rhs`` that jax can transpose (``lax.custom_linear_solve``)."""
    h = jax.hessian(objective)(xs, args)
    h = 0.5 * (h + h.T)
    return jax.lax.custom_linear_solve(
        lambda v: h @ v, rhs, lambda _, b: jnp.linalg.solve(h, b), symmetric=True
    )


def cg_solve(objective, xs, args, rhs):
    """``H⁻¹ rhs`` by conjugate gradients on Hessian-vector products (no dense Hessian)."""
    _, lin = jax.linearize(jax.grad(lambda z: objective(z, args)), xs)
    rtol = 10 * jnp.finfo(rhs.dtype).eps
    maxiter = 10 * rhs.shape[0]
    return jax.lax.custom_linear_solve(
        lin, rhs, lambda mv, b: cg(mv, b, rtol=rtol, maxiter=maxiter).x, symmetric=True
    )


def _zero_tangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def solve_with_implicit_diff(
    solve: Callable[[jax.Array, PyTree, jax.Array], Any],
    objective: Callable[[jax.Array, PyTree], jax.Array],
    linear_solve: Callable,
    x0: jax.Array,
    args: PyTree,
    tol: jax.Array,
):
    """``solve(x0, args, tol)`` (returning ``(Solution, history)`` with a flat ``x``),
    differentiable with respect to ``args`` by the implicit function theorem.

    The rule is a JVP, ``ẋ = -H⁻¹ (∂ₐ∇ₓf) ȧ`` and ``ḟ* = (∂ₐf) ȧ``, linear in ``ȧ`` and built
    from transposable operations (the solve is a ``lax.custom_linear_solve``), so forward
    mode (``jax.jvp``, ``jax.jacfwd``) and reverse mode (``jax.grad``, ``jax.vjp``: jax
    transposes the rule) both work. ``x0``, ``tol``, the gradient norm, the counters and the
    history get zero tangents.
    """

    @jax.custom_jvp
    def run(x0, args, tol):
        return solve(x0, args, tol)

    @run.defjvp
    def run_jvp(primals, tangents):
        x0, a, tol = primals
        _, a_dot, _ = tangents
        out = solve(x0, a, tol)
        xs = jax.lax.stop_gradient(out[0].x)

        def grad_and_value(a_):
            return jax.grad(objective)(xs, a_), objective(xs, a_)

        _, (b, value_dot) = jax.jvp(grad_and_value, (a,), (a_dot,))
        x_dot = -linear_solve(objective, xs, a, b.astype(xs.dtype))
        tangent = jax.tree.map(_zero_tangent, out)
        sol_dot = tangent[0]._replace(x=x_dot, value=jnp.asarray(value_dot, xs.dtype))
        return out, (sol_dot, tangent[1])

    return run(x0, args, tol)
