"""Deprecated call forms that keep working for one release, with a DeprecationWarning.

:func:`keyword_only` wraps a factory whose signature is already the new one (keyword-only
after its leading positional arguments, new argument names): the wrapper's signature is the
factory's, so ``inspect.signature``, the registry and ``optax.inject_hyperparams`` see only
the new form. Called directly, the wrapper still accepts

* extra positional arguments, mapped to the names they had in the old signature
  (`legacy_order`), each with a warning naming the argument;
* old keyword names (`renamed`), mapped to the new names with a warning.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["keyword_only"]


def keyword_only(
    *,
    legacy_order: tuple[str, ...] | None = None,
    renamed: dict[str, str] | None = None,
    added: tuple[str, ...] = (),
    who: str | None = None,
) -> Callable[[F], F]:
    """Decorate a factory whose arguments after the positional ones are keyword-only.

    Args:
      legacy_order: the old names of the arguments that used to follow the positional ones,
        in their old positional order (old names are translated through `renamed`). None:
        the keyword-only arguments in the order of the signature, less `added`.
      renamed: old keyword name -> new name; the old name warns and is mapped.
      added: keyword-only arguments that never were positional (left out of the default
        `legacy_order`).
      who: the name in the messages (default: the function's ``__name__``).
    """
    renamed = dict(renamed or {})

    def decorate(factory: F) -> F:
        signature = inspect.signature(factory)
        params = list(signature.parameters.values())
        num_positional = sum(
            p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for p in params
        )
        order = legacy_order
        if order is None:
            order = tuple(
                p.name
                for p in params
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in added
            )
        name = who or factory.__name__
        unknown = [
            renamed.get(a, a) for a in order if renamed.get(a, a) not in signature.parameters
        ]
        if unknown:
            raise ValueError(f"legacy arguments {unknown} are not arguments of {name}.")

        @functools.wraps(factory)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) > num_positional:
                extra = args[num_positional:]
                args = args[:num_positional]
                if len(extra) > len(order):
                    raise TypeError(
                        f"{name}() takes at most {num_positional + len(order)} positional "
                        f"arguments ({num_positional} from the next release), got "
                        f"{num_positional + len(extra)}."
                    )
                for old, value in zip(order, extra, strict=False):
                    new = renamed.get(old, old)
                    if new in kwargs or old in kwargs:
                        raise TypeError(f"{name}() got multiple values for argument {new!r}.")
                    warnings.warn(
                        f"jaxopt2.{name}: passing {new!r} positionally is deprecated; it "
                        f"becomes keyword-only in the next release: write {name}(..., "
                        f"{new}=...).",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = value
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {old!r} and its new name {new!r}.")
                    warnings.warn(
                        f"jaxopt2.{name}: the argument {old!r} is deprecated and will be "
                        f"removed in the next release: use {new!r} (same meaning).",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return factory(*args, **kwargs)

        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
