"""Differentiating a solution with respect to ``args`` by the implicit function theorem.

At a minimizer ``x*(a)`` of ``f(·, a)`` the gradient vanishes, ``∇ₓf(x*(a), a) = 0``;
differentiating this identity gives ``dx*/da = -H⁻¹ ∂ₐ∇ₓf`` with ``H = ∇²ₓₓf(x*, a)``. The
reverse-mode rule for a cotangent ``x̄`` is therefore ``ā = -(∂ₐ∇ₓf)ᵀ H⁻¹ x̄``: one linear
solve with ``H`` and one vector-Jacobian product of ``a -> ∇ₓf(x*, a)``. The optimal value
``f(x*(a), a)`` has ``df*/da = ∂ₐf(x*, a)`` (the envelope theorem, ``∇ₓf = 0``), so a
cotangent on ``Solution.value`` is supported as well. The loop itself is never
differentiated; ``x0`` gets a zero cotangent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt2.linalg import cg

PyTree = Any


def dense_solve(objective, xs, args, rhs):
    """``H⁻¹ rhs`` with the dense Hessian of ``objective(·, args)`` at ``xs``."""
    h = jax.hessian(objective)(xs, args)
    return jnp.linalg.solve(0.5 * (h + h.T), rhs)


def cg_solve(objective, xs, args, rhs):
    """``H⁻¹ rhs`` by conjugate gradients on Hessian-vector products (no dense Hessian)."""
    _, lin = jax.linearize(jax.grad(lambda z: objective(z, args)), xs)
    rtol = 10 * jnp.finfo(rhs.dtype).eps
    return cg(lin, rhs, rtol=rtol, maxiter=10 * rhs.shape[0]).x


def solve_with_implicit_diff(
    solve: Callable[[jax.Array, PyTree, jax.Array], Any],
    objective: Callable[[jax.Array, PyTree], jax.Array],
    linear_solve: Callable,
    x0: jax.Array,
    args: PyTree,
    tol: jax.Array,
):
    """``solve(x0, args, tol)`` (returning ``(Solution, history)`` with a flat ``x``) with an
    implicit-differentiation VJP with respect to ``args``."""

    @jax.custom_vjp
    def run(x0, args, tol):
        return solve(x0, args, tol)

    def fwd(x0, args, tol):
        out = solve(x0, args, tol)
        return out, (out[0].x, args, tol)

    def bwd(res, cot):
        xs, a, tol = res
        sol_bar = cot[0]
        w = linear_solve(objective, xs, a, sol_bar.x.astype(xs.dtype))

        def grad_and_value(a_):
            return jax.grad(objective)(xs, a_), objective(xs, a_)

        _, vjp = jax.vjp(grad_and_value, a)
        (a_bar,) = vjp((-w, jnp.asarray(sol_bar.value, xs.dtype)))
        return jnp.zeros_like(xs), a_bar, jnp.zeros_like(tol)

    run.defvjp(fwd, bwd)
    return run(x0, args, tol)
