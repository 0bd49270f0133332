"""First-order (tangent) models and the training Jacobian.

* :func:`linearize_model` turns ``apply_fn(params, *args)`` into its first-order Taylor model
  around ``params0``, ``f(θ₀, x) + J(θ₀, x)(θ − θ₀)``, with the same call signature: one
  forward-mode JVP per call, no Jacobian is formed. The model is linear in ``θ``, so a loss
  that is convex in the outputs (squared error, cross-entropy) is convex in ``θ``: the
  Newton solvers, ``least_squares`` (one Gauss-Newton step solves a squared-error fit) and
  every optimizer apply ("tangent" fine-tuning; Liu et al., "Tangent Transformers for
  Composition, Privacy and Removal", ICLR 2024).
* :func:`training_jacobian_singular_values`: the extreme singular values (and right singular
  vectors) of ``J = ∂θ_T/∂θ₀`` of a training run ``θ₀ -> θ_T`` given as a function, by
  Lanczos on ``JᵀJ`` (a JVP then a VJP per product, the run linearized once) — the spectrum
  studied in "Understanding Gradient Descent through the Training Jacobian" (Belrose &
  Scherlis, 2024): singular values near 1 mark directions training leaves alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt2._tree import check_inexact, check_like
from jaxopt2.curvature.estimators import top_k_eigenpairs

PyTree = Any

__all__ = ["linearize_model", "training_jacobian_singular_values"]


def linearize_model(apply_fn: Callable[..., Any], params0: PyTree) -> Callable[..., Any]:
    """The first-order Taylor model of `apply_fn` in its parameters around `params0`.

    Args:
      apply_fn: ``(params, *args, **kwargs) -> outputs`` (any pytree of floating arrays),
        the parameters first, as in flax's ``apply`` (for an equinox model, split it with
        ``eqx.partition`` and close over the static part).
      params0: the expansion point, a pytree of floating-point arrays.

    Returns:
      ``apply_lin(params, *args, **kwargs) = apply_fn(params0, *args, **kwargs) +
      J(params0) (params - params0)``, computed with one ``jax.jvp`` per call (the cost of
      about two forward passes). ``apply_lin(params0, ...)`` equals ``apply_fn(params0, ...)``;
      ``apply_lin`` is affine in ``params``, differentiable, and jits and vmaps.

    Raises:
      TypeError: `params0` has non-floating leaves.
      ValueError: at call time, `params` does not have the structure and shapes of `params0`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxopt2
      >>> f = lambda w, x: jnp.tanh(x @ w)
      >>> w0, x = jnp.array([0.5, -0.2]), jnp.array([[1.0, 2.0]])
      >>> f_lin = jaxopt2.linearize_model(f, w0)
      >>> bool(jnp.allclose(f_lin(w0, x), f(w0, x)))
      True
    """
    check_inexact(params0, "params0")

    def apply_lin(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        check_like(params, params0, "params", "params0")
        delta = jax.tree.map(
            lambda p, p0: (jnp.asarray(p) - p0).astype(jnp.result_type(p0)), params, params0
        )
        out0, tangent = jax.jvp(lambda p: apply_fn(p, *args, **kwargs), (params0,), (delta,))
        return jax.tree.map(jnp.add, out0, tangent)

    return apply_lin


def training_jacobian_singular_values(
    train_fn: Callable[[PyTree], PyTree],
    params0: PyTree,
    key: jax.Array,
    k: int,
    *,
    which: str = "largest",
    num_iters: int | None = None,
) -> tuple[jax.Array, PyTree]:
    """The `k` largest (or smallest) singular values of the training Jacobian
    ``J = ∂train_fn(θ₀)/∂θ₀`` and its right singular vectors.

    Args:
      train_fn: ``params0 -> params_T``, a whole (short) training run as a pure function —
        for example a ``lax.scan`` of optimizer steps over fixed batches. Its output has the
        structure of its input.
      params0: the initial parameters ``θ₀``.
      key: the PRNG key of the Lanczos starting vector.
      k: the number of singular values.
      which: ``"largest"`` or ``"smallest"``.
      num_iters: Lanczos steps on ``JᵀJ`` (see :func:`top_k_eigenpairs` for the default).

    Returns:
      ``(singular_values, vectors)``: ``[k]`` in descending order and the right singular
      vectors as a pytree shaped like `params0` with a leading ``k`` axis.

    The run is linearized once (``jax.linearize``, its intermediates kept in memory) and each
    Lanczos step costs one JVP and one transposed JVP through it.
    """
    check_inexact(params0, "params0")
    out = jax.eval_shape(train_fn, params0)
    check_like(out, params0, "train_fn(params0)", "params0")
    _, jvp_fn = jax.linearize(train_fn, params0)
    vjp_fn = jax.linear_transpose(jvp_fn, params0)

    def gram(v: PyTree) -> PyTree:
        return vjp_fn(jvp_fn(v))[0]

    evals, vecs = top_k_eigenpairs(gram, params0, key, k, num_iters=num_iters, which=which)
    return jnp.sqrt(jnp.maximum(evals, 0)), vecs
