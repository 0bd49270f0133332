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

Loss names and conventions are those of :func:`jaxopt2.curvature.fisher_vp`:
``"softmax_cross_entropy"`` (integer labels or one-hot/probability targets),
``"sigmoid_cross_entropy"``, ``"squared_error"`` (``½‖f − y‖²``); the loss is the mean over
the leading (batch) axis of the per-example sum over the other axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core
from jax.interpreters import ad, batching, mlir

from jaxopt2 import _jaxpr
from jaxopt2._tree import check_choice
from jaxopt2.curvature.products import LOSSES

PyTree = Any

__all__ = ["SplitLoss", "find_loss_tag", "loss_tag_p", "split_loss", "tag_loss"]

loss_tag_p = core.Primitive("jaxopt2_loss_tag")
loss_tag_p.def_impl(lambda outputs, targets, *, loss: outputs)
loss_tag_p.def_abstract_eval(lambda outputs, targets, *, loss: outputs)


def _loss_tag_jvp(primals, tangents, *, loss):
    outputs, targets = primals
    return loss_tag_p.bind(outputs, targets, loss=loss), ad.instantiate_zeros(tangents[0])


def _loss_tag_batch(args, dims, *, loss):
    outputs, targets = args
    d_out, d_tgt = dims
    size = outputs.shape[d_out] if d_out is not None else targets.shape[d_tgt]
    outputs = (
        jnp.broadcast_to(outputs, (size, *outputs.shape))
        if d_out is None
        else jnp.moveaxis(outputs, d_out, 0)
    )
    targets = (
        jnp.broadcast_to(targets, (size, *targets.shape))
        if d_tgt is None
        else jnp.moveaxis(targets, d_tgt, 0)
    )
    return loss_tag_p.bind(outputs, targets, loss=loss), 0


ad.primitive_jvps[loss_tag_p] = _loss_tag_jvp
batching.primitive_batchers[loss_tag_p] = _loss_tag_batch
mlir.register_lowering(
    loss_tag_p, mlir.lower_fun(lambda outputs, targets, *, loss: outputs, multiple_results=False)
)


def tag_loss(loss: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mark `outputs` (a model's predictions) and `targets` as the inputs of the loss `loss`.

    Returns `outputs` unchanged, so ``logits = tag_loss("softmax_cross_entropy", logits, y)``
    goes on into the loss computation as before.

    Raises:
      ValueError: for an unknown loss name, or `outputs` without a batch axis.
    """
    check_choice(loss, "loss", LOSSES)
    outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
    if outputs.ndim < 1:
        raise ValueError("tag_loss: outputs need a leading batch axis, got a scalar.")
    return loss_tag_p.bind(outputs, targets, loss=loss)


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
        body = _jaxpr.inner_jaxpr(eqn)
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
    """

    loss: str
    model_fn: Callable[[PyTree], jax.Array]
    outputs: jax.Array
    targets: jax.Array
    value: jax.Array


def split_loss(value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> SplitLoss:
    """Find the loss tag in ``value_fn`` and split it (see :class:`SplitLoss`).

    Works inside ``jit``: ``value_fn`` is traced once; ``model_fn`` re-evaluates that trace up
    to the tag (the rest of the loss is dead code that jit removes).
    """
    closed = jax.make_jaxpr(value_fn)(params)
    path, tag = find_loss_tag(closed.jaxpr)
    treedef = jax.tree.structure(params)

    def run(p: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
        captured: list[Any] = []

        def hook(here, eqn, invals):
            if here == path:
                captured.extend(invals)
            return None

        enter = lambda here: here == path[: len(here)]
        leaves = treedef.flatten_up_to(p)
        (value,) = _jaxpr.evaluate(closed.jaxpr, closed.consts, leaves, hook, enter)
        return captured[0], captured[1], value

    outputs, targets, value = run(params)
    return SplitLoss(tag.params["loss"], lambda p: run(p)[0], outputs, targets, value)
