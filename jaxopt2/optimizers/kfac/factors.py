"""K-FAC's factor layout and algebra: factors grouped by size, owned per device, and their
damped inverses and eigenbases run one size after another.

Layout (fixed here once):

* **Slots.** A rank-2, rank-3 (``[L, ...]``, a scan over layers) or rank-4 (conv) leaf gets
  a pair of square factor slots of the sizes :func:`~jaxopt2.optimizers.kfac.layers.factor_sizes`
  gives (per slice for a rank-3 leaf). Which slot holds ``A`` and which ``G`` is decided by
  discovery at update time; a slot is zero-padded beyond the corner its layer uses.
* **Groups.** Leaves whose slot pair has the same two sizes, in either order, form a group:
  its factors are two stacks ``[n, S0, S1...]`` (side 0 of size ``S0 ≥ S1``, side 1 of size
  ``S1``), one row per layer (per slice), in leaf order. A leaf whose first slot is the
  smaller one is *flipped*: its slot 0 lives on side 1. The layer's gradient is kept in the
  group's orientation, ``[S0, S1]`` (transposed when ``A`` is on side 1), so preconditioning a
  group is one batched ``left @ V @ right`` whatever the layers' orientations.
* **Owners.** Under a device mesh a group (see :func:`owned`) has its rows
  rounded up to a multiple of the device count and split over the devices, the same rows on
  the same device (as Shampoo's blocks, :mod:`jaxopt2.optimizers.kronecker`): each device
  refreshes the inverses of its own layers and preconditions their gradients, and only the
  preconditioned gradients are gathered. A group that padding would more than double (10
  layers on 256 devices) is kept whole on every device.
* **Decompositions.** One batched call per matrix size, the sizes one after another
  (:func:`in_sequence`): two batched LAPACK calls at once deadlock jax 0.10's CPU runtime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt2.optimizers import kronecker as kr
from jaxopt2.optimizers.kfac.layers import factor_sizes, factor_stack
from jaxopt2.sharding import kept_rows, splits

__all__ = [
    "Group",
    "Member",
    "eigenbases",
    "identity_factors",
    "in_sequence",
    "inverses",
    "leaf_pair",
    "owned",
    "plan",
    "row_info",
    "stack_rows",
    "zero_factors",
]


@dataclasses.dataclass(frozen=True)
class Member:
    """One leaf's rows in its group: ``count`` rows from ``offset`` (``count`` is ``L`` for a
    stacked leaf, else 1); ``flip``: the leaf's slot 0 is the group's side 1."""

    leaf: int
    offset: int
    count: int
    flip: bool
    stacked: bool


@dataclasses.dataclass(frozen=True)
class Group:
    """Leaves with the same two factor sizes ``sizes = (S0, S1)``, ``S0 ≥ S1``."""

    sizes: tuple[int, int]
    members: tuple[Member, ...]

    @property
    def count(self) -> int:
        return sum(m.count for m in self.members)


def plan(shapes: Sequence[tuple[int, ...]]) -> tuple[tuple[Group, ...], dict[int, tuple]]:
    """The groups of a list of leaf shapes, and per leaf with slots ``(group index, Member)``."""
    order: list[tuple[int, int]] = []
    rows: dict[tuple[int, int], list[Member]] = {}
    for leaf, shape in enumerate(shapes):
        sizes = factor_sizes(tuple(shape))
        if sizes is None:
            continue
        key = (max(sizes), min(sizes))
        if key not in rows:
            order.append(key)
            rows[key] = []
        stack = factor_stack(tuple(shape))
        count = 1 if stack is None else stack
        offset = sum(m.count for m in rows[key])
        rows[key].append(Member(leaf, offset, count, sizes[0] < sizes[1], stack is not None))
    groups = tuple(Group(key, tuple(rows[key])) for key in order)
    where = {m.leaf: (g, m) for g, group in enumerate(groups) for m in group.members}
    return groups, where


def owned(group: Group) -> bool:
    """Whether a group's rows are split over the ambient mesh
    (:func:`jaxopt2.sharding.splits` of its layer count, the rule of
    :func:`jaxopt2.optimizers.kronecker.owned`)."""
    return splits(group.count)


def stack_rows(group: Group) -> int:
    """Rows of a group's stacks: its layer count, rounded up to a multiple of the device count
    when the group is :func:`owned` (the extra rows are padding, never used)."""
    return kept_rows(group.count)


def zero_factors(groups: Sequence[Group], dtype: Any) -> tuple:
    """Per group ``(side 0 [n, S0, S0], side 1 [n, S1, S1])`` of zeros."""
    return tuple(tuple(jnp.zeros((stack_rows(g), s, s), dtype) for s in g.sizes) for g in groups)


def identity_factors(groups: Sequence[Group], dtype: Any) -> tuple:
    """Per group a pair of identity stacks shaped like :func:`zero_factors`."""
    return tuple(tuple(kr.identity_stack(stack_rows(g), s, dtype) for s in g.sizes) for g in groups)


def leaf_pair(stacks: tuple, member: Member) -> tuple[jax.Array, jax.Array]:
    """A leaf's two slots from its group's pair of stacks, in the leaf's slot order
    (``[d, d]``, or ``[L, d, d]`` for a stacked leaf)."""
    rows = [s[member.offset : member.offset + member.count] for s in stacks]
    if not member.stacked:
        rows = [r[0] for r in rows]
    return (rows[1], rows[0]) if member.flip else (rows[0], rows[1])


def in_sequence(
    stacks: list[jax.Array], fn: Callable[[jax.Array], tuple[jax.Array, ...]]
) -> list[tuple[jax.Array, ...]]:
    """``fn`` on stacks of square matrices ``[n_i, d_i, d_i]``, batched per size, the sizes
    one after another; per input stack its results.

    Each size's batch takes a data dependency on the previous batch's result (0, or NaN if
    that result is NaN), so the batches cannot run concurrently: two batched LAPACK calls at
    once deadlock jax 0.10's CPU thread pool, and ``lax.optimization_barrier`` does not
    prevent it there (seen: potrf and trsm of different batches blocked together).
    """
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(stacks):
        if m.shape[0]:
            by_size.setdefault(m.shape[-1], []).append(i)
    out: list[Any] = [None] * len(stacks)
    for i, m in enumerate(stacks):
        if not m.shape[0]:
            out[i] = jax.eval_shape(fn, m)
            out[i] = tuple(jnp.zeros(r.shape, r.dtype) for r in out[i])
    previous: Any = None
    for _, idx in sorted(by_size.items()):
        batch = jnp.concatenate([stacks[i] for i in idx])
        if previous is not None:
            dep = jnp.minimum(jnp.abs(jnp.ravel(previous)[0]), 0.0)
            batch = batch + jnp.where(jnp.isnan(dep), 0.0, dep).astype(batch.dtype)
        results = fn(batch)
        previous = results[0]
        start = 0
        for i in idx:
            n = stacks[i].shape[0]
            out[i] = tuple(r[start : start + n] for r in results)
            start += n
    return out


def _spd_inverse(stack: jax.Array) -> tuple[jax.Array, jax.Array]:
    chol = jnp.linalg.cholesky(stack)
    eye = jnp.broadcast_to(jnp.eye(stack.shape[-1], dtype=stack.dtype), stack.shape)
    inv = jax.scipy.linalg.cho_solve((chol, True), eye)
    return inv, jnp.all(jnp.isfinite(inv), axis=(-2, -1))


def inverses(stacks: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    """Per stack ``(inverses, ok)`` of SPD matrices by Cholesky."""
    return in_sequence(stacks, _spd_inverse)


def eigenbases(
    stacks: list[jax.Array], corners: list[jax.Array]
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """Per stack of PSD slots ``(eigenvectors, eigenvalues, ok)`` of each row's used corner
    (``corners[i]``: the corner size per row), placed in the slot's top-left corner (zeros
    elsewhere), eigenvalues ascending.

    The slot's coordinates beyond the corner get ``1 + tr`` on the diagonal: above every
    eigenvalue of the corner, so they take the last columns of the ascending ``eigh`` and the
    corner's eigenvectors come out exactly, in the order ``eigh`` of the corner alone gives
    (zero padding could mix them with the corner's null space).
    """
    shifted = []
    for s, k in zip(stacks, corners, strict=True):
        outside = jnp.arange(s.shape[-1])[None, :] >= k[:, None]  # [n, d]
        s = jnp.where(outside[:, :, None] | outside[:, None, :], 0.0, s)
        fill = (1.0 + jnp.trace(s, axis1=-2, axis2=-1))[:, None]
        eye = jnp.eye(s.shape[-1], dtype=s.dtype)
        shifted.append(s + jnp.where(outside, fill, 0.0)[:, :, None] * eye)

    out = []
    for (q, w, ok), k in zip(in_sequence(shifted, _eigh), corners, strict=True):
        inside = jnp.arange(q.shape[-1])[None, :] < k[:, None]
        q = jnp.where(inside[:, :, None] & inside[:, None, :], q, 0.0)
        out.append((q, jnp.where(inside, w, 0.0), ok))
    return out


def _eigh(stack: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    w, v = jnp.linalg.eigh(stack, symmetrize_input=True)
    ok = jnp.all(jnp.isfinite(w), axis=-1) & jnp.all(jnp.isfinite(v), axis=(-2, -1))
    return v, w, ok


def row_info(groups: Sequence[Group], heads: dict[int, Any]) -> list[dict[str, np.ndarray]]:
    """Static per-row facts of every group, from the discovered layers (``heads``: leaf ->
    its first use): ``a_side`` (the side holding ``A``), ``dim_a``/``dim_g`` (the sizes K-FAC's
    π normalizes the traces by), ``k0``/``k1`` (each side's used corner) and ``layer`` (the
    row is a discovered layer, not padding or an unused leaf)."""
    out = []
    for g in groups:
        n = stack_rows(g)
        info = {
            "a_side": np.zeros(n, np.int32),
            "dim_a": np.ones(n),
            "dim_g": np.ones(n),
            "k0": np.full(n, g.sizes[0], np.int32),
            "k1": np.full(n, g.sizes[1], np.int32),
            "layer": np.zeros(n, bool),
        }
        for m in g.members:
            layer = heads.get(m.leaf)
            if layer is None:
                continue
            rows = slice(m.offset, m.offset + m.count)
            a_side = layer.a_slot ^ int(m.flip)
            ka = layer.in_features + (layer.bias is not None)
            kg = layer.out_features
            info["a_side"][rows] = a_side
            info["dim_a"][rows] = ka
            info["dim_g"][rows] = kg
            info["k0"][rows] = ka if a_side == 0 else kg
            info["k1"][rows] = kg if a_side == 0 else ka
            info["layer"][rows] = True
        out.append(info)
    return out
