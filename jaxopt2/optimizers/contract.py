"""The optimizer contract, made executable.

Every jaxopt2 optimizer is an ``optax.GradientTransformationExtraArgs``. Curvature-aware
ones read two extra arguments of ``update``:

* ``value_fn``: ``params -> scalar loss`` on the current batch (the name optax's L-BFGS and
  line searches use), built inside the user's jitted step from the traced batch;
* ``key``: a PRNG key for stochastic estimators. Without it they fall back to a key carried
  in their state, so plain optax loops work unchanged.

:func:`value_and_update` computes the loss and gradient and calls ``update`` with ``value``,
``grad``, ``value_fn`` and ``key`` together, so one training step works for every optimizer
in the registry, and chaining with optax line searches works too. It passes them to
anything whose ``update`` takes them: an ``optax.GradientTransformationExtraArgs`` (``chain``,
``masked``, ``apply_if_finite``, ``inject_hyperparams`` all return one and forward them to
their inner transformation), an ``update`` with ``**extra_args`` (``optax.MultiSteps``, which
is no ``GradientTransformationExtraArgs`` but forwards them too), or one naming some of them
as keywords (only those are passed). A plain ``update(updates, state, params)`` gets none.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

PyTree = Any

__all__ = [
    "require_value_fn",
    "resolve_key",
    "update_extra_args",
    "value_and_update",
]

EXTRA_ARGS = ("value", "grad", "value_fn", "key")


def value_and_update(
    optimizer: optax.GradientTransformation,
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    opt_state: optax.OptState,
    *batch: Any,
    key: jax.Array | None = None,
) -> tuple[jax.Array, optax.Updates, optax.OptState]:
    """Loss, optimizer updates and new state for one step.

    Args:
      optimizer: any optax transformation (jaxopt2's or optax's).
      loss_fn: ``loss_fn(params, *batch) -> scalar``, a mean over the batch.
      params: the current parameters (a pytree).
      opt_state: the optimizer state.
      *batch: the batch arrays, passed positionally to ``loss_fn``.
      key: optional PRNG key for stochastic curvature estimators.

    Returns:
      ``(value, updates, new_opt_state)``; apply with ``optax.apply_updates(params, updates)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> loss_fn = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
      >>> opt = jaxopt2.adahessian(learning_rate=0.1)
      >>> w = jnp.zeros(3); state = opt.init(w)
      >>> x, y = jnp.eye(3), jnp.ones(3)
      >>> value, updates, state = jaxopt2.value_and_update(opt, loss_fn, w, state, x, y)
      >>> w = optax.apply_updates(w, updates)
    """

    def value_fn(p: PyTree) -> jax.Array:
        return loss_fn(p, *batch)

    value, grad = jax.value_and_grad(value_fn)(params)
    extra: dict[str, Any] = {"value": value, "grad": grad, "value_fn": value_fn}
    if key is not None:
        extra["key"] = key
    updates, new_state = optimizer.update(
        grad, opt_state, params, **update_extra_args(optimizer, extra)
    )
    return value, updates, new_state


def update_extra_args(optimizer: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The part of `extra` that ``optimizer.update`` accepts.

    All of it for an ``optax.GradientTransformationExtraArgs`` or an ``update`` with
    ``**kwargs``; the names it lists as keyword parameters otherwise; nothing when its
    signature cannot be read.
    """
    if isinstance(optimizer, optax.GradientTransformationExtraArgs):
        return dict(extra)
    try:
        params = inspect.signature(optimizer.update).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(extra)
    named = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
    return {k: v for k, v in extra.items() if k in named}


def require_value_fn(value_fn: Any, who: str) -> Callable[[PyTree], jax.Array]:
    """Return `value_fn` or raise a ValueError explaining how to pass it."""
    if value_fn is None:
        raise ValueError(
            f"{who} needs the loss: call update(grads, state, params, value_fn=fn) with "
            "fn: params -> scalar loss on the current batch, or use jaxopt2.value_and_update "
            "(which passes it for you). Inside optax.chain or optax.apply_if_finite, an "
            "optax.MultiSteps drops it (optax forwards extra arguments only to a "
            "GradientTransformationExtraArgs): put MultiSteps outermost, or pass "
            "optax.GradientTransformationExtraArgs(ms.init, ms.update)."
        )
    if not callable(value_fn):
        raise TypeError(f"{who}: value_fn must be callable, got {type(value_fn).__name__}.")
    return value_fn


def resolve_key(key: jax.Array | None, state_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The key to use this step and the state's next key.

    An explicit `key` wins (and the carried key stays put, so a vmapped sweep controls all
    randomness); otherwise the carried key is split.
    """
    if key is not None:
        return key, state_key
    next_state_key, use = jax.random.split(state_key)
    return use, next_state_key
