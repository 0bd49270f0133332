"""Newton-type training-loop optimizers: Hessian-free (truncated-Newton) optimization.

``hessian_free`` (Martens, 2010). Each update approximately solves

.. math::

   (C + λ I)\\, s = g

by conjugate gradients, where ``g`` is the incoming gradient and ``C`` is a curvature matrix
applied matrix-free, and returns ``s``; with ``learning_rate`` 1 (the default) the parameter
step is ``-s``, the minimizer of the damped quadratic model
``q(-s) = f - gᵀs + ½ sᵀ(C + λI)s``.

Curvature ``C`` (argument ``curvature``, decided when the update is traced):

* ``"gauss_newton"``: the Gauss-Newton matrix ``G = Jᵀ H_out J`` of the loss tagged with
  :func:`jaxopt2.tag_loss` (``J`` the Jacobian of the tagged outputs, ``H_out`` the exact
  Hessian of the named loss with respect to the outputs, each row weighted as the tagged
  loss weights it: :func:`jaxopt2.curvature.tags.row_weights`, ``1/N`` for ``N`` rows, so a
  ``[B, T, V]`` tag gives the curvature of the mean over all ``B·T`` tokens), applied
  as one JVP and one VJP of the model per product. Positive semi-definite, so with ``λ > 0``
  CG meets no negative curvature. Terms of ``value_fn`` outside the tagged loss (an L2
  penalty, say) enter the gradient and the reduction ratio but not ``G``; the damping
  ``λ I`` stands in for them.
* ``"hessian"``: Hessian-vector products of ``value_fn`` (forward-over-reverse, linearized
  once per update). Where ``H + λI`` has a direction of negative curvature CG stops on it
  after one step along it with the curvature's absolute value (a descent step for the
  model), so an indefinite Hessian never gives an ascent step of the model.
* ``"auto"`` (default): ``"gauss_newton"`` when ``value_fn`` has a tagged loss,
  ``"hessian"`` otherwise.

Conjugate gradients: warm-started from ``warm_start_decay`` times the previous solution
(from zero when that start is worse than zero for the current model), at most
``max_cg_iters`` iterations, stopped early by Martens' relative-progress test (after ``i``
iterations, with ``k = max(10, ⌈i/10⌉)``, stop once ``φ_i < 0`` and
``(φ_i - φ_{i-k}) / φ_i < k · cg_progress_tol``, with ``φ`` the quadratic model CG
minimizes) or by the residual test ``‖r‖ <= cg_rtol · ‖g‖``.

Damping: Levenberg-Marquardt from the reduction ratio
``ρ = (f(θ - s) - f(θ)) / q(-s)`` (one extra ``value_fn`` evaluation per update, on the same
batch): ``λ ← λ · damping_increase`` when ``ρ < 1/4``, ``λ ← λ · damping_decrease`` when
``ρ > 3/4``, kept within ``[min_damping, max_damping]``. A step that does not decrease the
loss on the batch (``ρ <= 0``, or a non-finite ``f(θ - s)``) is rejected: the update is zero
and only the damping grows. The ratio is measured for the full step ``s``: a learning rate
other than 1 or added weight decay change the step actually taken, not the test.

Differences from Martens (2010): no backtracking over the CG iterates, no preconditioner
for CG, and the curvature and gradient come from the same batch (``value_fn``); the model
in ``ρ`` is the damped one that CG minimizes. Non-finite gradients, losses or CG solutions give a
zero update and keep the last good state, ``cg_iters`` included (counted in
``num_nonfinite``).

References:
  J. Martens. "Deep learning via Hessian-free optimization." ICML 2010.
  J. Martens and I. Sutskever. "Training deep and recurrent networks with Hessian-free
  optimization." Neural Networks: Tricks of the Trade, 2012.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt2._tree import add_scale, all_finite, check_choice
from jaxopt2.curvature.products import hessian_operator, output_fisher_vp
from jaxopt2.curvature.tags import row_weights, split_loss
from jaxopt2.optimizers import registry
from jaxopt2.optimizers._contract import (
    check_learning_rate,
    check_number,
    require_value_fn,
    static_dtype,
    static_int,
)
from jaxopt2.optimizers._deprecation import keyword_only

PyTree = Any

__all__ = [
    "CURVATURES",
    "ScaleByHessianFreeState",
    "hessian_free",
    "scale_by_hessian_free",
    "truncated_cg",
]

CURVATURES = ("auto", "gauss_newton", "hessian")


class ScaleByHessianFreeState(NamedTuple):
    """State of :func:`scale_by_hessian_free` (arrays only).

    Attributes:
      count: number of updates taken (int32).
      direction: the last CG solution ``s`` (``stats_dtype``), the next warm start.
      damping: the current Levenberg-Marquardt damping ``λ``.
      rho: the last reduction ratio.
      cg_iters: CG iterations of the last finite update (int32).
      num_rejected: updates whose step did not decrease the loss (zero update).
      num_nonfinite: updates with a non-finite gradient, loss or CG solution (zero update).
    """

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax
    direction: optax.Updates
    damping: jax.Array
    rho: jax.Array
    cg_iters: jax.Array
    num_rejected: jax.Array
    num_nonfinite: jax.Array


class TruncatedCG(NamedTuple):
    """What :func:`truncated_cg` returns: the solution, the model value
    ``φ(x) = ½ xᵀAx - bᵀx`` there, and the number of iterations (matvecs after the start)."""

    x: PyTree
    model_value: jax.Array
    num_iters: jax.Array


def truncated_cg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree,
    *,
    max_iters: int,
    rtol: float | jax.Array = 1e-5,
    progress_tol: float | jax.Array = 5e-4,
) -> TruncatedCG:
    """Minimize ``φ(x) = ½ xᵀAx - bᵀx`` by CG from `x0`, with Martens' stopping rules.

    Starts from `x0` unless ``φ(x0) >= 0`` (then from zero); stops after `max_iters`
    iterations, on ``‖b - Ax‖ <= rtol ‖b‖``, on Martens' relative-progress test (see the
    module docstring), or on a direction ``p`` with ``pᵀAp <= 0``, after a step along it of
    length ``rᵀr / |pᵀAp|`` (which decreases ``φ``). `b` and `x0` must share dtypes.
    """
    dtype = jnp.result_type(*jax.tree.leaves(b))
    ax0 = matvec(x0)
    phi0 = 0.5 * optax.tree.vdot(x0, ax0) - optax.tree.vdot(b, x0)
    use_x0 = jnp.isfinite(phi0) & (phi0 < 0)
    x = jax.tree.map(lambda u: jnp.where(use_x0, u, jnp.zeros_like(u)), x0)
    r = jax.tree.map(lambda bb, a: jnp.where(use_x0, bb - a, bb).astype(bb.dtype), b, ax0)
    phi0 = jnp.where(use_x0, phi0, 0).astype(dtype)
    rs = optax.tree.vdot(r, r).astype(dtype)
    threshold_sq = (rtol * rtol * optax.tree.vdot(b, b)).astype(dtype)
    phis = jnp.zeros(max_iters + 1, dtype).at[0].set(phi0)

    def cond(carry):
        _, _, _, rs, i, _, stop = carry
        return (i < max_iters) & (rs > threshold_sq) & ~stop

    def body(carry):
        x, r, p, rs, i, phis, _ = carry
        ap = matvec(p)
        pap = optax.tree.vdot(p, ap).astype(dtype)
        negative = pap <= 0
        alpha = (rs / jnp.where(negative, -pap, pap)).astype(dtype)
        alpha = jnp.where(jnp.isfinite(alpha), alpha, 0).astype(dtype)
        x = add_scale(x, alpha, p)
        r = add_scale(r, -alpha, ap)
        rs_new = optax.tree.vdot(r, r).astype(dtype)
        p = add_scale(r, rs_new / jnp.where(rs > 0, rs, 1), p)
        phi = (-0.5 * optax.tree.vdot(x, jax.tree.map(jnp.add, r, b))).astype(dtype)
        i = i + 1
        phis = phis.at[i].set(phi)
        k = jnp.maximum(10, jnp.ceil(0.1 * i).astype(jnp.int32))
        old = phis[jnp.maximum(i - k, 0)]
        stalled = (
            (i > k) & (phi < 0) & ((phi - old) / jnp.where(phi < 0, phi, -1) < k * progress_tol)
        )
        return x, r, p, rs_new, i, phis, negative | stalled

    init = (x, r, r, rs, jnp.asarray(0, jnp.int32), phis, jnp.asarray(False))
    x, _, _, _, num_iters, phis, _ = jax.lax.while_loop(cond, body, init)
    return TruncatedCG(x, phis[num_iters], num_iters)


def _has_loss_tag(value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> bool:
    try:
        split_loss(value_fn, params)
    except ValueError as err:
        if "no tagged loss" in str(err):
            return False
        raise
    return True


def _curvature_matvec(
    value_fn: Callable[[PyTree], jax.Array], params: PyTree, curvature: str
) -> Callable[[PyTree], PyTree]:
    """``v -> C v`` in the dtypes of `params` (see the module docstring)."""
    if curvature == "auto":
        curvature = "gauss_newton" if _has_loss_tag(value_fn, params) else "hessian"
    if curvature == "hessian":
        return hessian_operator(value_fn, params)
    try:
        split = split_loss(value_fn, params)
    except ValueError as err:
        raise ValueError(
            "hessian_free(curvature='gauss_newton') needs the loss tagged with "
            "jaxopt2.tag_loss(loss_name, outputs, targets); use curvature='hessian' (or "
            f"'auto') for an untagged loss. ({err})"
        ) from None
    outputs, jvp_fn = jax.linearize(split.model_fn, params)
    _, vjp_fn = jax.vjp(split.model_fn, params)
    c = row_weights(outputs, split.weights)  # the tagged loss's weight of each row

    def gauss_newton(v: PyTree) -> PyTree:
        jv = jvp_fn(v)
        return vjp_fn((c * output_fisher_vp(split.loss, outputs, jv)).astype(outputs.dtype))[0]

    return gauss_newton


def scale_by_hessian_free(
    damping: float = 1.0,
    max_cg_iters: int | None = None,
    cg_rtol: float = 1e-5,
    cg_progress_tol: float = 5e-4,
    warm_start_decay: float = 0.95,
    damping_increase: float = 1.5,
    damping_decrease: float = 2.0 / 3.0,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    curvature: str = "auto",
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Replace the gradient ``g`` by the truncated-CG solution ``s`` of ``(C + λI) s = g``.

    Args:
      damping: the initial Levenberg-Marquardt damping ``λ`` (adapted every update).
      max_cg_iters: the CG iteration cap (static; None: 50).
      cg_rtol: CG stops when ``‖residual‖ <= cg_rtol · ‖g‖``.
      cg_progress_tol: Martens' relative-progress tolerance ``ε`` (5e-4 in the paper).
      warm_start_decay: CG starts from this times the previous solution (0 for a cold
        start).
      damping_increase: factor (> 1) applied to ``λ`` when ``ρ < 1/4``.
      damping_decrease: factor (in (0, 1]) applied to ``λ`` when ``ρ > 3/4``.
      min_damping: lower bound of ``λ`` (> 0 keeps the system positive definite).
      max_damping: upper bound of ``λ``.
      curvature: ``"auto"``, ``"gauss_newton"`` or ``"hessian"`` (static; see the module
        docstring).
      stats_dtype: dtype of CG and of the state (float32 by default, whatever the parameter
        dtype); products run in the parameters' dtype.

    Structural arguments default to None rather than their value so that
    ``optax.inject_hyperparams(hessian_free)`` leaves them alone (see
    :func:`jaxopt2.inject_hyperparams`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and the
      extra argument ``value_fn``.
    """
    check_number(damping, "damping", low=0.0, low_inclusive=False)
    max_cg_iters = static_int(max_cg_iters, "max_cg_iters", 50, who="hessian_free")
    stats_dtype = static_dtype(stats_dtype, who="hessian_free")
    check_number(cg_rtol, "cg_rtol", low=0.0)
    check_number(cg_progress_tol, "cg_progress_tol", low=0.0)
    check_number(warm_start_decay, "warm_start_decay", low=0.0, high=1.0)
    check_number(damping_increase, "damping_increase", low=1.0)
    check_number(damping_decrease, "damping_decrease", low=0.0, high=1.0, low_inclusive=False)
    check_number(min_damping, "min_damping", low=0.0, low_inclusive=False)
    check_number(max_damping, "max_damping", low=0.0, low_inclusive=False)
    check_choice(curvature, "curvature", CURVATURES)

    def init_fn(params: optax.Params) -> ScaleByHessianFreeState:
        return ScaleByHessianFreeState(
            count=jnp.zeros([], jnp.int32),
            direction=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), stats_dtype), params),
            damping=jnp.asarray(damping, stats_dtype),
            rho=jnp.zeros([], stats_dtype),
            cg_iters=jnp.zeros([], jnp.int32),
            num_rejected=jnp.zeros([], jnp.int32),
            num_nonfinite=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, key=None, **extra):
        del key, extra
        value_fn = require_value_fn(value_fn, "scale_by_hessian_free")
        if params is None:
            raise ValueError(
                "scale_by_hessian_free needs params: call update(grads, state, params)."
            )
        product = _curvature_matvec(value_fn, params, curvature)
        lam = state.damping
        # Python floats and injected (possibly float64) arrays give the same float32 numbers.
        hp = lambda x: jnp.asarray(x, stats_dtype)

        def matvec(v: PyTree) -> PyTree:
            cv = product(jax.tree.map(lambda x, p: x.astype(p.dtype), v, params))
            return jax.tree.map(lambda c, x: c.astype(stats_dtype) + lam * x, cv, v)

        g = jax.tree.map(lambda x: x.astype(stats_dtype), updates)
        x0 = jax.tree.map(lambda d: (hp(warm_start_decay) * d).astype(stats_dtype), state.direction)
        sol = truncated_cg(
            matvec,
            g,
            x0,
            max_iters=max_cg_iters,
            rtol=hp(cg_rtol),
            progress_tol=hp(cg_progress_tol),
        )
        f0 = value_fn(params)
        # A non-finite loss at the current point is a bad batch like a non-finite gradient.
        finite = (
            all_finite(sol.x) & all_finite(g) & jnp.isfinite(sol.model_value) & jnp.isfinite(f0)
        )
        s = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), sol.x)

        f1 = value_fn(jax.tree.map(lambda p, x: (p - x.astype(p.dtype)).astype(p.dtype), params, s))
        decrease = (f1 - f0).astype(stats_dtype)
        model = sol.model_value
        rho = jnp.where(model < 0, decrease / jnp.where(model < 0, model, -1), 0.5)
        rho = jnp.where(jnp.isfinite(rho), rho, -jnp.inf).astype(stats_dtype)
        accepted = finite & (rho > 0)

        new_lam = jnp.where(
            rho < 0.25,
            lam * hp(damping_increase),
            jnp.where(rho > 0.75, lam * hp(damping_decrease), lam),
        )
        new_lam = jnp.clip(new_lam, hp(min_damping), hp(max_damping)).astype(stats_dtype)
        new_lam = jnp.where(finite, new_lam, lam)

        new_updates = jax.tree.map(
            lambda x, u: jnp.where(accepted, x, jnp.zeros_like(x)).astype(u.dtype), s, updates
        )
        direction = jax.tree.map(lambda x, d: jnp.where(finite, x, d), s, state.direction)
        new_state = ScaleByHessianFreeState(
            count=optax.safe_increment(state.count),
            direction=direction,
            damping=new_lam,
            rho=jnp.where(finite, rho, state.rho).astype(stats_dtype),
            cg_iters=jnp.where(finite, sol.num_iters, state.cg_iters),
            num_rejected=state.num_rejected + (finite & ~accepted).astype(jnp.int32),
            num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@keyword_only(added=("mask",))
def hessian_free(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    damping: float = 1.0,
    max_cg_iters: int | None = None,
    cg_rtol: float = 1e-5,
    cg_progress_tol: float = 5e-4,
    warm_start_decay: float = 0.95,
    damping_increase: float = 1.5,
    damping_decrease: float = 2.0 / 3.0,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    weight_decay: float = 0.0,
    mask: Any = None,
    curvature: str = "auto",
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Hessian-free optimization (Martens, 2010): a damped truncated-Newton step per update.

    ``hessian_free = chain(scale_by_hessian_free, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``, the weight decay on the leaves `mask` selects
    (as in ``optax.adamw``: a pytree of bools like the parameters or a function of them;
    None: every leaf); see :func:`scale_by_hessian_free` for the other arguments and the
    module docstring for the curvature, CG and damping rules. The step is the CG solution
    itself, so ``learning_rate`` defaults to 1.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> loss_fn = lambda w, a: 0.5 * jnp.sum(a * (w - 1.0) ** 2)
      >>> a = jnp.array([1.0, 10.0, 100.0])
      >>> opt = jaxopt2.hessian_free(damping=1e-3)
      >>> w = jnp.zeros(3); state = opt.init(w)
      >>> step = jax.jit(lambda w, s: jaxopt2.value_and_update(opt, loss_fn, w, s, a))
      >>> for i in range(3):
      ...     loss, updates, state = step(w, state)
      ...     w = optax.apply_updates(w, updates)
      >>> bool(loss_fn(w, a) < 1e-6)
      True
    """
    check_learning_rate(learning_rate, "hessian_free")
    check_number(weight_decay, "weight_decay", low=0.0, schedule=True)
    return optax.chain(
        scale_by_hessian_free(
            damping=damping,
            max_cg_iters=max_cg_iters,
            cg_rtol=cg_rtol,
            cg_progress_tol=cg_progress_tol,
            warm_start_decay=warm_start_decay,
            damping_increase=damping_increase,
            damping_decrease=damping_decrease,
            min_damping=min_damping,
            max_damping=max_damping,
            curvature=curvature,
            stats_dtype=stats_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


registry.register(
    "hessian_free",
    hessian_free,
    needs_value_fn=True,
    needs_key=False,
    static_args=("mask", "max_cg_iters", "curvature", "stats_dtype"),
)
