"""Inverse p-th roots of symmetric positive semi-definite matrices, batched.

Kronecker-factored preconditioners (Shampoo, SOAP, K-FAC) need ``(A + λ I)^{-1/p}`` for many
small symmetric PSD matrices ``A``, refreshed every few steps. Conventions of this module:

* ``a`` has shape ``[..., n, n]``; leading axes are a stack of independent matrices, and the
  work is one batched program over the stack (never a Python loop over matrices).
* Damping is *relative*: ``λ = damping · λ_max(A)``, so the result does not depend on the scale
  of the statistics. A zero matrix has no scale: its root is not finite and ``ok`` says so.
* Every matrix product uses ``precision=HIGHEST``. The default precision of GPU/TPU matmuls
  (TF32 / bfloat16 passes) loses the small eigenvalues that the root magnifies.
* ``ok`` (shape ``[...]``) is False where the root is not finite or, for the iterative method,
  did not converge. Callers keep their previous root there.

Two methods:

``"eigh"``
  ``A = Q diag(w) Qᵀ``, then ``Q diag((max(w, 0) + λ)^{-1/p}) Qᵀ``. Any ``p >= 1`` (exponent
  ``1/p`` in (0, 1]). Negative eigenvalues from rounding are clipped to zero before damping.
``"newton"``
  The coupled Newton iteration of Guo & Higham (2006) for integer ``p``: only matrix products,
  no eigensolver. With ``Ã = A + λI`` scaled by ``z = (1 + p) / (2‖Ã‖_F)``,
  ``X₀ = z^{1/p} I``, ``M₀ = z Ã``, and ``T_k = ((p + 1) I − M_k) / p``:
  ``X_{k+1} = X_k T_k``, ``M_{k+1} = T_k^p M_k``; ``M_k → I`` and ``X_k → Ã^{-1/p}``.
  It stops when ``max|M_k − I| <= tol`` or when the error stops decreasing (rounding floor);
  ``λ_max`` for the damping comes from power iteration.

References:
  Guo, Higham. "A Schur-Newton method for the matrix p-th root and its inverse."
  SIAM J. Matrix Anal. Appl. 28(3), 2006.
  Anil, Gupta, Koren, Regan, Singer. "Scalable Second Order Optimization for Deep Learning."
  arXiv:2002.09018 (coupled Newton for Shampoo's roots, relative damping).
"""

from __future__ import annotations

import numbers
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "METHODS",
    "check_root_order",
    "inverse_root_spectrum",
    "matrix_inverse_root",
    "symmetric_eigh",
]

METHODS = ("eigh", "newton")
HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=HIGHEST)


def check_root_order(p: Any, method: str, name: str = "p") -> float:
    """Validate the root order `p` (the result is ``a^{-1/p}``) for `method`; return it.

    ``p >= 1`` (exponent ``1/p`` in (0, 1]) for eigh; a positive integer for coupled Newton.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    # numpy's stubs and typeshed's int() do not accept the numbers ABCs that `p` is narrowed to.
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not np.isfinite(p) or p < 1:  # type: ignore[call-overload]
        raise ValueError(
            f"{name} must be a number >= 1 (the root is a^(-1/{name}), exponent in (0, 1]), "
            f"got {p!r}."
        )
    if method == "newton" and float(p) != int(p):  # type: ignore[call-overload]
        raise ValueError(
            f"{name} must be an integer for method='newton' (coupled Newton computes integer "
            f"roots), got {p!r}; use method='eigh' for other exponents."
        )
    return float(p)


def _compute_dtype(a: jax.Array) -> Any:
    return jnp.promote_types(jnp.result_type(a), jnp.float32)


def symmetric_eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``eigh`` of the symmetric part of `a` (at least float32): ``(w ascending, Q)``."""
    a = a.astype(_compute_dtype(a))
    return jnp.linalg.eigh(0.5 * (a + jnp.swapaxes(a, -1, -2)))


def _finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x), axis=(-2, -1))


def inverse_root_spectrum(w: jax.Array, p: float, damping: Any) -> tuple[jax.Array, jax.Array]:
    """``(max(w, 0) + damping · max(w))^{-1/p}`` for ascending eigenvalues ``w`` ``[..., n]``,
    and whether it is usable (finite, nonzero matrix): the spectrum of the damped root."""
    w_max = w[..., -1:]
    spectrum = (jnp.maximum(w, 0.0) + damping * w_max) ** (-1.0 / p)
    return spectrum, jnp.all(jnp.isfinite(spectrum), axis=-1) & (w_max[..., 0] > 0)


def _eigh_root(a: jax.Array, p: float, damping: Any) -> tuple[jax.Array, jax.Array]:
    w, q = symmetric_eigh(a)
    spectrum, ok = inverse_root_spectrum(w, p, damping)
    root = _mm(q * spectrum[..., None, :], jnp.swapaxes(q, -1, -2))
    return root, ok & _finite(root)


def _power_max_eig(a: jax.Array, num_iters: int) -> jax.Array:
    """Largest eigenvalue of one symmetric PSD matrix by power iteration (Rayleigh quotient)."""
    n = a.shape[-1]
    v0 = jnp.ones((n,), a.dtype) + jnp.linspace(0.0, 1e-3, n, dtype=a.dtype)

    def body(_, v):
        w = jnp.matmul(a, v, precision=HIGHEST)
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(a.dtype).tiny)

    v = jax.lax.fori_loop(0, num_iters, body, v0 / jnp.linalg.norm(v0))
    return jnp.sum(v * jnp.matmul(a, v, precision=HIGHEST))


