"""Factor algebra for K-FAC: damped inverses and eigenbases, batched per size and run in
sequence (the jax 0.10 CPU deadlock pattern is two batched LAPACK calls at once)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt2.sharding import gather_rows, map_rows, padded_rows

__all__ = ["eigenbases", "ema_into", "inverses"]


def _in_sequence(
    mats: list[jax.Array], fn: Callable[[jax.Array], tuple[jax.Array, ...]]
) -> list[tuple[jax.Array, ...]]:
    """``fn`` on one stack per matrix size, the stacks one after another; per-matrix results.

    Each stack takes a data dependency on the previous stack's result (0, or NaN if that
    result is NaN), so the batches cannot run concurrently: two batched LAPACK calls at once
    deadlock jax 0.10's CPU thread pool, and ``lax.optimization_barrier`` does not prevent it
    there (seen: potrf and trsm of different batches blocked together).

    Under a device mesh (``jax.set_mesh``) each stack is padded with identity matrices to a
    multiple of the device count and split across the devices along its stack axis (each
    inverts its own share); the results are gathered (see :mod:`jaxopt2.sharding`).
    """
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(mats):
        by_size.setdefault(m.shape[-1], []).append(i)
    out: list[Any] = [None] * len(mats)
    previous: Any = None
    for _, idx in sorted(by_size.items()):
        stack = jnp.stack([mats[i] for i in idx])
        if previous is not None:
            dep = jnp.minimum(jnp.abs(jnp.ravel(previous)[0]), 0.0)
            stack = stack + jnp.where(jnp.isnan(dep), 0.0, dep).astype(stack.dtype)
        rows = padded_rows(len(idx))
        if rows > len(idx):
            eye = jnp.eye(stack.shape[-1], dtype=stack.dtype)
            stack = jnp.concatenate([stack, jnp.broadcast_to(eye, (rows - len(idx), *eye.shape))])
        results = gather_rows(map_rows(fn, stack))
        previous = results[0]
        for j, i in enumerate(idx):
            out[i] = tuple(r[j] for r in results)
    return out


def _spd_inverse(stack: jax.Array) -> tuple[jax.Array, jax.Array]:
    chol = jnp.linalg.cholesky(stack)
    eye = jnp.broadcast_to(jnp.eye(stack.shape[-1], dtype=stack.dtype), stack.shape)
    inv = jax.scipy.linalg.cho_solve((chol, True), eye)
    return inv, jnp.all(jnp.isfinite(inv), axis=(-2, -1))


def _eigh(stack: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    w, v = jnp.linalg.eigh(stack, symmetrize_input=True)
    ok = jnp.all(jnp.isfinite(w), axis=-1) & jnp.all(jnp.isfinite(v), axis=(-2, -1))
    return v, w, ok


def inverses(mats: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    """``(inverse, ok)`` of SPD matrices by Cholesky."""
    return _in_sequence(mats, _spd_inverse)


def eigenbases(mats: list[jax.Array]) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """``(eigenvectors, eigenvalues, ok)`` of symmetric matrices."""
    return _in_sequence(mats, _eigh)


def ema_into(slot: jax.Array, stat: jax.Array, decay: Any) -> jax.Array:
    """EMA of `stat` into the top-left corner of `slot` (the rest stays zero); leading axes
    (a stack of factors) are matched as they are."""
    rows, cols = stat.shape[-2:]
    padded = jnp.zeros_like(slot).at[..., :rows, :cols].set(stat.astype(slot.dtype))
    return decay * slot + (1 - decay) * padded
