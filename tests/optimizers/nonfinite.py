"""A shared check: one non-finite gradient must leave an optimizer's state untouched."""

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
