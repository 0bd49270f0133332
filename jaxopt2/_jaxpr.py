"""A small jaxpr evaluator with hooks: how tagged losses and layers are found and rewired.

:func:`evaluate` runs a closed jaxpr equation by equation, exactly as jax would, except that
a ``hook(eqn, invals)`` may replace an equation's outputs (record an input, add a
perturbation to a layer's output, stop at the loss tag). Equations that hold sub-jaxprs
(``pjit``, ``closed_call``, ``remat``, ``custom_jvp_call``, ``custom_vjp_call``) are entered
and evaluated with the same hook when :func:`contains` says an equation of interest is
inside; otherwise they are bound as they are. Equations are identified by the path of
equation indices from the top jaxpr (a tuple of ints), stable across retraces of the same
function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core

__all__ = ["EqnPath", "evaluate", "inner_jaxpr", "walk"]

EqnPath = tuple[int, ...]
# Higher-order primitives whose body is evaluated inline, and the param holding the body.
_INLINE = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


def inner_jaxpr(eqn: core.JaxprEqn) -> core.Jaxpr | None:
    """The body of a call-like equation that :func:`evaluate` can enter, or None."""
    key = _INLINE.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    sub = eqn.params[key]
    return sub.jaxpr if isinstance(sub, core.ClosedJaxpr) else sub


def _consts(eqn: core.JaxprEqn) -> Sequence[Any]:
    sub = eqn.params[_INLINE[eqn.primitive.name]]
    return sub.consts if isinstance(sub, core.ClosedJaxpr) else ()


def walk(jaxpr: core.Jaxpr, path: EqnPath = ()):
    """Yield ``(path, eqn)`` for every equation, entering call-like bodies (pre-order)."""
    for i, eqn in enumerate(jaxpr.eqns):
        yield (*path, i), eqn
        sub = inner_jaxpr(eqn)
        if sub is not None:
            yield from walk(sub, (*path, i))


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, core.Literal) else env[v]


def evaluate(
    jaxpr: core.Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    hook: Callable[[EqnPath, core.JaxprEqn, list[Any]], list[Any] | None],
    enter: Callable[[EqnPath], bool],
    path: EqnPath = (),
) -> list[Any]:
    """Evaluate `jaxpr` on `args`; ``hook`` may return replacement outputs for an equation.

    ``enter(path)`` says whether a call-like equation at `path` must be evaluated inline
    (because the hook wants to see inside it).
    """
    env: dict[Any, Any] = {}
    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        here = (*path, i)
        invals = [_read(env, v) for v in eqn.invars]
        outvals = hook(here, eqn, invals)
        if outvals is None:
            sub = inner_jaxpr(eqn)
            if sub is not None and enter(here):
                outvals = evaluate(sub, _consts(eqn), invals, hook, enter, here)
            else:
                params = eqn.primitive.get_bind_params(eqn.params)
                with eqn.ctx.manager:
                    ans = eqn.primitive.bind(*invals, **params)
                outvals = list(ans) if eqn.primitive.multiple_results else [ans]
        for v, x in zip(eqn.outvars, outvals, strict=True):
            if not isinstance(v, core.DropVar):
                env[v] = x
    return [_read(env, v) for v in jaxpr.outvars]


def trace(fn: Callable[..., Any], *args: Any) -> core.ClosedJaxpr:
    """``jax.make_jaxpr(fn)(*args)`` (args flattened as the jaxpr's inputs)."""
    return jax.make_jaxpr(fn)(*args)