def _int_power(t: jax.Array, p: int) -> jax.Array:
    """``t^p`` for a static positive integer `p` by repeated squaring."""
    result: jax.Array | None = None
    base = t
    while p:
        if p & 1:
            result = base if result is None else _mm(result, base)
        p >>= 1
        if p:
            base = _mm(base, base)
    # p >= 1 (checked by the callers), so the loop ran and set `result`.
    return cast(jax.Array, result)


def _newton_root_one(
    a: jax.Array, p: int, damping: Any, max_iters: int, tol: float, power_iters: int
) -> tuple[jax.Array, jax.Array]:
    n = a.shape[-1]
    eye = jnp.eye(n, dtype=a.dtype)
    a = 0.5 * (a + a.T)
    lam_max = _power_max_eig(a, power_iters)
    damped = a + damping * lam_max * eye
    z = (1.0 + p) / (2.0 * jnp.linalg.norm(damped))
    x0 = z ** (1.0 / p) * eye
    m0 = z * damped
    err0 = jnp.max(jnp.abs(m0 - eye))

    def cond(carry):
        i, _, _, err, prev_err = carry
        return (i < max_iters) & (err > tol) & (err < prev_err)

    def body(carry):
        i, x, m, err, _ = carry
        t = ((p + 1.0) * eye - m) / p
        x_new = _mm(x, t)
        m_new = _mm(_int_power(t, p), m)
        err_new = jnp.max(jnp.abs(m_new - eye))
        # Keep the iterate with the smaller error: past the rounding floor the error grows.
        better = err_new < err
        x_keep = jnp.where(better, x_new, x)
        m_keep = jnp.where(better, m_new, m)
        return i + 1, x_keep, m_keep, jnp.minimum(err_new, err), err

    init = (jnp.zeros([], jnp.int32), x0, m0, err0, jnp.asarray(jnp.inf, a.dtype))
    _, x, _, err, _ = jax.lax.while_loop(cond, body, init)
    # Converged: the error reached `tol`, or it stalled at the rounding floor of the dtype.
    floor = 1e3 * n * jnp.finfo(a.dtype).eps
    ok = jnp.all(jnp.isfinite(x)) & (err <= jnp.maximum(tol, floor)) & (lam_max > 0)
    return x, ok


def matrix_inverse_root(
    a: jax.Array,
    p: float,
    *,
    method: str = "eigh",
    damping: float | jax.Array = 1e-6,
    max_iters: int = 100,
    tol: float | None = None,
    power_iters: int = 100,
) -> tuple[jax.Array, jax.Array]:
    """``(a + damping · λ_max(a) · I)^{-1/p}`` for a stack of symmetric PSD matrices.

    Args:
      a: ``[..., n, n]`` symmetric positive semi-definite matrices (only the symmetric part is
        used). Computed in ``a``'s dtype, at least float32.
      p: the root order: the result is ``Ã^{-1/p}``. Any number ``>= 1`` for ``"eigh"`` (an
        exponent in (0, 1]); a positive integer for ``"newton"``. Static.
      method: ``"eigh"`` (eigendecomposition; exact up to rounding) or ``"newton"`` (coupled
        Newton iteration; matrix products only). Static.
      damping: relative damping ``ε``: ``ε · λ_max(a)`` is added to the diagonal before the
        root is taken. May be traced.
      max_iters: iteration cap of ``"newton"`` (static).
      tol: ``"newton"`` stops once ``max|M_k − I| <= tol``; default ``1e-6`` in float32 and
        ``1e-12`` in float64 (static).
      power_iters: power-iteration steps that estimate ``λ_max`` for ``"newton"``'s damping.

    Returns:
      ``(root, ok)``: ``root`` with the shape of ``a``; ``ok`` with shape ``a.shape[:-2]``,
      False where the root is not finite, ``a`` is zero, or Newton did not converge.

    Raises:
      ValueError: for an unknown method, ``p < 1``, a non-integer ``p`` with ``"newton"``, a
        negative damping, or a non-square ``a``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxopt2.linalg import matrix_inverse_root
      >>> root, ok = matrix_inverse_root(jnp.diag(jnp.array([16.0, 1.0])), 4, damping=0.0)
      >>> [round(float(x), 4) for x in jnp.diag(root)], bool(ok)
      ([0.5, 1.0], True)
    """
    p = check_root_order(p, method)
    a = jnp.asarray(a)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"matrix_inverse_root needs square matrices [..., n, n], got {a.shape}.")
    if isinstance(damping, numbers.Real) and not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}.")
    a = a.astype(_compute_dtype(a))
    if method == "eigh":
        return _eigh_root(a, p, damping)
    if tol is None:
        tol = 1e-12 if a.dtype == jnp.float64 else 1e-6
    one = lambda m: _newton_root_one(m, int(p), damping, max_iters, tol, power_iters)
    batch = a.shape[:-2]
    flat = a.reshape((-1, *a.shape[-2:]))
    root, ok = jax.vmap(one)(flat)
    return root.reshape(a.shape), ok.reshape(batch)
