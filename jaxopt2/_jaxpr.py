"""A small jaxpr evaluator with hooks: how tagged losses and layers are found and rewired.

:func:`evaluate` runs a closed jaxpr equation by equation, exactly as jax would, except that
a ``hook(eqn, invals)`` may replace an equation's outputs (record an input, add a
perturbation to a layer's output, stop at the loss tag). Equations that hold sub-jaxprs
(``pjit``, ``closed_call``, ``remat``, ``custom_jvp_call``, ``custom_vjp_call``) are entered
and evaluated with the same hook when ``enter(path)`` says an equation of interest is
inside; otherwise they are bound as they are. A ``scan`` that must be entered is unrolled:
its body is evaluated once per iteration (the hook sees the same body equation ``length``
times, in iteration order). Equations are identified by the path of equation indices from
the top jaxpr (a tuple of ints), stable across retraces of the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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
    """The body of a call-like equation or a ``scan`` that :func:`evaluate` can enter."""
    if eqn.primitive.name == "scan":
        return eqn.params["jaxpr"].jaxpr
    key = _INLINE.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    sub = eqn.params[key]
    return sub.jaxpr if isinstance(sub, core.ClosedJaxpr) else sub


def _consts(eqn: core.JaxprEqn) -> Sequence[Any]:
    name = eqn.primitive.name
    sub = eqn.params["jaxpr" if name == "scan" else _INLINE[name]]
    return sub.consts if isinstance(sub, core.ClosedJaxpr) else ()


def _unrolled_scan(eqn, invals, hook, enter, path) -> list[Any]:
    """A ``scan`` evaluated iteration by iteration with the hook (its outputs stacked)."""
    p = eqn.params
    n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
    body = p["jaxpr"]
    consts, carry, xs = (
        invals[:n_consts],
        invals[n_consts : n_consts + n_carry],
        invals[n_consts + n_carry :],
    )
    ys: list[list[Any]] = []
    order = range(length - 1, -1, -1) if p["reverse"] else range(length)
    for t in order:
        outs = evaluate(
            body.jaxpr, body.consts, [*consts, *carry, *(x[t] for x in xs)], hook, enter, path
        )
        carry, y = outs[:n_carry], outs[n_carry:]
        ys.append(y)
    if p["reverse"]:
        ys.reverse()
    stacked = [jnp.stack(col) for col in zip(*ys, strict=True)] if ys and ys[0] else []
    if not ys:  # length 0: the outputs' shapes from the equation
        stacked = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.outvars[n_carry:]]
    return [*carry, *stacked]


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
            if sub is not None and enter(here) and eqn.primitive.name == "scan":
                outvals = _unrolled_scan(eqn, invals, hook, enter, here)
            elif sub is not None and enter(here):
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
