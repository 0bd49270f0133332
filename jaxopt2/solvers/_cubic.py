"""Cubic-regularized Newton: ``cubic`` (adaptive regularization, ARC) and ``lazy_newton``
(the same step with a Hessian refreshed only every ``m`` iterations).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt2.solvers import solution as sol
from jaxopt2.solvers._core import Method, StepOut, eps, finite, measured_decrease, refresh
from jaxopt2.solvers._subproblems import cubic_subproblem

CUBIC_OPTIONS = {"sigma": 1.0, "sigma_min": 1e-10, "eta1": 0.1, "eta2": 0.9, "gamma": 2.0}
LAZY_NEWTON_OPTIONS = {**CUBIC_OPTIONS, "hessian_every": 5}


class _CubicState(NamedTuple):
    w: jax.Array
    v: jax.Array
    fresh: jax.Array  # cubic: (w, v) belongs to the current x; lazy: unused
    age: jax.Array  # lazy: iterations since the Hessian was computed
    sigma: jax.Array


def _build(opts: dict, lazy: bool) -> Method:
    every = int(opts["hessian_every"]) if lazy else 1
    if lazy and every < 1:
        raise ValueError(f"hessian_every must be a positive integer, got {every}.")

    def init(obj, x, f, g):
        n = x.shape[0]
        return _CubicState(
            w=jnp.zeros((n,), obj.dtype),
            v=jnp.eye(n, dtype=obj.dtype),
            fresh=jnp.asarray(False),
            age=jnp.asarray(every, jnp.int32),  # forces a Hessian at the first iteration
            sigma=jnp.asarray(opts["sigma"], obj.dtype),
        )

    def step(obj, x, f, g, st):
        dtype = obj.dtype
        keep = (st.age < every) if lazy else st.fresh
        w, v = refresh(keep, (st.w, st.v), lambda: tuple(jnp.linalg.eigh(obj.hessian(x))))
        age = jnp.where(keep, st.age, 0) + 1
        sigma = st.sigma
        sub = cubic_subproblem(w, v, g, sigma)
        pnorm = jnp.linalg.norm(sub.p)
        pred = sub.model_decrease - sigma / 3 * pnorm**3  # f - m(p), cubic term included
        z = x + sub.p
        fz, gz = obj.value_and_grad(z)
        fin = finite(fz, gz)
        actual = measured_decrease(obj, f, fz, g, gz, sub.p, pred)
        rho = jnp.where(pred > 0, actual / jnp.where(pred > 0, pred, 1), -jnp.inf)
        rho = jnp.where(fin, rho, -jnp.inf)
        accepted = rho >= opts["eta1"]
        sigma_new = jnp.where(
            rho >= opts["eta2"],
            jnp.maximum(sigma / opts["gamma"], opts["sigma_min"]),
            jnp.where(accepted, sigma, opts["gamma"] * sigma),
        )
        collapsed = (~accepted) & (pnorm <= eps(dtype) * (1 + jnp.linalg.norm(x)))
        status = jnp.where(
            collapsed, jnp.where(fin, sol.STEP_TOO_SMALL, sol.NONFINITE), sol.RUNNING
        )
        return StepOut(
            x=jnp.where(accepted, z, x),
            f=jnp.where(accepted, fz, f),
            g=jnp.where(accepted, gz, g),
            state=_CubicState(w, v, ~accepted, age, sigma_new.astype(dtype)),
            accepted=accepted,
            trial_value=fz,
            step_size=jnp.asarray(1, dtype),
            num_hessians=jnp.where(keep, 0, 1).astype(jnp.int32),
            num_hvps=jnp.asarray(0, jnp.int32),
            status=status.astype(jnp.int32),
        )

    return Method(init, step)


def cubic(opts: dict) -> Method:
    """Adaptive cubic regularization of Newton's method (Nesterov & Polyak 2006; Cartis,
    Gould & Toint 2011, ARC).

    Each iteration minimizes ``m(p) = f + gᵀp + ½pᵀHp + (σ/3)‖p‖³`` exactly (global
    minimizer from the eigendecomposition and a 1-D Newton solve of the secular equation
    ``‖p(λ)‖ = λ/σ``, hard case included), then compares ``ρ = (f(x) - f(x+p)) / (f(x) - m(p))``
    with ``eta1 = 0.1`` / ``eta2 = 0.9``: ``ρ >= eta2`` accepts and divides ``σ`` by
    ``gamma = 2`` (not below ``sigma_min``), ``ρ >= eta1`` accepts, otherwise the step is
    rejected and ``σ`` multiplied by ``gamma``. Options: ``sigma`` (initial σ, default 1).
    """
    return _build(opts, lazy=False)


def lazy_newton(opts: dict) -> Method:
    """Cubic Newton with lazy Hessians (Doikov, Chayti & Jaggi, ICML 2023).

    The step of :func:`cubic` with a fresh gradient at every iteration but a Hessian (and
    its eigendecomposition) computed only every ``hessian_every`` iterations (default 5;
    the paper's analysis favours ``m = dim`` for large problems, where one Hessian costs
    about ``dim`` gradients) and reused in between, rejected steps included. The
    regularization ``σ`` adapts as in ARC, which stands in for the paper's
    ``M``-parameter (there a fixed multiple of the Hessian's Lipschitz constant).
    """
    return _build(opts, lazy=True)
