"""The one registry of optimizers, shared by the tests and the experiment runner.

Every optimizer the library offers is registered here under a name, with what its update
needs beyond the gradient (``value_fn``, ``key``) and which of its arguments are static
(structural: block sizes, frequencies) rather than traceable numbers. The shared test checks
run every entry; the runner builds optimizers from configs through :func:`get`.

Example:
  >>> from jaxopt2.optimizers import registry
  >>> entry = registry.get("adam")
  >>> opt = entry.factory(learning_rate=1e-3)
  >>> entry.needs_value_fn
  False
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import optax

__all__ = ["OptimizerEntry", "entry_of", "get", "inject_hyperparams", "names", "register"]


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
    """A registered optimizer.

    Attributes:
      name: the registry name (what configs write as ``optimizer.name``).
      factory: ``factory(**kwargs) -> optax.GradientTransformationExtraArgs``.
      needs_value_fn: the update needs the extra arg ``value_fn`` (a loss on the batch).
      needs_key: the update uses the extra arg ``key`` (falls back to a key in the state).
      static_args: argument names that are structural (not traceable numbers).
      eval_params: for an optimizer whose training iterate is not the point to evaluate
        (averaged or interpolated parameters, e.g. schedule-free): ``eval_params(state,
        params) -> params`` maps its own state and the training parameters to the
        evaluation parameters. None: evaluate at the training parameters.
    """

    name: str
    factory: Callable[..., optax.GradientTransformationExtraArgs]
    needs_value_fn: bool = False
    needs_key: bool = False
    static_args: tuple[str, ...] = ()
    eval_params: Callable[[Any, Any], Any] | None = None

    def __call__(self, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        return self.factory(**kwargs)

    def arguments(self) -> dict[str, inspect.Parameter]:
        """The factory's arguments by name (for config validation and ``jaxopt2 list``)."""
        params = inspect.signature(self.factory).parameters
        return {
            k: p
            for k, p in params.items()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        }

    def required_arguments(self) -> tuple[str, ...]:
        return tuple(k for k, p in self.arguments().items() if p.default is inspect.Parameter.empty)


_REGISTRY: dict[str, OptimizerEntry] = {}


def register(
    name: str,
    factory: Callable[..., optax.GradientTransformationExtraArgs],
    *,
    needs_value_fn: bool = False,
    needs_key: bool = False,
    static_args: tuple[str, ...] = (),
    eval_params: Callable[[Any, Any], Any] | None = None,
) -> OptimizerEntry:
    """Register an optimizer factory under `name` and return its entry.

    Raises:
      ValueError: if `name` is already registered or `static_args` names an argument the
        factory does not have.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"optimizer name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY:
        raise ValueError(f"an optimizer named {name!r} is already registered.")
    entry = OptimizerEntry(
        name, factory, bool(needs_value_fn), bool(needs_key), tuple(static_args), eval_params
    )
    unknown = [a for a in entry.static_args if a not in entry.arguments()]
    if unknown:
        raise ValueError(f"static_args {unknown} are not arguments of {name!r}'s factory.")
    _REGISTRY[name] = entry
    return entry


def get(name: str) -> OptimizerEntry:
    """The entry registered under `name`; a ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; registered optimizers: {', '.join(names())}"
        ) from None


def names() -> list[str]:
    """All registered optimizer names, sorted."""
    return sorted(_REGISTRY)


def entry_of(factory: Callable[..., Any]) -> OptimizerEntry | None:
    """The entry registered with `factory` (or with a wrapper of it), None if there is none."""
    for entry in _REGISTRY.values():
        if entry.factory is factory or getattr(entry.factory, "__wrapped__", None) is factory:
            return entry
    return None


def inject_hyperparams(
    factory: Callable[..., optax.GradientTransformation],
    static_args: str | tuple[str, ...] = (),
    hyperparam_dtype: Any = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """``optax.inject_hyperparams`` with the registry's static arguments kept static.

    ``optax.inject_hyperparams(jaxopt2.kfac)(learning_rate=0.1, momentum=0.9)`` works as it
    is: every structural argument of a jaxopt2 factory defaults to None (or a dtype name),
    which optax leaves alone. But a structural argument given explicitly (``invert_every=10``,
    ``block_size=64``, ``stats_dtype=jnp.bfloat16``) would be turned into an array in the
    injected state (a dtype class would even be called as a schedule); this wrapper passes
    the entry's ``static_args`` to optax so they stay Python values, and injects every other
    number.

    Args:
      factory: a registered factory (``jaxopt2.kfac``, ``jaxopt2.adam``, ...); an unregistered
        one gets only the `static_args` given here.
      static_args: more argument names to keep static.
      hyperparam_dtype: as in ``optax.inject_hyperparams``.

    Returns:
      What ``optax.inject_hyperparams`` returns: a function of the factory's arguments
      returning an ``optax.GradientTransformationExtraArgs`` whose state holds the injected
      numbers in ``state.hyperparams``.

    Example:
      >>> import jax.numpy as jnp, jaxopt2
      >>> opt = jaxopt2.inject_hyperparams(jaxopt2.shampoo)(0.1, block_size=64)
      >>> state = opt.init(jnp.zeros((8, 4)))
      >>> sorted(k for k in state.hyperparams if k in ("learning_rate", "block_size"))
      ['learning_rate']
    """
    extra = (static_args,) if isinstance(static_args, str) else tuple(static_args)
    entry = entry_of(factory)
    static = (entry.static_args if entry is not None else ()) + extra
    return optax.inject_hyperparams(
        factory, static_args=tuple(dict.fromkeys(static)), hyperparam_dtype=hyperparam_dtype
    )
