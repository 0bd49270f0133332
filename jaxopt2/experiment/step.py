"""The pieces of one training step, pure functions used by the engine
(:mod:`jaxopt2.experiment.engine`, which maps them over its members) and the setup: the
epoch order, the batch of a step, the optimizer step, and the conversion of curvature
diagnostics into metric-row fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt2.experiment.rundir import clean
from jaxopt2.optimizers._contract import value_and_update

__all__ = ["batch_at", "diagnostics_row", "epoch_order", "train_step"]

I32 = jnp.int32


def epoch_order(data_key: jax.Array, step: jax.Array, steps_per_epoch: int, n_rows: int):
    """The row order of the epoch that `step` is in: a function of the data key and epoch."""
    epoch = step // steps_per_epoch
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), n_rows).astype(I32)


def batch_at(
    data: tuple[jax.Array, ...],
    perm: jax.Array,
    step: jax.Array,
    batch_size: int,
    steps_per_epoch: int,
) -> tuple[jax.Array, ...]:
    """The rows of `data` that `step` trains on, given its epoch's order `perm`."""
    pos = step % steps_per_epoch
    idx = jax.lax.dynamic_slice_in_dim(perm, pos * batch_size, batch_size)
    return tuple(jnp.take(a, idx, axis=0) for a in data)


def diagnostics_row(out: dict[str, Any], top_k: int) -> dict[str, Any]:
    """Metrics-row fields from one run's diagnostics output (host arrays): scalars as floats
    (None if not finite), ``top_eigenvalues`` and ``grad_share_by_k`` as lists when more than
    one eigenpair was computed."""
    row: dict[str, Any] = {}
    for k, v in out.items():
        if k in ("top_eigenvalues", "grad_share_by_k"):
            if top_k > 1:
                row[k] = [clean(float(x)) for x in np.asarray(v)]
        else:
            row[k] = clean(float(v))
    return row


def train_step(
    tx: optax.GradientTransformation,
    loss_fn: Callable[..., jax.Array],
    params: Any,
    opt_state: Any,
    batch: tuple[jax.Array, ...],
    key: jax.Array,
) -> tuple[jax.Array, Any, Any, Any, jax.Array]:
    """One optimizer step: ``(loss, updates, new_params, new_opt_state, finite)``.

    ``finite`` says whether the loss and every update are finite (the caller decides what
    to keep).
    """
    loss, updates, new_opt = value_and_update(tx, loss_fn, params, opt_state, *batch, key=key)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.array([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)])
    )
    return loss, updates, new_params, new_opt, finite
