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

Hyperparameter validation lives here too, one rule per kind of argument, so every factory
words its errors the same way and names the argument:

* numbers (:func:`check_number`, :func:`check_learning_rate`) are checked only when they are
  concrete Python/NumPy numbers. Jax arrays and tracers pass unchecked: that is how
  ``optax.inject_hyperparams``, schedules and ``jax.vmap`` over a grid of hyperparameters
  hand them in. Anything else (a string, a list, None where no default applies) is a
  TypeError naming the argument.
* structural arguments (:func:`static_int`, :func:`static_dtype`: block sizes, frequencies,
  probe counts, dtypes) fix shapes or the compiled program, so they must be Python values.
  Their defaults are None (or a dtype name), never a Python number or a dtype class:
  ``optax.inject_hyperparams`` turns every number a factory's signature holds into an array
  in its state (and calls a dtype class as a schedule), so a numeric default would break
  the plain ``optax.inject_hyperparams(jaxopt2.kfac)(learning_rate=...)``. A structural
  argument that arrives as an array was set explicitly through ``optax.inject_hyperparams``;
  the error points to :func:`jaxopt2.inject_hyperparams`, which keeps the registry's
  static arguments out of the injected state.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

__all__ = [
    "check_learning_rate",
    "check_number",
    "check_seed",
    "require_value_fn",
    "resolve_key",
    "static_array_error",
    "static_dtype",
    "static_int",
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
    has_aux: bool = False,
) -> tuple[Any, optax.Updates, optax.OptState]:
    """Loss, optimizer updates and new state for one step.

    Args:
      optimizer: any optax transformation (jaxopt2's or optax's).
      loss_fn: ``loss_fn(params, *batch) -> scalar``, a mean over the batch; with
        `has_aux`, ``-> (scalar, aux)``.
      params: the current parameters (a pytree).
      opt_state: the optimizer state.
      *batch: the batch arrays, passed positionally to ``loss_fn``.
      key: optional PRNG key for stochastic curvature estimators.
      has_aux: `loss_fn` returns a pair ``(value, aux)`` (metrics, a model state), as in
        ``jax.value_and_grad(has_aux=True)``. The gradient is that of the value; the
        ``value_fn`` the optimizer gets returns the value alone.

    Returns:
      ``(value, updates, new_opt_state)``, with `has_aux` ``((value, aux), updates,
      new_opt_state)``; apply with ``optax.apply_updates(params, updates)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> loss_fn = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
      >>> opt = jaxopt2.adahessian(learning_rate=0.1)
      >>> w = jnp.zeros(3); state = opt.init(w)
      >>> x, y = jnp.eye(3), jnp.ones(3)
      >>> value, updates, state = jaxopt2.value_and_update(opt, loss_fn, w, state, x, y)
      >>> w = optax.apply_updates(w, updates)
      >>> # a loss with auxiliary outputs, as jax.value_and_grad(has_aux=True) takes it
      >>> aux_fn = lambda w, x, y: (loss_fn(w, x, y), {"pred": x @ w})
      >>> (value, aux), updates, state = jaxopt2.value_and_update(
      ...     opt, aux_fn, w, state, x, y, has_aux=True)
      >>> aux["pred"].shape
      (3,)
    """
    if has_aux:

        def value_fn(p: PyTree) -> jax.Array:
            return _aux_pair(loss_fn(p, *batch), "value_and_update", "loss_fn")[0]

        (value, aux), grad = jax.value_and_grad(
            lambda p: _aux_pair(loss_fn(p, *batch), "value_and_update", "loss_fn"), has_aux=True
        )(params)
    else:

        def value_fn(p: PyTree) -> jax.Array:
            return loss_fn(p, *batch)

        value, grad = jax.value_and_grad(value_fn)(params)
    extra: dict[str, Any] = {"value": value, "grad": grad, "value_fn": value_fn}
    if key is not None:
        extra["key"] = key
    updates, new_state = optimizer.update(
        grad, opt_state, params, **update_extra_args(optimizer, extra)
    )
    return ((value, aux) if has_aux else value), updates, new_state


def _aux_pair(out: Any, who: str, what: str) -> tuple[Any, Any]:
    """`out` as ``(value, aux)``; a TypeError when it is not a pair (``has_aux=True``)."""
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise TypeError(
            f"{who}(has_aux=True): {what} must return a pair (value, aux), got "
            f"{type(out).__name__}."
        )
    return out[0], out[1]


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


# ------------------------------------------------------------------------------------------
# Hyperparameter validation (see the module docstring).
# ------------------------------------------------------------------------------------------

_ARRAYS = (jax.Array, np.ndarray)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _prefix(who: str) -> str:
    return f"{who}: " if who else ""


