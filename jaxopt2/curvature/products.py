"""Matrix-free curvature products ``v -> M v`` over pytrees.

Notation (used across :mod:`jaxopt2.curvature`): ``L(θ)`` is a loss that is a mean over the
batch, ``H = ∇²L`` its Hessian, ``J`` the Jacobian of the model outputs ``f(θ)`` with respect
to the parameters, ``H_f`` the Hessian of the loss with respect to the outputs, ``G = Jᵀ H_f J``
the generalized Gauss-Newton matrix, and ``F`` the Fisher information of the model's
predictive distribution. Vectors ``v`` are pytrees shaped like the parameters.

Losses on outputs (``loss=`` of :func:`fisher_vp`). The last axis of the outputs is one
example's output vector and every axis before it counts rows (examples): ``[B, T, V]`` logits
are ``B·T`` rows, like ``[B·T, V]``. The loss is the mean over the rows of the per-row loss
``ℓ_r`` (summed over the last axis), or ``Σ w_r ℓ_r / Σ w`` with per-row weights; the rule is
:func:`jaxopt2.curvature.tags.row_weights`.

* ``"softmax_cross_entropy"``: outputs are logits ``[..., C]``; targets integer labels
  ``[...]`` or class probabilities ``[..., C]``; ``-Σ_c y_c log softmax(f)_c``.
* ``"sigmoid_cross_entropy"``: outputs are logits; targets in [0, 1] of the same shape; the
  binary cross-entropy is summed over the last axis (rank-1 logits: one per row).
* ``"squared_error"``: ``½‖f - y‖²`` over the last axis (a unit-variance Gaussian
  likelihood; rank-1 outputs: one per row).

For these three, the exact Fisher equals the GGN of the same loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxopt2._tree import check_choice, check_inexact, check_like
from jaxopt2.curvature.tags import LOSSES, row_weights

PyTree = Any

__all__ = [
    "LOSSES",
    "fisher_vp",
    "ggn_vp",
    "hessian_operator",
    "hvp",
    "output_fisher_vp",
    "output_loss",
    "output_residual",
    "sample_targets",
]

FISHER_KINDS = ("exact", "mc", "empirical")


def hvp(fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
    """Hessian-vector product ``H v`` of a scalar function, forward-over-reverse.

    Args:
      fn: ``params -> scalar``.
      params: the point at which the Hessian is taken.
      v: a pytree with the structure and shapes of `params`.

    Returns:
      ``H v``, shaped like `params`.
    """
    check_inexact(params, "params")
    check_like(v, params, "v")
    return jax.jvp(jax.grad(fn), (params,), (v,))[1]


def hessian_operator(
    fn: Callable[[PyTree], jax.Array], params: PyTree
) -> Callable[[PyTree], PyTree]:
    """The linear map ``v -> H v``, linearized once and reused for many `v`.

    ``jax.linearize`` runs the gradient's forward pass once; every call then costs only the
    tangent computation, which is what Lanczos and Hutchinson loops want.
    """
    check_inexact(params, "params")
    _, lin = jax.linearize(jax.grad(fn), params)

    def matvec(v: PyTree) -> PyTree:
        check_like(v, params, "v")
        return lin(v)

    return matvec


def ggn_vp(
    model_fn: Callable[[PyTree], PyTree],
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    v: PyTree,
) -> PyTree:
    """Generalized Gauss-Newton product ``G v = Jᵀ H_f J v``.

    Args:
      model_fn: ``params -> outputs`` (any pytree of arrays).
      loss_fn: ``outputs -> scalar`` (the loss as a function of the outputs only).
      params: the linearization point.
      v: a pytree shaped like `params`.
    """
    check_inexact(params, "params")
    check_like(v, params, "v")
    outputs, jv = jax.jvp(model_fn, (params,), (v,))
    hjv = jax.jvp(jax.grad(loss_fn), (outputs,), (jv,))[1]
    _, vjp = jax.vjp(model_fn, params)
    return vjp(hjv)[0]


def output_loss(
    loss: str, outputs: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """The named loss of `outputs` against `targets` (optax's): the mean over the rows (every
    axis but the last) of the per-row loss, or ``Σ w_r ℓ_r / Σ w`` with `weights`.

    ``softmax_cross_entropy`` takes integer labels or probabilities, ``sigmoid_cross_entropy``
    labels in [0, 1], ``squared_error`` is ``optax.l2_loss`` (half the squared error); each
    row's loss is summed over the last axis.
    """
    check_choice(loss, "loss", LOSSES)
    if loss == "softmax_cross_entropy":
        if jnp.issubdtype(jnp.result_type(targets), jnp.integer):
            per = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
        else:
            per = optax.softmax_cross_entropy(outputs, targets)
    elif loss == "sigmoid_cross_entropy":
        per = optax.sigmoid_binary_cross_entropy(outputs, targets)
    else:
        per = optax.l2_loss(outputs, targets)
    c = row_weights(outputs, weights)
    if loss == "softmax_cross_entropy":
        c = c[..., 0]  # optax's per-row losses have no class axis
    return jnp.sum(c * per)


def output_fisher_vp(loss: str, outputs: jax.Array, u: jax.Array) -> jax.Array:
    """``F_f u`` per example: the Fisher of the predictive distribution in output space (the
    Hessian of the named loss with respect to the outputs, per example, unaveraged)."""
    if loss == "softmax_cross_entropy":
        p = jax.nn.softmax(outputs, axis=-1)
        return p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)
    if loss == "sigmoid_cross_entropy":
        p = jax.nn.sigmoid(outputs)
        return p * (1 - p) * u
    return u


def output_residual(loss: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example gradient of the (un-averaged) loss with respect to the outputs."""
    if loss == "softmax_cross_entropy":
        p = jax.nn.softmax(outputs, axis=-1)
        if jnp.issubdtype(jnp.result_type(targets), jnp.integer):
            targets = jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
        return p - targets
    if loss == "sigmoid_cross_entropy":
        return jax.nn.sigmoid(outputs) - targets
    return outputs - targets


