"""Exact Gauss-Newton (EGN): the damped Gauss-Newton step of the minibatch, solved exactly in
the space of the batch's outputs.

Korbit, Adeoye, Bemporad & Rodriguez, "Exact Gauss-Newton Optimization for Training Deep
Neural Networks" (2024). For a tagged loss ``L = Σ_r c_r ℓ_r(f_r(θ))`` (:func:`jaxopt2.tag_loss`)
with ``J`` the Jacobian of the ``N`` tagged outputs (rows × classes) in the ``d`` parameters
and ``H`` the loss's Hessian in the outputs (block-diagonal, ``c_r`` times each row's
output-space Fisher), the Gauss-Newton matrix is ``G = JᵀHJ`` (``d × d``, never formed) and
the step direction ``-(G + λI)⁻¹ g``. By the Duncan-Guttman (Woodbury) identity

.. math::

   (\\lambda I + J^\\top H J)^{-1} g
      = \\tfrac{1}{\\lambda}\\bigl(g - J^\\top (\\lambda I + H J J^\\top)^{-1} H J g\\bigr),

an ``N × N`` solve (``N`` = batch × outputs per example); the tagged loss's own part of ``g``,
``Jᵀq`` (``q`` its gradient in the outputs), goes through the push-through form
``Jᵀ(λI + HJJᵀ)⁻¹q``, which has no ``1/λ`` cancellation, and only the rest of ``g`` (terms
outside the tag) through the form above, whose rounding error grows like ``eps/λ`` (in
float32 keep ``λ`` above ~1e-4 when the loss has such terms). ``J`` is formed once per step by
``N`` reverse passes (``jax.jacrev``) and ``JJᵀ`` by one matrix product: ``O(N d + N² d + N³)``
instead of ``O(d³)``, the regime of small batches and large models the paper targets. ``g``
is the incoming gradient (of the whole loss: terms outside the tag, such as an L2 penalty,
move the step's target but add no curvature).

The step is ``-learning_rate · u`` with ``u`` the direction above, optional heavy-ball momentum
on ``u`` and, with ``line_search=True``, Armijo backtracking on ``value_fn`` from
``learning_rate`` (halving, at most ``max_backtracks`` times; the paper's line search). A
non-finite gradient or direction leaves the state unchanged (and is counted).

References:
  M. Korbit, A. D. Adeoye, A. Bemporad, M. Rodriguez. "Exact Gauss-Newton Optimization for
  Training Deep Neural Networks." 2024. https://arxiv.org/abs/2405.14402
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jaxopt2._tree import all_finite
from jaxopt2.curvature.products import output_fisher_vp, output_residual
from jaxopt2.curvature.tags import split_loss
from jaxopt2.optimizers import registry
from jaxopt2.optimizers._contract import (
    check_learning_rate,
    check_number,
    require_value_fn,
    static_int,
)

__all__ = ["ScaleByEgnState", "egn", "gauss_newton_direction", "scale_by_egn"]


class ScaleByEgnState(NamedTuple):
    """State of :func:`scale_by_egn` (arrays only).

    Attributes:
      count: number of updates taken (int32).
      momentum: the heavy-ball buffer on the direction (like the parameters).
      num_nonfinite: steps skipped for a non-finite gradient or direction.
    """

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax
    momentum: optax.Updates
    num_nonfinite: jax.Array


def gauss_newton_direction(
    value_fn: Any, params: optax.Params, grad: optax.Updates, damping: Any
) -> optax.Updates:
    """``(JᵀHJ + λI)⁻¹ g`` for the tagged loss of `value_fn` at `params`, by the
    Duncan-Guttman identity in the ``N``-dimensional output space (see the module)."""
    split = split_loss(value_fn, params)
    flat, unravel = ravel_pytree(params)
    g, _ = ravel_pytree(grad)
    # at least float32: LAPACK has no 16-bit solve (bfloat16 parameters work in float32)
    dtype = jnp.promote_types(flat.dtype, jnp.float32)
    g = g.astype(dtype)
    out_shape = split.outputs.shape
    c = split.row_weights()

    def model(z):
        return jnp.ravel(split.model_fn(unravel(z.astype(flat.dtype)))).astype(dtype)

    jac = jax.jacrev(model)(flat.astype(dtype))  # [N, d]

    outputs = split.outputs.astype(dtype)
    c = c.astype(dtype)

    def h(u):  # the loss's Hessian in the outputs, on a flat output-space vector
        u = u.reshape(out_shape)
        return jnp.ravel(c * output_fisher_vp(split.loss, outputs, u))

    n = jac.shape[0]
    hk = jax.vmap(h, in_axes=1, out_axes=1)(jac @ jac.T)  # H J Jᵀ, [N, N]
    lam = jnp.asarray(damping, dtype)
    # g = Jᵀq (the tagged loss's part, q its gradient in the outputs) + the rest (terms
    # outside the tag). The first goes through the push-through identity
    # (λI + JᵀHJ)⁻¹Jᵀq = Jᵀ(λI + HJJᵀ)⁻¹q, free of the 1/λ cancellation; only the rest
    # takes the Woodbury form.
    q = jnp.ravel(c * output_residual(split.loss, outputs, split.targets)).astype(dtype)
    rest = g - jac.T @ q
    system = lam * jnp.eye(n, dtype=dtype) + hk
    y = jnp.linalg.solve(system, jnp.stack([q, h(jac @ rest)], axis=1))
    direction = jac.T @ y[:, 0] + (rest - jac.T @ y[:, 1]) / lam
    return unravel(direction.astype(flat.dtype))


def scale_by_egn(
    damping: float = 1e-3,
    momentum: float = 0.0,
    line_search: bool = False,
    learning_rate: float = 1.0,
    c1: float = 1e-4,
    max_backtracks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The exact damped Gauss-Newton direction of the tagged minibatch loss.

    Args:
      damping: ``λ > 0``, added to ``JᵀHJ``.
      momentum: heavy-ball momentum on the direction (0: none).
      line_search: backtrack on ``value_fn`` (Armijo with `c1`) from `learning_rate`, and
        return the scaled step; otherwise return the direction (the caller scales it).
      learning_rate: the first trial step of the line search (only with `line_search`).
      c1: the Armijo constant.
      max_backtracks: halvings of the line search (static; None: 20); if none satisfies
        Armijo the smallest is taken.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and the
      extra argument ``value_fn`` with a tagged loss.
    """
    check_number(damping, "damping", low=0.0, low_inclusive=False)
    check_number(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)
    check_number(learning_rate, "learning_rate", low=0.0, low_inclusive=False)
    check_number(c1, "c1", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    max_backtracks = static_int(max_backtracks, "max_backtracks", 20, low=0, who="egn")

    def init_fn(params: optax.Params) -> ScaleByEgnState:
        return ScaleByEgnState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree.map(jnp.zeros_like, params),
            num_nonfinite=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, value=None, **extra):
        del extra
        value_fn = require_value_fn(value_fn, "scale_by_egn")
        if params is None:
            raise ValueError("scale_by_egn needs params: call update(grads, state, params).")
        u = gauss_newton_direction(value_fn, params, updates, damping)
        buf = jax.tree.map(
            lambda b, x: (momentum * b + x.astype(b.dtype)).astype(b.dtype), state.momentum, u
        )
        ok = all_finite(updates) & all_finite(buf)
        step = buf
        if line_search:
            # the loss at params: value_and_update passes it (no second forward pass)
            f0 = value_fn(params) if value is None else value
            slope = optax.tree.vdot(updates, buf)

            def trial(alpha):
                return value_fn(jax.tree.map(lambda p, b: p - alpha * b, params, buf))

            def cond(carry):
                i, alpha = carry
                armijo = trial(alpha) <= f0 - c1 * alpha * slope
                return (i < max_backtracks) & ~armijo

            _, alpha = jax.lax.while_loop(
                cond, lambda c: (c[0] + 1, c[1] / 2), (jnp.asarray(0), jnp.asarray(learning_rate))
            )
            step = jax.tree.map(lambda b: alpha.astype(b.dtype) * b, buf)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = ScaleByEgnState(
            count=optax.safe_increment(state.count),
            momentum=keep(buf, state.momentum),
            num_nonfinite=state.num_nonfinite + (1 - ok.astype(jnp.int32)),
        )
        out = jax.tree.map(lambda s, g: s.astype(g.dtype), step, updates)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def egn(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    damping: float = 1e-3,
    momentum: float = 0.0,
    line_search: bool = False,
    weight_decay: float = 0.0,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Exact Gauss-Newton (Korbit et al., 2024): the damped Gauss-Newton step of the tagged
    minibatch loss, solved exactly through the Duncan-Guttman identity in output space.

    ``egn = chain(scale_by_egn, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``; with ``line_search=True`` the step length comes
    from Armijo backtracking on ``value_fn`` starting at `learning_rate` (a number then) and
    no further scaling is applied. Needs the extra argument ``value_fn`` with a loss tagged by
    :func:`jaxopt2.tag_loss`. The cost grows with the square of batch × outputs: for small
    batches (the paper's regime).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> x = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
      >>> y = jnp.array([[1.0], [2.0], [0.0]])
      >>> def loss_fn(w):
      ...     out = jaxopt2.tag_loss("squared_error", x @ w, y)
      ...     return jnp.mean(optax.l2_loss(out, y))
      >>> opt = jaxopt2.egn(learning_rate=1.0, damping=1e-4)
      >>> w = jnp.zeros((2, 1)); state = opt.init(w)
      >>> _, updates, state = jaxopt2.value_and_update(opt, loss_fn, w, state)
      >>> w = optax.apply_updates(w, updates)  # a linear model: one step (nearly) solves it
      >>> bool(jnp.linalg.norm(jax.grad(loss_fn)(w)) < 1e-3)
      True
    """
    check_number(weight_decay, "weight_decay", low=0.0, schedule=True)
    if line_search:
        check_number(learning_rate, "learning_rate", low=0.0, low_inclusive=False)
        return optax.chain(
            scale_by_egn(
                damping=damping, momentum=momentum, line_search=True, learning_rate=learning_rate
            ),
            optax.add_decayed_weights(weight_decay, mask),
            optax.scale_by_learning_rate(1.0),
        )
    check_learning_rate(learning_rate, "egn")
    return optax.chain(
        scale_by_egn(damping=damping, momentum=momentum),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


registry.register("egn", egn, needs_value_fn=True, static_args=("mask", "line_search"))