def check_number(
    value: Any,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    optional: bool = False,
    schedule: bool = False,
    why: str = "",
) -> None:
    """Check a numeric hyperparameter: its type always, its range when it is concrete.

    Args:
      value: the value given.
      name: the argument's name (every message starts with it).
      low, high, low_inclusive, high_inclusive: the allowed interval.
      optional: None is allowed (the argument's "off" or "automatic" value).
      schedule: a callable (an optax schedule ``step -> value``) is allowed.
      why: appended to the range message (what the bound protects).

    Raises:
      TypeError: `value` is neither a number nor an array (a string, a list, a bool, a
        callable, or None when not `optional`).
      ValueError: a concrete `value` lies outside the interval or is NaN.
    """
    if (value is None and optional) or (schedule and callable(value)):
        return
    if isinstance(value, _ARRAYS):
        return  # injected, vmapped or traced: checked by whoever made it
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {_got(value)}.")
    ok_low = value >= low if low_inclusive else value > low
    ok_high = value <= high if high_inclusive else value < high
    if not (ok_low and ok_high) or value != value:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        bounds = f"{lo}{float(low)}, {float(high)}{hi}"
        raise ValueError(f"{name} must lie in {bounds}, got {value!r}.{' ' + why if why else ''}")


def check_learning_rate(value: Any, who: str, *, adaptive: bool = False) -> None:
    """Check a learning rate: a non-negative number, an array, or a schedule (a callable).

    Args:
      value: the learning rate given.
      who: the optimizer's name, for the message.
      adaptive: None is allowed (the optimizer then sizes its own step).

    Raises:
      TypeError: a string, a list, a bool, ...; or None when `adaptive` is False.
      ValueError: a concrete negative, infinite or NaN number.
    """
    if value is None:
        if adaptive:
            return
        raise TypeError(
            f"{who}: learning_rate is None, but {who} has no step size of its own: pass a "
            "number or an optax schedule (None would apply its direction unscaled and with "
            "the wrong sign: a step uphill)."
        )
    if callable(value) or isinstance(value, _ARRAYS):
        return
    if not _is_number(value):
        raise TypeError(
            f"{who}: learning_rate must be a number or a schedule (a function step -> "
            f"rate), got {_got(value)}."
        )
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(
            f"{who}: learning_rate must be a finite number >= 0, got {value!r} (the optimizer "
            "applies the minus sign itself)."
        )


def _array_kind(value: Any) -> str:
    if isinstance(value, jax.core.Tracer):
        return "a traced array"
    return "a jax array" if isinstance(value, jax.Array) else "a numpy array"


def static_array_error(name: str, value: Any, who: str, what: str) -> TypeError:
    """The error for a structural argument that arrived as an array (how to keep it static)."""
    return TypeError(
        f"{_prefix(who)}{name} is structural (it fixes shapes or the compiled program) and "
        f"must be {what}, got {_array_kind(value)}. optax.inject_hyperparams turns every "
        "number it is given into an array in its state (and calls a dtype class as a "
        f"schedule): use jaxopt2.inject_hyperparams(jaxopt2.{who or '<optimizer>'}), which "
        "keeps the registry's static arguments static, or pass "
        f"static_args=({name!r},) to optax.inject_hyperparams."
    )


def static_int(value: Any, name: str, default: int | None, *, low: int = 1, who: str = "") -> Any:
    """A structural integer argument as a Python int (`default` when it is None).

    Raises:
      TypeError: `value` is an array (set through ``optax.inject_hyperparams``; the message
        says how to keep it static).
      ValueError: not an integer ``>= low``.
    """
    if value is None:
        return default
    if isinstance(value, _ARRAYS):
        raise static_array_error(name, value, who, "a Python int")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        kind = "positive" if low == 1 else "non-negative" if low == 0 else f">= {low}"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}.")
    return int(value)


def static_dtype(value: Any, name: str = "stats_dtype", *, who: str = "") -> np.dtype:
    """A structural floating dtype (a name such as ``"bfloat16"``, a NumPy dtype or a jax
    dtype class) as a NumPy dtype; None means float32.

    Raises:
      TypeError: an array (``optax.inject_hyperparams`` calls a dtype class as a schedule)
        or something that names no dtype.
      ValueError: a dtype that is not floating.
    """
    if value is None:
        return np.dtype(jnp.float32)
    if isinstance(value, _ARRAYS):
        raise static_array_error(name, value, who, 'a dtype (e.g. "float32")')
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise TypeError(f'{name} must be a dtype (e.g. "float32"), got {_got(value)}.') from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype, got {dtype}.")
    return dtype


def check_seed(value: Any, name: str = "seed") -> None:
    """A seed is a non-negative Python int or an integer array (injected or vmapped)."""
    if isinstance(value, _ARRAYS):
        if not jnp.issubdtype(jnp.result_type(value), jnp.integer):
            raise TypeError(f"{name} must be an integer, got an array of {jnp.result_type(value)}.")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
