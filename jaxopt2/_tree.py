"""Small pytree helpers shared by the curvature code and the optimizers.

Tree arithmetic itself comes from ``optax.tree`` (add, scale, vdot, norm, size, ...); this
module holds only what optax does not: input validation with messages that name the problem,
random probe vectors shaped like a pytree, a dtype-keeping ``add_scale`` and an all-finite
flag.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")


def _describe(tree: PyTree) -> str:
    leaves = jax.tree_util.tree_leaves(tree)
    shown = ", ".join(f"{jnp.result_type(x).name}{list(np.shape(x))}" for x in leaves[:6])
    more = f", ... ({len(leaves)} leaves)" if len(leaves) > 6 else ""
    return f"[{shown}{more}]"


def check_inexact(tree: PyTree, name: str) -> None:
    """Raise a TypeError naming `name` if any leaf is not a floating (or complex) array."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} is an empty pytree: there is nothing to differentiate.")
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} has dtype {dtype}; curvature products need "
                "floating-point leaves (cast integer parameters to a float dtype first)."
            )


def check_like(tree: PyTree, like: PyTree, name: str, like_name: str = "params") -> None:
    """Raise a ValueError if `tree` does not have the structure and leaf shapes of `like`."""
    s1 = jax.tree_util.tree_structure(tree)
    s2 = jax.tree_util.tree_structure(like)
    # jaxlib ships no stub for its compiled PyTreeDef class, so mypy cannot see its __ne__.
    if s1 != s2:  # type: ignore[operator]
        raise ValueError(
            f"{name} must have the same pytree structure as {like_name}; got\n  {name}: {s1}\n"
            f"  {like_name}: {s2}"
        )
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(tree),
        jax.tree_util.tree_leaves(tree),
        jax.tree_util.tree_leaves(like),
        strict=True,
    ):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path[0])} has shape {np.shape(a)} but "
                f"{like_name} has shape {np.shape(b)} there."
            )


def add_scale(tree_x: PyTree, scalar: jax.typing.ArrayLike, tree_y: PyTree) -> PyTree:
    """``tree_x + scalar * tree_y`` (``optax.tree.add_scale``) in the dtypes of `tree_x`.

    A float32 `scalar` would promote bfloat16 leaves of `tree_x`; the iterates of a
    ``lax.while_loop`` (conjugate gradients on mixed-dtype trees) must keep their dtypes.
    """
    return optax.tree.cast_like(optax.tree.add_scale(tree_x, scalar, tree_y), tree_x)


def all_finite(tree: PyTree) -> jax.Array:
    """A boolean scalar: every entry of every leaf is finite (True for an empty tree)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_positive_int(value: Any, name: str) -> int:
    """Validate a static positive integer argument and return it as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def is_concrete_number(value: Any) -> bool:
    """True for a Python/NumPy number (checked at construction); False for a tracer/array."""
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def check_hyperparameter(
    value: Any,
    name: str,
    *,
    low: float,
    high: float = float("inf"),
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Range-check a numeric hyperparameter when it is a concrete number.

    Tracers and arrays (``optax.inject_hyperparams``, ``jax.vmap`` over a grid, schedules)
    pass through unchecked, as the optimizer contract requires.
    """
    if callable(value) or not is_concrete_number(value):
        return
    ok_low = value >= low if low_inclusive else value > low
    ok_high = value <= high if high_inclusive else value < high
    if not (ok_low and ok_high) or value != value:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must lie in {lo}{low}, {high}{hi}, got {value!r}.")


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def random_probes(key: jax.Array, like: PyTree, num: int, dist: str = "rademacher") -> PyTree:
    """`num` independent probes stacked on a leading axis (a pytree of shape [num, ...]).

    Every probe has E[z zᵀ] = I (Rademacher ±1 or standard Gaussian entries), which is all
    Hutchinson-type estimators need. All entries come from one random draw of ``num × dim``
    numbers, cut into the leaves of `like`: one RNG op whatever the number of leaves, which
    keeps compile times flat for deep models. (``optax.tree.random_like`` splits the key and
    draws once per leaf, in each leaf's dtype, so Rademacher draws would need integer leaves;
    it is not used here.)
    """
    check_choice(dist, "dist", PROBE_DISTRIBUTIONS)
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [int(np.prod(np.shape(x))) for x in leaves]
    total = sum(sizes)
    if dist == "rademacher":
        flat = jax.random.rademacher(key, (num, total), dtype=jnp.int8)
    else:
        draw = functools.reduce(
            jnp.promote_types, [jnp.result_type(x) for x in leaves], jnp.float32
        )
        flat = jax.random.normal(key, (num, total), dtype=draw)
    out, start = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        dtype = jnp.result_type(leaf)
        piece = flat[:, start : start + size].astype(dtype)
        out.append(piece.reshape((num, *np.shape(leaf))))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)