def sample_targets(loss: str, outputs: jax.Array, key: jax.Array) -> jax.Array:
    """Targets drawn from the model's predictive distribution at `outputs`."""
    if loss == "softmax_cross_entropy":
        return jax.random.categorical(key, outputs, axis=-1)
    if loss == "sigmoid_cross_entropy":
        p = jax.nn.sigmoid(outputs)
        return jax.random.bernoulli(key, p).astype(outputs.dtype)
    return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)


def fisher_vp(
    model_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    v: PyTree,
    *,
    loss: str,
    kind: str,
    targets: jax.Array | None = None,
    key: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> PyTree:
    """Fisher-vector product ``F v`` for a model with a standard likelihood.

    Args:
      model_fn: ``params -> outputs``, ``[..., C]``: ``N`` rows (every axis but the last).
      params: the linearization point.
      v: a pytree shaped like `params`.
      loss: one of ``"softmax_cross_entropy"``, ``"sigmoid_cross_entropy"``,
        ``"squared_error"`` (see the module docstring for shapes and conventions).
      kind: ``"exact"``: ``(1/N) Σ_n J_nᵀ F_f J_n v`` with the analytic output-space Fisher
        (equal to the GGN of the loss); ``"mc"``: one target per example sampled from the
        model's predictive distribution with `key`, ``(1/N) Σ_n g_n g_nᵀ v`` with
        ``g_n = ∇ℓ(f_n, ŷ_n)``, an unbiased estimate of the exact Fisher;
        ``"empirical"``: the same with the true `targets`, i.e. the uncentered covariance of
        the per-example gradients. Per-example gradients are never materialized: both use
        ``Jᵀ (r ⊙ (r·J v))`` with one JVP and one VJP.
      targets: required for ``"empirical"``.
      key: required for ``"mc"``.
      weights: optional per-row weights (``outputs.shape[:-1]``): each row's term is scaled by
        ``w_r / Σ w`` instead of ``1/N``, the curvature of ``Σ w_r ℓ_r / Σ w``.

    Returns:
      ``F v``, shaped like `params`.
    """
    check_choice(loss, "loss", LOSSES)
    check_choice(kind, "kind", FISHER_KINDS)
    check_inexact(params, "params")
    check_like(v, params, "v")
    if kind == "empirical" and targets is None:
        raise ValueError("fisher_vp(kind='empirical') needs the true targets (targets=...).")
    if kind == "mc" and key is None:
        raise ValueError("fisher_vp(kind='mc') needs a PRNG key (key=...) to sample targets.")
    outputs, jv = jax.jvp(model_fn, (params,), (v,))
    if not isinstance(outputs, jax.Array) or outputs.ndim < 1:
        raise ValueError("fisher_vp: model_fn must return one array with a leading batch axis.")
    c = row_weights(outputs, weights)
    if kind == "exact":
        u = c * output_fisher_vp(loss, outputs, jv)
    else:
        if kind == "mc":
            assert key is not None  # checked above
            targets = sample_targets(loss, jax.lax.stop_gradient(outputs), key)
        else:
            assert targets is not None  # checked above (kind == "empirical")
            if targets.shape[:1] != outputs.shape[:1]:
                raise ValueError(
                    f"fisher_vp: targets have batch size {targets.shape[0]} but outputs "
                    f"{outputs.shape[0]}."
                )
        r = output_residual(loss, outputs, targets)
        # per row rᵀ J v (rank-1 outputs: one output per row)
        dot = r * jv if r.ndim == 1 else jnp.sum(r * jv, axis=-1, keepdims=True)
        u = c * r * dot
    _, vjp = jax.vjp(model_fn, params)
    return vjp(u)[0]
