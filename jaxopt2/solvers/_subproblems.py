"""Exact solutions of the trust-region and cubic-regularization subproblems from an
eigendecomposition ``H = V diag(w) Vᵀ`` (``w`` ascending, as ``jnp.linalg.eigh`` returns).

Both minimizers have the form ``p(λ) = -(H + λI)⁻¹ g`` with ``λ >= max(0, -w₁)``, so in the
eigenbasis ``‖p(λ)‖² = Σᵢ ĝᵢ² / (wᵢ + λ)²`` (``ĝ = Vᵀg``) and the subproblem reduces to one
scalar equation in ``λ`` (the *secular equation*), solved here by Newton's method started
from a lower bound of the root: the function iterated on is concave and increasing, so the
iterates increase monotonically to the root (Moré & Sorensen, 1983).

The *hard case* (``g`` orthogonal to the eigenspace of ``w₁ < 0``, so ``‖p(λ)‖`` stays finite
as ``λ -> -w₁``) is detected with a tolerance: when the root would lie closer to ``-w₁``
than the eigenvalues can resolve, the step is ``p(-w₁)`` computed on the other eigenvectors
plus the multiple of the first eigenvector that reaches the required length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_MAX_NEWTON = 100


class Subproblem(NamedTuple):
    p: jax.Array  # the step
    model_decrease: jax.Array  # -(gᵀp + ½ pᵀHp), the quadratic model's decrease
    on_boundary: jax.Array  # trust region: ‖p‖ = radius
    lam: jax.Array  # the multiplier λ


def _eps(dtype):
    return jnp.finfo(dtype).eps


def _quadratic_decrease(w, gt, pt):
    return -(jnp.dot(gt, pt) + 0.5 * jnp.dot(w, pt * pt))


def _hard_case_parts(w, gt, lam_hc):
    """Norm of p(lam_hc) without the eigenspace of w₁, that step, and ‖ĝ‖ on that eigenspace."""
    dtype = w.dtype
    scale = jnp.maximum(jnp.max(jnp.abs(w)), jnp.finfo(dtype).tiny)
    in_first = (w - w[0]) <= 1e3 * _eps(dtype) * scale
    den = jnp.where(in_first, 1, w + lam_hc)
    pt = jnp.where(in_first, 0, -gt / den)
    g_first = jnp.linalg.norm(jnp.where(in_first, gt, 0))
    return pt, jnp.linalg.norm(pt), g_first, scale


def _norm_and_slope(w, gt, lam):
    """``‖p(λ)‖`` and ``Σ ĝᵢ²/(wᵢ+λ)³``; terms with ``wᵢ + λ = 0`` (where ``ĝᵢ = 0``) are 0."""
    den = w + lam
    ok = den > 0
    inv = jnp.where(ok, 1 / jnp.where(ok, den, 1), 0)
    return jnp.linalg.norm(gt * inv), jnp.sum(gt * gt * inv**3)


def _newton_secular(step, lam0, done0):
    """Iterate ``lam <- step(lam)`` (returns new lam and a converged flag) from `lam0`."""

    def cond(c):
        i, _, done = c
        return (i < _MAX_NEWTON) & ~done

    def body(c):
        i, lam, _ = c
        lam_new, done = step(lam)
        done = done | (lam_new <= lam)  # monotone from the left: no progress means converged
        return i + 1, jnp.maximum(lam_new, lam), done

    _, lam, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), lam0, done0))
    return lam


def trust_region_subproblem(w, V, g, radius) -> Subproblem:
    """``argmin gᵀp + ½ pᵀHp`` subject to ``‖p‖ <= radius`` (exact, hard case included)."""
    dtype = w.dtype
    eps = _eps(dtype)
    gt = V.T @ g
    w1 = w[0]
    lam_hc = jnp.maximum(0.0, -w1)

    # Interior: H positive definite and the Newton step fits.
    pt_int = -gt / jnp.where(w > 0, w, 1)
    interior = (w1 > 0) & (jnp.linalg.norm(pt_int) <= radius)

    # Hard case.
    pt_pinv, s_pinv, g_first, scale = _hard_case_parts(w, gt, lam_hc)
    room = jnp.sqrt(jnp.maximum(radius**2 - s_pinv**2, 0))
    hard = (w1 <= 0) & (s_pinv < radius) & (g_first <= 1e3 * eps * scale * room)
    tau = jnp.where(w1 < 0, room, 0) * jnp.where(gt[0] > 0, -1, 1)
    pt_hard = pt_pinv.at[0].add(tau)

    # Boundary: ‖p(λ)‖ = radius, Newton on 1/‖p(λ)‖ - 1/radius from a lower bound.
    lam0 = jnp.maximum(lam_hc, jnp.max(jnp.abs(gt) / radius - w))
    lam0 = jnp.where(interior | hard, lam_hc + 1, lam0)  # any safe value: result unused

    def step(lam):
        s, q = _norm_and_slope(w, gt, lam)
        converged = jnp.abs(s - radius) <= 10 * eps * radius
        return lam + (s - radius) / radius * s * s / q, converged

    lam = _newton_secular(step, lam0, interior | hard)
    pt_bnd = -gt / (w + lam)
    pt_bnd = pt_bnd * (radius / jnp.linalg.norm(pt_bnd))

    pt = jnp.where(interior, pt_int, jnp.where(hard, pt_hard, pt_bnd))
    lam = jnp.where(interior, 0.0, jnp.where(hard, lam_hc, lam))
    return Subproblem(
        p=V @ pt,
        model_decrease=_quadratic_decrease(w, gt, pt),
        on_boundary=~interior,
        lam=lam,
    )


def cubic_subproblem(w, V, g, sigma) -> Subproblem:
    """``argmin gᵀp + ½ pᵀHp + (σ/3)‖p‖³`` (the global minimizer; Cartis, Gould & Toint 2011).

    The minimizer satisfies ``(H + λI) p = -g`` with ``λ = σ‖p‖ >= max(0, -w₁)``; Newton's
    method runs on ``1/‖p(λ)‖ - σ/λ``, concave and increasing in ``λ``. ``model_decrease``
    is the decrease of the quadratic part alone (the cubic term is added by the caller).
    """
    dtype = w.dtype
    eps = _eps(dtype)
    tiny = jnp.finfo(dtype).tiny
    gt = V.T @ g
    w1 = w[0]
    lam_hc = jnp.maximum(0.0, -w1)

    pt_pinv, s_pinv, g_first, scale = _hard_case_parts(w, gt, lam_hc)
    target = lam_hc / sigma
    room = jnp.sqrt(jnp.maximum(target**2 - s_pinv**2, 0))
    hard = (w1 < 0) & (s_pinv < target) & (g_first <= 1e3 * eps * scale * room)
    tau = room * jnp.where(gt[0] > 0, -1, 1)
    pt_hard = pt_pinv.at[0].add(tau)

    # Lower bound: λ* >= tᵢ, the positive root of t (wᵢ + t) = σ|ĝᵢ|.
    a = sigma * jnp.abs(gt)
    root = jnp.sqrt(w * w + 4 * a)
    t = jnp.where(w > 0, 2 * a / jnp.where(w > 0, w + root, 1), 0.5 * (root - w))
    lam0 = jnp.maximum(jnp.maximum(lam_hc, jnp.max(t)), tiny)
    lam0 = jnp.where(hard, lam_hc + 1, lam0)

    def step(lam):
        s, q = _norm_and_slope(w, gt, lam)
        psi = 1 / s - sigma / lam
        dpsi = q / s**3 + sigma / lam**2
        converged = jnp.abs(s - lam / sigma) <= 10 * eps * s
        return lam - psi / dpsi, converged

    lam = _newton_secular(step, lam0, hard)
    pt_reg = -gt / (w + lam)
    pt = jnp.where(hard, pt_hard, pt_reg)
    lam = jnp.where(hard, lam_hc, lam)
    return Subproblem(
        p=V @ pt,
        model_decrease=_quadratic_decrease(w, gt, pt),
        on_boundary=jnp.asarray(False),
        lam=lam,
    )
