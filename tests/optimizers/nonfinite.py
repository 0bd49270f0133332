"""The non-finite contract: a step with a non-finite gradient (or curvature) must leave an
optimizer's state untouched, but for its counters, and be counted."""

import jax
import jax.numpy as jnp
import numpy as np


def check_nonfinite_step_keeps_state(opt, bad_value: float) -> None:
    """Good step, then a step whose gradient has one `bad_value` entry, then a good step.

    The bad step may return a non-finite update, but every state leaf other than ``count``
    and ``num_nonfinite`` must be bitwise unchanged, the bad step counted, and the next good
    step finite. (The state must be a NamedTuple with those two counters.)
    """
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}
    rng = np.random.default_rng(0)
    good = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    bad = {"w": good["w"].at[2, 1].set(bad_value), "b": good["b"]}
    update = jax.jit(opt.update)
    _, s1 = update(good, opt.init(params), params)
    _, s2 = update(bad, s1, params)
    before = jax.tree.leaves(s1._replace(count=0, num_nonfinite=0))
    after = jax.tree.leaves(s2._replace(count=0, num_nonfinite=0))
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(s2.num_nonfinite) == 1 and int(s2.count) == 2
    u3, s3 = update(good, s2, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((u3, s3)))


def is_counter(path) -> bool:
    """A state leaf that counts (``count``, ``num_*``): the one kind a skipped step changes."""
    last = path[-1] if path else None
    name = getattr(last, "name", None)
    return isinstance(name, str) and (name == "count" or name.startswith("num_"))


def _paired(before, after):
    """``(path, leaf before, leaf after)`` over two states of one structure."""
    pairs = zip(
        jax.tree_util.tree_leaves_with_path(before),
        jax.tree_util.tree_leaves_with_path(after),
        strict=True,
    )
    return [(path, a, b) for (path, a), (_, b) in pairs]


def changed_leaves(before, after) -> list[str]:
    """Paths of the non-counter leaves of two states that are not bitwise equal (NaN == NaN:
    a NaN kept is kept, a NaN written where there was a number is a change)."""
    out = []
    for path, a, b in _paired(before, after):
        if is_counter(path):
            continue
        if not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True):
            out.append(jax.tree_util.keystr(path))
    return out


def counted(before, after) -> int:
    """How much the ``num_nonfinite`` counters of a state grew between `before` and `after`."""
    total = 0
    for path, a, b in _paired(before, after):
        if getattr(path[-1], "name", None) == "num_nonfinite":
            total += int(b) - int(a)
    return total


def poisoned(before, after) -> list[str]:
    """Paths of the floating leaves that are all finite in `before` but not in `after` (a NaN
    a state starts with, such as K-FAC's ``rho`` before its first measurement, is no poison)."""
    out = []
    for path, a, b in _paired(before, after):
        if not jnp.issubdtype(jnp.result_type(b), jnp.inexact):
            continue
        if np.all(np.isfinite(np.asarray(a))) and not np.all(np.isfinite(np.asarray(b))):
            out.append(jax.tree_util.keystr(path))
    return out
