"""Differential operators of a function of its inputs from univariate Taylor-mode jets.

The Stochastic Taylor Derivative Estimator (STDE; Shi, Hu, Lin & Kawaguchi, NeurIPS 2024):
for ``u: Rᵈ -> R`` and a random direction ``v``, the ``k``-th derivative of ``t -> u(x + tv)``
at ``t = 0`` is ``Dᵏu(x)[v, ..., v]``, and one Taylor-mode pass
(:func:`jax.experimental.jet.jet`) gives all of them up to order ``k`` at a cost of a small
multiple of one evaluation of ``u`` — no Hessian, no reverse pass. Averages over directions
with the right moments are unbiased estimates of differential operators:

* Laplacian ``Δu = tr ∇²u``: ``E[D²u[v, v]] = Δu`` for any ``v`` with ``E[vvᵀ] = I``
  (Rademacher or standard Gaussian entries);
* biharmonic ``Δ²u = Σᵢⱼ ∂ᵢ²∂ⱼ²u``: for standard Gaussian ``v``,
  ``E[vᵢvⱼvₖvₗ] = δᵢⱼδₖₗ + δᵢₖδⱼₗ + δᵢₗδⱼₖ``, so ``E[D⁴u[v, v, v, v]] = 3 Δ²u``
  (Rademacher directions are biased here: ``E[vᵢ⁴] = 1``, not 3).

These are the building blocks of physics-informed losses (a PDE residual at collocation
points): ``jax.vmap`` the estimator over the points. ``u`` takes one floating-point array
(any shape; directions have its shape) and returns a scalar; it must be made of primitives
that ``jet`` supports (the usual elementwise functions, ``dot``, reductions, ...).

:func:`laplacian` and :func:`biharmonic` are the exact operators by the same jets along the
``d`` coordinate directions (``d`` jets for the Laplacian, ``d²`` for the biharmonic through
the polarization identity below), for small ``d`` and as references.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import jet

from jaxopt2._tree import PROBE_DISTRIBUTIONS, check_choice, check_positive_int

__all__ = [
    "biharmonic",
    "directional_derivatives",
    "laplacian",
    "stde_biharmonic",
    "stde_laplacian",
]

Fn = Callable[[jax.Array], jax.Array]


def _check_input(x: jax.Array, who: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{who}: x has dtype {x.dtype}; the input must be a floating-point array")
    return x


def _check_scalar_output(fn: Fn, x: jax.Array, who: str) -> None:
    out = jax.eval_shape(fn, x)
    if getattr(out, "shape", None) != ():
        raise ValueError(
            f"{who}: fn must return a scalar, got shape {getattr(out, 'shape', type(out))}; "
            "vmap the estimator over points instead of returning a vector"
        )


def directional_derivatives(fn: Fn, x: jax.Array, v: jax.Array, order: int) -> jax.Array:
    """``[Dᵏfn(x)[v, ..., v] for k = 1..order]`` from one Taylor-mode jet along ``x + tv``.

    Args:
      fn: ``x -> scalar``.
      x: the point, a floating-point array.
      v: the direction, shaped like `x`.
      order: the highest derivative (a static positive int).

    Returns:
      An array of length `order` in `x`'s dtype: entry ``k - 1`` is the ``k``-th derivative of
      ``t -> fn(x + tv)`` at 0 (not divided by ``k!``).
    """
    order = check_positive_int(order, "order")
    x = _check_input(x, "directional_derivatives")
    v = jnp.asarray(v, x.dtype)
    if v.shape != x.shape:
        raise ValueError(
            f"directional_derivatives: v has shape {v.shape} but x has shape {x.shape}"
        )
    zeros = jnp.zeros_like(x)
    _, series = jet.jet(fn, (x,), ((v, *([zeros] * (order - 1))),))
    return jnp.stack([jnp.asarray(s, x.dtype) for s in series])


def _directions(key: jax.Array, x: jax.Array, num: int, dist: str) -> jax.Array:
    shape = (num, *x.shape)
    if dist == "rademacher":
        return jax.random.rademacher(key, shape, dtype=x.dtype)
    return jax.random.normal(key, shape, dtype=x.dtype)


def stde_laplacian(
    fn: Fn,
    x: jax.Array,
    key: jax.Array,
    num_samples: int = 16,
    *,
    dist: str = "rademacher",
) -> jax.Array:
    """An unbiased estimate of the Laplacian ``Σᵢ ∂ᵢ²fn(x)``: the mean of ``D²fn(x)[v, v]``
    over `num_samples` random directions (second-order jets, vmapped).

    Args:
      fn: ``x -> scalar``.
      x: the point, a floating-point array of any shape (the Laplacian is over all entries).
      key: a PRNG key.
      num_samples: directions (a static positive int); the variance falls as 1/num_samples
        (for Rademacher directions it is ``2 Σ_{i≠j} (∂ᵢ∂ⱼfn)² / num_samples``).
      dist: ``"rademacher"`` (default; the lower variance) or ``"gaussian"``.

    Returns:
      A scalar in `x`'s dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxopt2.curvature import stde_laplacian
      >>> u = lambda x: jnp.sum(x**2)  # Δu = 2d
      >>> round(float(stde_laplacian(u, jnp.ones(5), jax.random.key(0), 4)), 4)
      10.0
    """
    num_samples = check_positive_int(num_samples, "num_samples")
    check_choice(dist, "dist", PROBE_DISTRIBUTIONS)
    x = _check_input(x, "stde_laplacian")
    _check_scalar_output(fn, x, "stde_laplacian")
    vs = _directions(key, x, num_samples, dist)
    second = jax.vmap(lambda v: directional_derivatives(fn, x, v, 2)[1])(vs)
    return jnp.mean(second)


def stde_biharmonic(fn: Fn, x: jax.Array, key: jax.Array, num_samples: int = 16) -> jax.Array:
    """An unbiased estimate of the biharmonic ``Δ²fn(x) = Σᵢⱼ ∂ᵢ²∂ⱼ²fn(x)``: a third of the
    mean of ``D⁴fn(x)[v, v, v, v]`` over `num_samples` standard Gaussian directions
    (fourth-order jets, vmapped; ``E[D⁴fn[v]⁴] = 3 Δ²fn`` needs Gaussian moments).

    Args:
      fn: ``x -> scalar``.
      x: the point, a floating-point array of any shape.
      key: a PRNG key.
      num_samples: directions (a static positive int).

    Returns:
      A scalar in `x`'s dtype.
    """
    num_samples = check_positive_int(num_samples, "num_samples")
    x = _check_input(x, "stde_biharmonic")
    _check_scalar_output(fn, x, "stde_biharmonic")
    vs = _directions(key, x, num_samples, "gaussian")
    fourth = jax.vmap(lambda v: directional_derivatives(fn, x, v, 4)[3])(vs)
    return jnp.mean(fourth) / 3


def _basis(x: jax.Array) -> jax.Array:
    return jnp.eye(x.size, dtype=x.dtype).reshape(x.size, *x.shape)


def laplacian(fn: Fn, x: jax.Array) -> jax.Array:
    """The exact Laplacian ``Σᵢ ∂ᵢ²fn(x)``: one second-order jet per coordinate direction
    (``x.size`` jets, vmapped). For small inputs and as the reference of
    :func:`stde_laplacian`."""
    x = _check_input(x, "laplacian")
    _check_scalar_output(fn, x, "laplacian")
    return jnp.sum(jax.vmap(lambda e: directional_derivatives(fn, x, e, 2)[1])(_basis(x)))


def biharmonic(fn: Fn, x: jax.Array) -> jax.Array:
    """The exact biharmonic ``Σᵢⱼ ∂ᵢ²∂ⱼ²fn(x)`` from fourth-order jets along ``eᵢ`` and
    ``eᵢ ± eⱼ``: ``D⁴[eᵢ+eⱼ] + D⁴[eᵢ-eⱼ] = 2∂ᵢ⁴ + 2∂ⱼ⁴ + 12∂ᵢ²∂ⱼ²`` (the odd mixed terms
    cancel), so ``∂ᵢ²∂ⱼ² = (D⁴[eᵢ+eⱼ] + D⁴[eᵢ-eⱼ] - 2∂ᵢ⁴ - 2∂ⱼ⁴) / 12``. ``O(d²)`` jets: for
    small inputs and as the reference of :func:`stde_biharmonic`."""
    x = _check_input(x, "biharmonic")
    _check_scalar_output(fn, x, "biharmonic")
    e = _basis(x)
    d4 = lambda v: directional_derivatives(fn, x, v, 4)[3]
    pure = jax.vmap(d4)(e)  # ∂ᵢ⁴
    plus = jax.vmap(lambda a: jax.vmap(lambda b: d4(a + b))(e))(e)
    minus = jax.vmap(lambda a: jax.vmap(lambda b: d4(a - b))(e))(e)
    mixed = (plus + minus - 2 * pure[:, None] - 2 * pure[None, :]) / 12
    n = x.size
    off = jnp.sum(jnp.where(jnp.eye(n, dtype=bool), 0, mixed))
    return jnp.sum(pure) + off
