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

__all__ = ["OptimizerEntry", "get", "names", "register"]


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
