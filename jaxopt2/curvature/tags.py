"""Loss tags: mark a model's outputs and targets inside an ordinary loss function.

``jaxopt2.tag_loss(loss, outputs, targets)`` returns ``outputs`` unchanged; it is an identity
for every jax transformation (jit, grad, vmap, ...). Curvature methods that need the split
``loss(params) = ℓ(f(params), y)`` (Gauss-Newton and Fisher products, K-FAC, Hessian-free,
Sophia's Gauss-Newton-Bartlett estimator) trace the user's ``value_fn`` and find the tag:

    >>> import jax.numpy as jnp, optax, jaxopt2
    >>> def loss_fn(w, x, y):
    ...     logits = jaxopt2.tag_loss("softmax_cross_entropy", x @ w, y)
    ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    >>> x, y, w = jnp.ones((4, 3)), jnp.array([0, 1, 2, 0]), jnp.zeros((3, 3))
    >>> split = jaxopt2.curvature.split_loss(lambda w: loss_fn(w, x, y), w)
    >>> split.loss, split.model_fn(w).shape
    ('softmax_cross_entropy', (4, 3))

Loss names are those of :func:`jaxopt2.curvature.fisher_vp`: ``"softmax_cross_entropy"``
(integer labels or one-hot/probability targets), ``"sigmoid_cross_entropy"``,
``"squared_error"`` (``½‖f − y‖²``).

Rows: the last axis of the tagged outputs is one example's output vector (its logits, its
regression targets) and every axis before it counts examples, so outputs ``[B, T, V]`` are
``B·T`` rows, exactly like the flattened ``[B·T, V]`` (rank-1 outputs of the elementwise
losses are ``N`` rows of one output each). The tagged loss is the mean over the rows of the
per-row loss summed over the last axis (for a language model: the mean over every token), or
with ``weights`` (a mask of padding, say) ``Σ w·ℓ / Σ w``. :func:`row_weights` is that rule,
the one place it lives: every consumer (the products of :mod:`.products`, K-FAC,
Hessian-free, Sophia's estimator) scales row ``r``'s curvature by its ``c_r``, so the
curvature is that of the loss the user computes, whatever the tag's leading axes. Keeping the
rule per row rather than per leading axis is what makes a sequence tag and its flattened tag
give the same curvature (with the leading axis as the batch, the Fisher of a token mean came
out ``T`` times too large).

The targets are checked against the outputs when the tag is traced (softmax: integer labels
``outputs.shape[:-1]`` or probabilities ``outputs.shape``; the others: ``outputs.shape``), so
a mismatch that broadcasting would hide is an error naming both shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core
from jax.interpreters import ad, batching, mlir

from jaxopt2 import _jaxpr
from jaxopt2._tree import check_choice

PyTree = Any

__all__ = [
    "LOSSES",
    "SplitLoss",
    "find_loss_tag",
    "loss_tag_p",
    "row_shape",
    "row_weights",
    "split_loss",
    "tag_loss",
]

LOSSES = ("softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error")

# Operands: outputs, targets and, when ``weighted``, the per-row weights.
loss_tag_p = core.Primitive("jaxopt2_loss_tag")
loss_tag_p.def_impl(lambda outputs, *rest, loss, weighted=False: outputs)
loss_tag_p.def_abstract_eval(lambda outputs, *rest, loss, weighted=False: outputs)


def _loss_tag_jvp(primals, tangents, **params):
    return loss_tag_p.bind(*primals, **params), ad.instantiate_zeros(tangents[0])


def _loss_tag_batch(args, dims, **params):
    size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
    moved = [
        jnp.broadcast_to(x, (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)
        for x, d in zip(args, dims, strict=True)
    ]
    return loss_tag_p.bind(*moved, **params), 0


ad.primitive_jvps[loss_tag_p] = _loss_tag_jvp
batching.primitive_batchers[loss_tag_p] = _loss_tag_batch
mlir.register_lowering(
    loss_tag_p,
    mlir.lower_fun(lambda outputs, *rest, loss, weighted=False: outputs, multiple_results=False),
)


def row_shape(outputs: jax.Array) -> tuple[int, ...]:
    """The shape of the rows (examples) of tagged `outputs`: every axis but the last
    (``[B, T, V]`` -> ``(B, T)``); rank-1 outputs are rows of one output each."""
    shape = tuple(jnp.shape(outputs))
    return shape if len(shape) == 1 else shape[:-1]


def row_weights(outputs: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """The rule of every tag consumer: the tagged loss is ``Σ_r c_r ℓ_r`` with ``ℓ_r`` the loss
    of row ``r`` summed over the last axis, so its curvature is ``Σ_r c_r J_rᵀ H_r J_r``.

    ``c_r = 1 / rows`` (the mean over all rows, e.g. every token of ``[B, T, V]`` logits), or
    ``w_r / Σ w`` with `weights` (zero when every weight is zero). Returned in the dtype of
    `outputs`, shaped to broadcast against them (``[*row_shape, 1]``; ``[N]`` for rank-1
    outputs), without gradient.
    """
    outputs = jnp.asarray(outputs)
    rows = row_shape(outputs)
    if weights is None:
        c = jnp.full(rows, 1.0 / max(int(np.prod(rows)), 1), outputs.dtype)
    else:
        w = jax.lax.stop_gradient(jnp.asarray(weights)).astype(outputs.dtype)
        total = jnp.sum(w)
        c = w / jnp.where(total > 0, total, 1)
    return c if outputs.ndim == 1 else c[..., None]


def _check_shapes(loss: str, outputs: jax.Array, targets: jax.Array, weights) -> None:
    """Targets (and weights) that do not fit the outputs: an error naming the shapes."""
    out, tgt = tuple(outputs.shape), tuple(targets.shape)
    if loss == "softmax_cross_entropy":
        if jnp.issubdtype(targets.dtype, jnp.integer):
            if tgt != out[:-1]:
                raise ValueError(
                    f"tag_loss('softmax_cross_entropy'): integer labels must have the logits' "
                    f"shape without the class axis, {out[:-1]} for logits {out}; got labels "
                    f"{tgt}."
                )
        elif tgt != out:
            raise ValueError(
                f"tag_loss('softmax_cross_entropy'): one-hot or probability targets must have "
                f"the logits' shape {out}; got targets {tgt} (integer labels would be "
                f"{out[:-1]})."
            )
    elif tgt != out:
        raise ValueError(
            f"tag_loss({loss!r}): targets must have the outputs' shape {out}; got targets {tgt} "
            "(no broadcasting: a [N] target against [N, 1] outputs would pair every output with "
            "every target)."
        )
    if weights is not None and tuple(weights.shape) != row_shape(outputs):
        raise ValueError(
            f"tag_loss({loss!r}): weights must have one entry per row of the outputs, shape "
            f"{row_shape(outputs)} for outputs {out} (every axis but the last); got weights "
            f"{tuple(weights.shape)}."
        )


def tag_loss(
    loss: str, outputs: jax.Array, targets: jax.Array, *, weights: jax.Array | None = None
) -> jax.Array:
    """Mark `outputs` (a model's predictions) and `targets` as the inputs of the loss `loss`.

    Returns `outputs` unchanged, so ``logits = tag_loss("softmax_cross_entropy", logits, y)``
    goes on into the loss computation as before. The loss value the curvature belongs to
    (compute this one; ``kfac_layers`` checks it) is, with ``ℓ_r`` the named loss of row ``r``
    summed over the last axis (see the module docstring for rows):

    * without `weights`: the mean of ``ℓ_r`` over all rows, e.g.
      ``optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()`` for ``[B, T, V]``
      logits and ``[B, T]`` labels (a mean over every token), or
      ``0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))`` for squared error;
    * with `weights`: ``jnp.sum(weights * ℓ) / jnp.sum(weights)``.

    Args:
      loss: ``"softmax_cross_entropy"``, ``"sigmoid_cross_entropy"`` or ``"squared_error"``.
      outputs: the model's outputs, ``[..., C]`` (logits for the cross-entropies).
      targets: softmax: integer labels ``outputs.shape[:-1]`` or one-hot/probabilities
        ``outputs.shape``; the others: ``outputs.shape``.
      weights: optional nonnegative per-row weights, shape ``outputs.shape[:-1]`` (``[N]`` for
        rank-1 outputs): a 0/1 mask of padded tokens, say.

    Raises:
      ValueError: for an unknown loss name, scalar outputs, or targets or weights whose shape
        does not fit the outputs (the message names both shapes).
    """
    check_choice(loss, "loss", LOSSES)
    outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
    if outputs.ndim < 1:
        raise ValueError("tag_loss: outputs need a leading batch axis, got a scalar.")
    weights = None if weights is None else jnp.asarray(weights)
    _check_shapes(loss, outputs, targets, weights)
    if weights is None:
        return loss_tag_p.bind(outputs, targets, loss=loss)
    try:  # checked only when concrete (not under a trace)
        negative = bool(np.any(np.asarray(weights) < 0))
    except jax.errors.TracerArrayConversionError:
        negative = False
    if negative:
        raise ValueError(f"tag_loss({loss!r}): weights must be nonnegative.")
    return loss_tag_p.bind(outputs, targets, weights, loss=loss, weighted=True)


def find_loss_tag(jaxpr: core.Jaxpr) -> tuple[_jaxpr.EqnPath, core.JaxprEqn]:
    """The one loss tag in `jaxpr` (entering call-like bodies); a ValueError otherwise."""
    found = [(p, e) for p, e in _jaxpr.walk(jaxpr) if e.primitive is loss_tag_p]
    if not found:
        raise ValueError(
            "no tagged loss in value_fn: mark the model outputs in your loss with "
            "outputs = jaxopt2.tag_loss(loss_name, outputs, targets) (loss_name one of "
            f"{', '.join(LOSSES)}), then compute the loss from them as before."
        )
    if len(found) > 1:
        raise ValueError(
            f"value_fn has {len(found)} tagged losses; curvature methods need exactly one "
            "(sum several heads into one tagged output, or tag only the main loss)."
        )
    path = found[0][0]
    body = jaxpr
    for i in path[:-1]:
        eqn = body.eqns[i]
        if eqn.primitive.name == "scan":
            raise ValueError(
                "tag_loss is inside a lax.scan body: tag the stacked outputs after the scan "
                "(one tagged loss for the whole batch)."
            )
        # The path descends only into equations with a body, so this is never None.
        body = cast(core.Jaxpr, _jaxpr.inner_jaxpr(eqn))
    return found[0]


@dataclasses.dataclass(frozen=True)
class SplitLoss:
    """A tagged ``value_fn`` split into ``model_fn: params -> outputs`` and the named loss.

    Attributes:
      loss: the loss name given to :func:`tag_loss`.
      model_fn: ``params -> outputs``, the tagged outputs as a function of the parameters.
      outputs: the outputs at the split point's parameters.
      targets: the tagged targets.
      value: ``value_fn`` at those parameters.
      weights: the tagged per-row weights, or None (see :func:`row_weights`).
    """

    loss: str
    model_fn: Callable[[PyTree], jax.Array]
    outputs: jax.Array
    targets: jax.Array
    value: jax.Array
    weights: jax.Array | None = None

    def row_weights(self) -> jax.Array:
        """:func:`row_weights` of the tagged outputs and weights."""
        return row_weights(self.outputs, self.weights)


def split_loss(value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> SplitLoss:
    """Find the loss tag in ``value_fn`` and split it (see :class:`SplitLoss`).

    Works inside ``jit``: ``value_fn`` is traced once; ``model_fn`` re-evaluates that trace up
    to the tag (the rest of the loss is dead code that jit removes).
    """
    closed = jax.make_jaxpr(value_fn)(params)
    path, tag = find_loss_tag(closed.jaxpr)
    treedef = jax.tree.structure(params)

    def run(p: PyTree) -> tuple[list[jax.Array], jax.Array]:
        captured: list[Any] = []

        def hook(here, eqn, invals):
            if here == path:
                captured.extend(invals)
            return None

        enter = lambda here: here == path[: len(here)]
        # jaxlib ships no stub for its compiled PyTreeDef class (flatten_up_to is real).
        leaves = treedef.flatten_up_to(p)  # type: ignore[attr-defined]
        (value,) = _jaxpr.evaluate(closed.jaxpr, closed.consts, leaves, hook, enter)
        return captured, value

    (outputs, targets, *weights), value = run(params)
    return SplitLoss(
        tag.params["loss"],
        lambda p: run(p)[0][0],
        outputs,
        targets,
        value,
        weights[0] if weights else None,
    )
