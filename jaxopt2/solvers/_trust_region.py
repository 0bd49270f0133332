"""Trust-region Newton methods: ``trust_region`` (exact subproblem from the dense Hessian's
eigendecomposition) and ``newton_cg`` (matrix-free Steihaug-Toint conjugate gradients).

Both use the same radius rule (Nocedal & Wright, Algorithm 4.1, the defaults of scipy's
``trust-exact``): ``ρ = (f(x) - f(x+p)) / (m(0) - m(p))``; ``ρ < 1/4`` shrinks the radius to
a quarter of itself (not of ``‖p‖``, which is smaller after an interior step); ``ρ > 3/4`` with
``p`` on the boundary doubles it (at most ``max_radius``); the step is taken when ``ρ > eta``.
A trial point with a non-finite value or gradient counts as ``ρ = -∞``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt2.solvers import solution as sol
from jaxopt2.solvers._core import Method, StepOut, eps, finite, measured_decrease, refresh
from jaxopt2.solvers._subproblems import trust_region_subproblem

TRUST_REGION_OPTIONS = {"initial_radius": 1.0, "max_radius": 1000.0, "eta": 0.15}
NEWTON_CG_OPTIONS = {
    **TRUST_REGION_OPTIONS,
    "cg_maxiter": None,
    "preconditioner": None,
    "diagonal_probes": 8,
}
PRECONDITIONERS = (None, "diagonal")


def _ratio(obj, f, g, p, pred, fz, gz):
    """Measured over predicted decrease (see :func:`measured_decrease`); -inf for a
    non-finite trial."""
    fin = finite(fz, gz)
    actual = measured_decrease(obj, f, fz, g, gz, p, pred)
    rho = jnp.where(pred > 0, actual / jnp.where(pred > 0, pred, 1), -jnp.inf)
    return jnp.where(fin, rho, -jnp.inf), fin


def _update_radius(opts, radius, rho, pnorm, on_boundary):
    shrink = rho < 0.25
    grow = (rho > 0.75) & on_boundary
    return jnp.where(
        shrink,
        0.25 * radius,
        jnp.where(grow, jnp.minimum(2 * radius, opts["max_radius"]), radius),
    )


def _stop_status(x, radius, fin, accepted, dtype):
    """STEP_TOO_SMALL / NONFINITE once the radius no longer changes x."""
    collapsed = (~accepted) & (radius <= eps(dtype) * (1 + jnp.linalg.norm(x)))
    return jnp.where(
        collapsed, jnp.where(fin, sol.STEP_TOO_SMALL, sol.NONFINITE), sol.RUNNING
    ).astype(jnp.int32)


class _TRState(NamedTuple):
    w: jax.Array
    v: jax.Array
    fresh: jax.Array  # (w, v) is the eigendecomposition of the Hessian at the current x
    radius: jax.Array


def trust_region(opts: dict) -> Method:
    """Trust-region Newton with the exact subproblem solution (Moré & Sorensen, 1983).

    Each new iterate costs one dense Hessian and one ``eigh``; rejected steps reuse them. The
    subproblem ``min gᵀp + ½pᵀHp, ‖p‖ <= Δ`` is solved exactly in the eigenbasis (see
    :func:`~jaxopt2.solvers._subproblems.trust_region_subproblem`), the hard case included,
    so indefinite Hessians give steps along negative curvature, never ascent.
    """

    def init(obj, x, f, g):
        n = x.shape[0]
        return _TRState(
            w=jnp.zeros((n,), obj.dtype),
            v=jnp.eye(n, dtype=obj.dtype),
            fresh=jnp.asarray(False),
            radius=jnp.asarray(opts["initial_radius"], obj.dtype),
        )

    def step(obj, x, f, g, st):
        w, v = refresh(st.fresh, (st.w, st.v), lambda: tuple(jnp.linalg.eigh(obj.hessian(x))))
        sub = trust_region_subproblem(w, v, g, st.radius)
        z = x + sub.p
        fz, gz = obj.value_and_grad(z)
        rho, fin = _ratio(obj, f, g, sub.p, sub.model_decrease, fz, gz)
        accepted = rho > opts["eta"]
        radius = _update_radius(opts, st.radius, rho, jnp.linalg.norm(sub.p), sub.on_boundary)
        return StepOut(
            x=jnp.where(accepted, z, x),
            f=jnp.where(accepted, fz, f),
            g=jnp.where(accepted, gz, g),
            state=_TRState(w, v, ~accepted, radius),
            accepted=accepted,
            trial_value=fz,
            step_size=jnp.asarray(1, obj.dtype),
            num_hessians=jnp.where(st.fresh, 0, 1).astype(jnp.int32),
            num_hvps=jnp.asarray(0, jnp.int32),
            status=_stop_status(x, radius, fin, accepted, obj.dtype),
        )

    return Method(init, step)


class Steihaug(NamedTuple):
    p: jax.Array
    model_decrease: jax.Array
    on_boundary: jax.Array
    num_iters: jax.Array


def _to_boundary(z, d, radius):
    """The τ >= 0 with ‖z + τd‖ = radius, for ‖z‖ <= radius (stable quadratic root)."""
    a = jnp.dot(d, d)
    b = 2 * jnp.dot(z, d)
    c = jnp.dot(z, z) - radius**2
    disc = jnp.sqrt(jnp.maximum(b * b - 4 * a * c, 0))
    return jnp.where(b <= 0, (-b + disc) / (2 * a), -2 * c / (b + disc))


def steihaug_cg(hvp, g, radius, rtol, maxiter) -> Steihaug:
    """Approximately ``min gᵀp + ½pᵀHp`` subject to ``‖p‖ <= radius`` by CG on ``Hp = -g``
    from ``p = 0`` (Steihaug 1983, Toint 1981; Nocedal & Wright, Algorithm 7.2).

    Stops when the residual ``‖Hp + g‖ <= rtol``, when an iterate would leave the region
    (then the step ends on the boundary along the current direction), or on a direction of
    non-positive curvature ``dᵀHd <= 0`` (then it follows that direction to the boundary).
    The model decrease ``-(gᵀp + ½pᵀHp)`` is accumulated along the way without extra
    products. ``num_iters`` counts Hessian-vector products.
    """
    dtype = g.dtype

    def cond(c):
        i, _, _, _, _, _, done = c
        return (i < maxiter) & ~done

    def body(c):
        i, z, r, d, m, _, _ = c
        hd = hvp(d)
        dhd = jnp.dot(d, hd)
        rr = jnp.dot(r, r)
        alpha = rr / jnp.where(dhd > 0, dhd, 1)
        z_try = z + alpha * d
        leave = (dhd <= 0) | (jnp.linalg.norm(z_try) >= radius)
        tau = _to_boundary(z, d, radius)
        step = jnp.where(leave, tau, alpha)
        # m(z + s d) = m(z) + s rᵀd + ½ s² dᵀHd, with r = Hz + g
        m_new = m + step * jnp.dot(r, d) + 0.5 * step * step * dhd
        z_new = z + step * d
        r_new = r + step * hd
        beta = jnp.dot(r_new, r_new) / jnp.where(rr > 0, rr, 1)
        d_new = -r_new + beta * d
        done = leave | (jnp.linalg.norm(r_new) <= rtol)
        return i + 1, z_new, r_new, d_new, m_new, leave, done

    zero = jnp.zeros_like(g)
    init = (
        jnp.asarray(0, jnp.int32),
        zero,
        g,
        -g,
        jnp.zeros((), dtype),
        jnp.asarray(False),
        jnp.linalg.norm(g) <= rtol,
    )
    i, z, _, _, m, boundary, _ = jax.lax.while_loop(cond, body, init)
    return Steihaug(p=z, model_decrease=-m, on_boundary=boundary, num_iters=i)


class _CGState(NamedTuple):
    radius: jax.Array
    k: jax.Array  # iterations so far: the diagonal preconditioner's probes are drawn from it


def hutchinson_diagonal(hvp, n, num_probes, key, dtype) -> jax.Array:
    """``diag(H) ≈ mean_k z_k ⊙ H z_k`` over Rademacher probes ``z_k`` (exact for a
    diagonal ``H``; the error of entry ``i`` scales with ``Σ_{j≠i} H_ij²``)."""
    z = jax.random.rademacher(key, (num_probes, n), dtype=dtype)
    return jnp.mean(z * jax.vmap(hvp)(z), axis=0)


def jacobi_scaling(diag: jax.Array) -> jax.Array:
    """``d ∝ √|diag|``, ``|diag|`` floored at ``√eps · max|diag|`` (and at the smallest normal
    number), normalized to a root-mean-square of 1: the scaled Hessian ``D⁻¹HD⁻¹`` has a
    constant diagonal where the diagonal is trustworthy, and the ellipsoid ``‖Dp‖ <= Δ`` keeps
    the size of the Euclidean region (the radius and its cap mean what they mean without
    preconditioning, whatever the Hessian's scale)."""
    a = jnp.abs(diag)
    tiny = jnp.finfo(diag.dtype).tiny
    floor = jnp.maximum(eps(diag.dtype) ** 0.5 * jnp.max(a), tiny)
    a = jnp.where(jnp.isfinite(a), a, floor)
    a = jnp.maximum(a, floor)
    return jnp.sqrt(a / jnp.mean(a))


def newton_cg(opts: dict) -> Method:
    """Matrix-free trust-region Newton-CG (Steihaug-Toint), like scipy's ``trust-ncg``.

    No Hessian is formed: each CG iteration is one Hessian-vector product, forward-over-
    reverse (``jax.jvp`` of ``jax.grad``, linearized once per iteration), counted in
    ``num_hvps``. CG stops at the relative residual ``min(1/2, √‖g‖)`` (superlinear local
    convergence), at the boundary, or on negative curvature (then the step goes to the
    boundary along it). ``cg_maxiter`` defaults to ``10 · dim``.

    ``preconditioner="diagonal"``: Jacobi preconditioning with ``D ∝ √|diag H|`` (normalized to
    a root-mean-square of 1, so the radius keeps its Euclidean scale) estimated
    each iteration by Hutchinson's method from ``diagonal_probes`` Rademacher probes (one
    batched Hessian-vector product, counted in ``num_hvps``): CG runs on ``D⁻¹HD⁻¹`` and
    ``D⁻¹g``, so the trust region is the ellipsoid ``‖Dp‖ <= Δ`` (Nocedal & Wright §7.2,
    "preconditioning"). It pays on badly scaled, diagonally dominant Hessians.
    """
    precond = opts["preconditioner"]
    if precond not in PRECONDITIONERS:
        raise ValueError(
            f"newton_cg: unknown preconditioner {precond!r}; expected None or 'diagonal'"
        )
    probes = int(opts["diagonal_probes"])
    if precond is not None and probes < 1:
        raise ValueError(f"newton_cg: diagonal_probes must be at least 1, got {probes}")

    def init(obj, x, f, g):
        return _CGState(jnp.asarray(opts["initial_radius"], obj.dtype), jnp.asarray(0, jnp.int32))

    def step(obj, x, f, g, st):
        n = x.shape[0]
        maxiter = opts["cg_maxiter"] or 10 * n
        hvp = obj.hvp_operator(x)
        gnorm = jnp.linalg.norm(g)
        extra = jnp.asarray(0, jnp.int32)
        if precond == "diagonal":
            key = jax.random.fold_in(jax.random.key(0), st.k)
            d = jacobi_scaling(hutchinson_diagonal(hvp, n, probes, key, obj.dtype))
            extra = jnp.asarray(probes, jnp.int32)
            gs = g / d
            rtol = jnp.minimum(0.5, jnp.sqrt(gnorm)) * jnp.linalg.norm(gs)
            sub = steihaug_cg(lambda v: hvp(v / d) / d, gs, st.radius, rtol, maxiter)
            p = sub.p / d
        else:
            rtol = jnp.minimum(0.5, jnp.sqrt(gnorm)) * gnorm
            sub = steihaug_cg(hvp, g, st.radius, rtol, maxiter)
            p = sub.p
        z = x + p
        fz, gz = obj.value_and_grad(z)
        rho, fin = _ratio(obj, f, g, p, sub.model_decrease, fz, gz)
        accepted = rho > opts["eta"]
        radius = _update_radius(opts, st.radius, rho, jnp.linalg.norm(sub.p), sub.on_boundary)
        return StepOut(
            x=jnp.where(accepted, z, x),
            f=jnp.where(accepted, fz, f),
            g=jnp.where(accepted, gz, g),
            state=_CGState(radius, st.k + 1),
            accepted=accepted,
            trial_value=fz,
            step_size=jnp.asarray(1, obj.dtype),
            num_hessians=jnp.asarray(0, jnp.int32),
            num_hvps=sub.num_iters + extra,
            status=_stop_status(x, radius, fin, accepted, obj.dtype),
        )

    return Method(init, step)
