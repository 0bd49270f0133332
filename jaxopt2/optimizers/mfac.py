"""M-FAC: the inverse of a damped empirical Fisher over a sliding window of gradients.

Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information" (NeurIPS 2021). With the last ``m`` gradients ``g₁ … g_m`` (the rows of
``G ∈ R^{m×d}``, the current one included) the preconditioner is the damped empirical Fisher

.. math::

   \\hat F = \\lambda I + \\tfrac{1}{m} \\textstyle\\sum_i g_i g_i^\\top
           = \\lambda I + \\tfrac{1}{m} G^\\top G,

and the step direction is ``u = F̂⁻¹ g_t``. By the Woodbury identity

.. math::

   \\hat F^{-1} v = \\tfrac{1}{\\lambda}
      \\bigl(v - G^\\top (m\\lambda I + G G^\\top)^{-1} G v\\bigr),

which needs only ``G v`` (``O(md)``), the ``m × m`` Gram matrix ``GGᵀ`` and one ``m × m``
solve. The Gram matrix is kept in the state and updated per step by one row and column (the
new gradient's products with the window, ``O(md)``), so a step costs ``O(md + m³)`` and the
state ``m·d + m²`` numbers — never a ``d × d`` matrix. (The paper's dynamic algorithm also
avoids the ``m³`` Cholesky by rank-1 updates of a factorization, ``O(md + m²)``; with the
default ``m = 32`` the ``m³ = 3·10⁴`` term is below ``md`` for any model of more than a
thousand parameters, and a fresh factorization per step cannot drift.) Until the window has
filled, its empty rows are zero and contribute nothing (``F̂`` is the sum over the gradients
seen, still divided by ``m``, as in the paper's implementation).

The step is ``-learning_rate · (u_t + weight_decay · θ)`` with optional heavy-ball momentum
on ``u`` (the paper's SGD-with-M-FAC optimizer). A step whose gradient is non-finite leaves
the window, the Gram matrix and the momentum unchanged (and is counted).

References:
  E. Frantar, E. Kurtic, D. Alistarh. "M-FAC: Efficient Matrix-Free Approximations of
  Second-Order Information." NeurIPS 2021. https://arxiv.org/abs/2107.03356
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jaxopt2._tree import all_finite
from jaxopt2.optimizers import registry
from jaxopt2.optimizers._contract import (
    check_learning_rate,
    check_number,
    static_dtype,
    static_int,
)

__all__ = ["ScaleByMfacState", "mfac", "scale_by_mfac"]


class ScaleByMfacState(NamedTuple):
    """State of :func:`scale_by_mfac` (arrays only).

    Attributes:
      count: number of updates taken (int32); the next gradient goes to row
        ``count % num_grads`` of the window.
      grads: the window ``G``, ``[num_grads, d]`` (the flattened gradients, ``stats_dtype``;
        zero rows until it has filled).
      gram: ``G Gᵀ``, ``[num_grads, num_grads]``.
      momentum: the heavy-ball buffer on the preconditioned direction (like the parameters).
      num_nonfinite: steps skipped for a non-finite gradient.
    """

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax
    grads: jax.Array
    gram: jax.Array
    momentum: optax.Updates
    num_nonfinite: jax.Array


def inverse_fisher_product(
    grads: jax.Array, gram: jax.Array, v: jax.Array, damping: Any, gv: jax.Array | None = None
) -> jax.Array:
    """``(λI + GᵀG/m)⁻¹ v`` by the Woodbury identity (``m`` = the window's rows); `gv` is
    ``G v`` when the caller already has it (one pass over the window saved)."""
    m = grads.shape[0]
    system = gram + (m * damping) * jnp.eye(m, dtype=gram.dtype)
    gv = grads @ v if gv is None else gv
    coeff = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(system), gv)
    return (v - grads.T @ coeff) / damping


def scale_by_mfac(
    num_grads: int | None = None,
    damping: float = 1e-4,
    momentum: float = 0.0,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Precondition the gradient with M-FAC's inverse windowed empirical Fisher.

    Args:
      num_grads: the window ``m`` (static; None: 32).
      damping: ``λ > 0``. Directions the window does not span are scaled by ``1/λ``; the
        current gradient is always in the window, so its step stays bounded.
      momentum: heavy-ball momentum on the preconditioned direction (0: none).
      stats_dtype: dtype of the window and the Gram matrix (float32 by default).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (needs no extra arguments).
    """
    num_grads = static_int(num_grads, "num_grads", 32, who="mfac")
    check_number(damping, "damping", low=0.0, low_inclusive=False)
    check_number(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)
    stats_dtype = static_dtype(stats_dtype, who="mfac")

    def init_fn(params: optax.Params) -> ScaleByMfacState:
        flat, _ = ravel_pytree(params)
        return ScaleByMfacState(
            count=jnp.zeros([], jnp.int32),
            grads=jnp.zeros((num_grads, flat.size), stats_dtype),
            gram=jnp.zeros((num_grads, num_grads), stats_dtype),
            momentum=jax.tree.map(jnp.zeros_like, params),
            num_nonfinite=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        flat, unravel = ravel_pytree(updates)
        g = flat.astype(stats_dtype)
        ok = all_finite(updates)
        slot = state.count % num_grads
        # Only the slot's row is written (a select over the whole window would copy m·d
        # numbers a step): on a non-finite step it gets its old value back.
        window = state.grads.at[slot].set(jnp.where(ok, g, state.grads[slot]))
        row = window @ g  # the new gradient's products with the window (itself included)
        gram = state.gram.at[slot, :].set(row).at[:, slot].set(row)
        direction = inverse_fisher_product(
            window, gram, g, jnp.asarray(damping, stats_dtype), gv=row
        )
        u = unravel(direction.astype(flat.dtype))
        buf = jax.tree.map(lambda b, x: (momentum * b + x).astype(b.dtype), state.momentum, u)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = ScaleByMfacState(
            count=optax.safe_increment(state.count),
            grads=window,
            gram=keep(gram, state.gram),
            momentum=keep(buf, state.momentum),
            num_nonfinite=state.num_nonfinite + (1 - ok.astype(jnp.int32)),
        )
        out = jax.tree.map(lambda b, x: b.astype(x.dtype), buf, updates)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mfac(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    num_grads: int | None = None,
    damping: float = 1e-4,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    mask: Any = None,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """M-FAC (Frantar, Kurtic & Alistarh, 2021): steps along the inverse of a damped
    empirical Fisher over the last `num_grads` gradients.

    ``mfac = chain(scale_by_mfac, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``; see :func:`scale_by_mfac` and the module
    docstring for the rule. The direction has the scale of ``m Gᵀ(GGᵀ)⁻¹``-ish inverse
    gradients: learning rates are SGD-like for ``damping`` near the gradients' squared
    scale and smaller as ``damping`` shrinks.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 10.0, 100.0]) * w**2)
      >>> opt = jaxopt2.mfac(learning_rate=1.0, num_grads=4, damping=10.0)
      >>> w = jnp.ones(3); state = opt.init(w)
      >>> for _ in range(200):
      ...     g = jax.grad(loss_fn)(w)
      ...     updates, state = opt.update(g, state, w)
      ...     w = optax.apply_updates(w, updates)
      >>> bool(loss_fn(w) < 1e-3 * loss_fn(jnp.ones(3)))
      True
    """
    check_learning_rate(learning_rate, "mfac")
    check_number(weight_decay, "weight_decay", low=0.0, schedule=True)
    return optax.chain(
        scale_by_mfac(
            num_grads=num_grads, damping=damping, momentum=momentum, stats_dtype=stats_dtype
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


registry.register("mfac", mfac, static_args=("mask", "num_grads", "stats_dtype"))
