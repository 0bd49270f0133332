"""Helpers shared by the reference tests: run an optimizer for a few steps, compare paths.

The references in this package are plain numpy float64 implementations written from the
papers' equations and the documented conventions of each optimizer (what a hyperparameter
means, where damping goes, how moments are bias-corrected). They are compared with the
library on whole trajectories, the parameters after every step, so a one-spot bug anywhere
in the update (a statistic, a root, a refresh, a moment) shows up as a diverging path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxopt2


def library_path(opt, loss_fn, params, steps, *batch, keys=None, extra_args=False):
    """The parameters after each of `steps` steps of `opt` (numpy float64, one dict a step).

    With ``extra_args`` the step goes through :func:`jaxopt2.value_and_update` (``value_fn``
    and, with `keys`, ``key``); otherwise ``opt.update(grad, state, params)``.
    """

    @jax.jit
    def step(p, s, k):
        if extra_args:
            _, u, s = jaxopt2.value_and_update(opt, loss_fn, p, s, *batch, key=k)
        else:
            u, s = opt.update(jax.grad(loss_fn)(p, *batch), s, p)
        return optax.apply_updates(p, u), s

    p = jax.tree.map(jnp.asarray, params)
    s = opt.init(p)
    path = []
    for i in range(steps):
        p, s = step(p, s, None if keys is None else keys[i])
        path.append(jax.tree.map(np.asarray, p))
    return path


def assert_paths_close(got, want, rtol=1e-9, atol=1e-12):
    """Every step's parameters agree, leaf by leaf; the message names the first step off."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for name in w:
            np.testing.assert_allclose(
                g[name], w[name], rtol=rtol, atol=atol, err_msg=f"step {i + 1}, leaf {name!r}"
            )
