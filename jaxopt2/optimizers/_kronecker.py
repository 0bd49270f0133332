"""Blocks and Kronecker factors: the machinery Shampoo and SOAP share.

Conventions (fixed here once):

* **Matrix view.** A parameter leaf is seen as a matrix ``rows × cols``: dimensions of size 1
  are dropped; rank 2 is kept as it is; rank 3+ is split into (leading dims, trailing dims) at
  the point that makes the larger side smallest (a conv kernel ``3×3×16×32`` becomes
  ``144×32``), which merges small dimensions. Scalars and vectors have no matrix view: they get
  only the diagonal (grafted) method.
* **Dimension limit.** A side longer than ``max_precondition_dim`` is not preconditioned (its
  factor is the identity); a leaf with both sides over the limit is diagonal-only.
* **Blocks.** The matrix is cut into blocks of at most ``block_size × block_size``, row-major:
  full blocks, then the right edge, the bottom edge and the corner. Blocks with the same
  ``(r, c)`` shape and the same preconditioned sides form a *group*, stacked ``[n, r, c]``
  across all leaves, so statistics and preconditioning are one batched matmul per group.
* **Factors.** Each block has a left factor ``L = E[G Gᵀ]`` (``r × r``) and a right factor
  ``R = E[Gᵀ G]`` (``c × c``) where its side is preconditioned. Statistics and the
  preconditioners made from them (inverse roots, eigenbases) are kept per group and side,
  ``[n, d, d]``, in the group's block order. For the eigendecomposition the factors are
  zero-padded to the largest factor size ``D`` and stacked: **one** batched ``eigh`` per
  refresh, whatever the mix of shapes. (Several differently shaped eigh in one XLA program is
  the pattern that deadlocks jax 0.10's CPU runtime; one eigh cannot.) Zero padding is exact:
  the padded coordinates decouple, and slicing ``[:d, :d]`` of any spectral function of the
  padded matrix gives that function of the factor (same ``λ_max``, so the same relative
  damping).
* **Owners.** Under a device mesh every per-group stack (blocks, statistics, preconditioners,
  moments in the eigenbasis) has its rows rounded up to a multiple of the device count
  (:func:`stack_rows`) and split over the devices, the same rows on the same device: each
  device updates the statistics of the blocks it owns, decomposes their factors (its own one
  ``eigh``, :func:`jaxopt2._sharding.map_split`) and preconditions them, and only the
  preconditioned blocks are gathered (parameter-sized), as Distributed Shampoo does.

Everything here is static Python over shapes (the plan) plus pure array functions of it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt2._sharding import kept_rows, map_split, own_rows, splits

# Re-exported: Shampoo, SOAP and K-FAC call it as kr.all_finite.
from jaxopt2._tree import all_finite  # noqa: F401
from jaxopt2.linalg.roots import symmetric_eigh

__all__ = [
    "Group",
    "LeafView",
    "Plan",
    "Region",
    "descending_eigh",
    "from_blocks",
    "identity_factors",
    "make_plan",
    "pad_blocks",
    "pair_sides",
    "plan_for_tree",
    "real_rows",
    "side_dims",
    "sides",
    "split_stack",
    "stack_factors",
    "stack_rows",
    "to_blocks",
    "zero_statistics",
]

HIGHEST = jax.lax.Precision.HIGHEST


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched matmul at HIGHEST precision (curvature statistics must not use TF32/bf16)."""
    return jnp.matmul(a, b, precision=HIGHEST)


def mmt(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ bᵀ`` over the last two axes, HIGHEST precision."""
    return jnp.matmul(a, jnp.swapaxes(b, -1, -2), precision=HIGHEST)


def tmm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``aᵀ @ b`` over the last two axes, HIGHEST precision."""
    return jnp.matmul(jnp.swapaxes(a, -1, -2), b, precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class Region:
    """A regular grid of equal blocks inside one leaf's matrix view."""

    row0: int
    col0: int
    n_rows: int  # blocks down
    n_cols: int  # blocks across
    r: int
    c: int
    group: int
    offset: int  # index of the first block in the group's stack


@dataclasses.dataclass(frozen=True)
class LeafView:
    """How one leaf is preconditioned: its matrix view and its block regions (or none)."""

    shape: tuple[int, ...]
    matrix: tuple[int, int] | None
    regions: tuple[Region, ...]


@dataclasses.dataclass(frozen=True)
class Group:
    """Blocks of one shape with the same preconditioned sides, stacked ``[count, r, c]``.

    ``left`` / ``right``: the index of the group's first left / right factor in the padded
    factor stack, or None when that side is not preconditioned.
    """

    r: int
    c: int
    count: int
    left: int | None
    right: int | None


@dataclasses.dataclass(frozen=True)
class Plan:
    leaves: tuple[LeafView, ...]
    groups: tuple[Group, ...]
    num_factors: int
    dim: int  # D: the padded factor size (0 when nothing is preconditioned)

    @property
    def num_blocks(self) -> int:
        return sum(g.count for g in self.groups)


def _matrix_view(shape: tuple[int, ...]) -> tuple[int, int] | None:
    dims = [d for d in shape if d != 1]
    if len(dims) < 2:
        return None
    if len(dims) == 2:
        return dims[0], dims[1]
    best = None
    for k in range(1, len(dims)):
        rows, cols = math.prod(dims[:k]), math.prod(dims[k:])
        if best is None or max(rows, cols) < max(best):
            best = (rows, cols)
    return best


def _grid(length: int, block: int) -> list[tuple[int, int, int]]:
    """``(start, count, size)`` runs of equal pieces covering ``range(length)``."""
    full, rem = divmod(length, block)
    out = []
    if full:
        out.append((0, full, block))
    if rem:
        out.append((full * block, 1, rem))
    return out


def make_plan(
    shapes: Sequence[tuple[int, ...]],
    *,
    block_size: int,
    max_precondition_dim: int,
    one_sided: bool = False,
) -> Plan:
    """The static blocking plan for leaves of these shapes (see the module docstring).

    With ``one_sided`` only the smaller side of each block is preconditioned (the left one on
    a tie).
    """
    group_index: dict[tuple[int, int, bool, bool], int] = {}
    group_counts: list[int] = []
    group_keys: list[tuple[int, int, bool, bool]] = []
    pending: list[tuple[tuple[int, ...], tuple[int, int] | None, list[tuple]]] = []
    for shape in shapes:
        shape = tuple(int(d) for d in shape)
        view = _matrix_view(shape)
        if view is not None:
            rows, cols = view
            left_ok, right_ok = rows <= max_precondition_dim, cols <= max_precondition_dim
            if not (left_ok or right_ok):
                view = None
        regions = []
        if view is not None:
            for row0, n_rows, r in _grid(rows, block_size):
                for col0, n_cols, c in _grid(cols, block_size):
                    lft, rgt = left_ok, right_ok
                    if one_sided and lft and rgt:
                        lft, rgt = r <= c, r > c
                    key = (r, c, lft, rgt)
                    if key not in group_index:
                        group_index[key] = len(group_counts)
                        group_counts.append(0)
                        group_keys.append(key)
                    g = group_index[key]
                    regions.append((row0, col0, n_rows, n_cols, r, c, g, group_counts[g]))
                    group_counts[g] += n_rows * n_cols
        pending.append((shape, view, regions))

    groups, num_factors, dim = [], 0, 0
    for (r, c, lft, rgt), count in zip(group_keys, group_counts, strict=True):
        left = right = None
        if lft:
            left, num_factors, dim = num_factors, num_factors + count, max(dim, r)
        if rgt:
            right, num_factors, dim = num_factors, num_factors + count, max(dim, c)
        groups.append(Group(r, c, count, left, right))
    leaves = tuple(
        LeafView(shape, view, tuple(Region(*reg) for reg in regions))
        for shape, view, regions in pending
    )
    return Plan(leaves, tuple(groups), num_factors, dim)


def plan_for_tree(tree: Any, block_size: int, max_precondition_dim: int, one_sided: bool) -> Plan:
    """:func:`make_plan` for the leaves of a pytree (parameters or updates)."""
    return make_plan(
        [jnp.shape(x) for x in jax.tree.leaves(tree)],
        block_size=block_size,
        max_precondition_dim=max_precondition_dim,
        one_sided=one_sided,
    )


def owned(group: Group) -> bool:
    """Whether a group's blocks are split over the ambient mesh
    (:func:`jaxopt2._sharding.splits` of its block count)."""
    return splits(group.count)


def stack_rows(group: Group) -> int:
    """Rows of a group's stacks in the state: its block count, rounded up to a multiple of
    the device count when the group is :func:`owned` (the extra rows are padding, never
    used)."""
    return kept_rows(group.count)


def zero_statistics(plan: Plan, dtype: Any) -> tuple:
    """Per group ``(L [n, r, r], R [n, c, c])`` of zeros (None for a side not preconditioned);
    ``n`` is :func:`stack_rows`."""
    square = lambda n, d: jnp.zeros((n, d, d), dtype)
    return tuple(
        (
            None if g.left is None else square(stack_rows(g), g.r),
            None if g.right is None else square(stack_rows(g), g.c),
        )
        for g in plan.groups
    )


def identity_factors(plan: Plan, dtype: Any, dim: int | None = None) -> tuple:
    """Per group ``(left, right)`` stacks of identities shaped like :func:`zero_statistics`
    (or ``dim × dim`` for every side when `dim` is given)."""
    eye = lambda n, d: identity_stack(n, d if dim is None else dim, dtype)
    return tuple(
        (
            None if g.left is None else eye(stack_rows(g), g.r),
            None if g.right is None else eye(stack_rows(g), g.c),
        )
        for g in plan.groups
    )


def sides(pairs: Sequence[tuple[Any, ...]]) -> list:
    """The preconditioned sides of per-group ``(left, right)`` pairs, in factor order."""
    return [x for pair in pairs for x in pair if x is not None]


def pair_sides(plan: Plan, items: Sequence[Any]) -> tuple:
    """Inverse of :func:`sides`: per-group ``(left, right)`` pairs from a flat list."""
    it = iter(items)
    return tuple(
        (None if g.left is None else next(it), None if g.right is None else next(it))
        for g in plan.groups
    )


def _per_side(plan: Plan, value) -> list:
    return sides([tuple(None if i is None else value(g) for i in (g.left, g.right))
                  for g in plan.groups])  # fmt: skip


def side_dims(plan: Plan) -> list[int]:
    """The factor size (``r`` for a left side, ``c`` for a right one) of each side of
    :func:`sides`."""
    return sides([(None if g.left is None else g.r, None if g.right is None else g.c)
                  for g in plan.groups])  # fmt: skip


def map_sides(plan: Plan, fn, factors: list, old: list, t: Any) -> tuple[list, list]:
    """A refresh of every side's preconditioner, each device doing the sides of its own blocks.

    ``fn(factors, old, dims, t) -> (new, bad)`` maps lists of per-side stacks (factors, the
    stored preconditioners, the factor sizes) to the new preconditioners and per-row failure
    flags. Under a mesh it runs once per device (:func:`jaxopt2._sharding.map_split`) on that
    device's rows of the owned groups' sides and the whole of the other groups' sides, so one
    batched decomposition covers both. Returns ``(new, bad)`` in side order.
    """
    dims = side_dims(plan)

    def body(items, t):
        new, bad = fn([f for f, _ in items], [o for _, o in items], dims, t)
        return list(zip(new, bad, strict=True))

    items = list(zip(factors, old, strict=True))
    out = map_split(body, items, _per_side(plan, owned), t)
    return [n for n, _ in out], [b for _, b in out]


def real_rows(plan: Plan) -> list[jax.Array]:
    """Per side of :func:`sides`, whether each row of its stack is a real block (not padding)."""
    return _per_side(plan, lambda g: jnp.arange(stack_rows(g)) < g.count)


def pad_blocks(blocks: Sequence[jax.Array]) -> list[jax.Array]:
    """Each group's ``[count, r, c]`` block stack zero-padded to :func:`stack_rows` rows and
    split along its rows over the ambient mesh when it is :func:`owned` (each device holds the
    blocks it owns; :func:`jaxopt2._sharding.own_rows`)."""
    return [own_rows(b) for b in blocks]


def to_blocks(plan: Plan, leaves: Sequence[jax.Array], dtype: Any) -> list[jax.Array]:
    """The leaves cut into blocks: one ``[count, r, c]`` stack per group (in `dtype`)."""
    parts: list[list[jax.Array]] = [[] for _ in plan.groups]
    for view, leaf in zip(plan.leaves, leaves, strict=True):
        if view.matrix is None:
            continue
        m = jnp.reshape(leaf, view.matrix).astype(dtype)
        for reg in view.regions:
            sub = m[
                reg.row0 : reg.row0 + reg.n_rows * reg.r, reg.col0 : reg.col0 + reg.n_cols * reg.c
            ]
            sub = sub.reshape(reg.n_rows, reg.r, reg.n_cols, reg.c).transpose(0, 2, 1, 3)
            parts[reg.group].append(sub.reshape(-1, reg.r, reg.c))
    return [p[0] if len(p) == 1 else jnp.concatenate(p) for p in parts]


def from_blocks(plan: Plan, blocks: Sequence[jax.Array], leaves: Sequence[jax.Array]) -> list:
    """Inverse of :func:`to_blocks`: leaves with a matrix view are rebuilt from the blocks
    (cast to the leaf's dtype); the others are returned as given in `leaves`."""
    out = []
    for view, leaf in zip(plan.leaves, leaves, strict=True):
        if view.matrix is None:
            out.append(leaf)
            continue
        rows: dict[int, list[jax.Array]] = {}
        for reg in view.regions:
            b = blocks[reg.group][reg.offset : reg.offset + reg.n_rows * reg.n_cols]
            b = b.reshape(reg.n_rows, reg.n_cols, reg.r, reg.c).transpose(0, 2, 1, 3)
            rows.setdefault(reg.row0, []).append(b.reshape(reg.n_rows * reg.r, reg.n_cols * reg.c))
        band = [
            r[0] if len(r) == 1 else jnp.concatenate(r, axis=1) for _, r in sorted(rows.items())
        ]
        m = band[0] if len(band) == 1 else jnp.concatenate(band, axis=0)
        out.append(m.reshape(view.shape).astype(jnp.result_type(leaf)))
    return out


def stack_factors(items: Sequence[jax.Array], dim: int, *, for_eigenvectors: bool = False):
    """Square factor stacks ``[n_i, d_i, d_i]`` zero-padded to ``dim × dim`` and concatenated
    ``[sum n_i, dim, dim]``: one stack for one batched decomposition.

    Padding is zero, which is exact for spectral functions sliced back with ``[:d, :d]``
    (inverse roots). With ``for_eigenvectors`` the padded diagonal is ``-(1 + tr X)`` instead:
    below every eigenvalue of the PSD factor, so that in :func:`descending_eigh` the padded
    coordinates take the last columns and ``Q[:d, :d]`` holds the factor's eigenvectors.
    """
    parts = []
    for f in items:
        n = f.shape[-1]
        if n < dim:
            f = jnp.pad(f, ((0, 0), (0, dim - n), (0, dim - n)))
            if for_eigenvectors:
                fill = -(1.0 + jnp.trace(f, axis1=-2, axis2=-1))[:, None]
                pad = jnp.where(jnp.arange(dim) >= n, fill, 0.0)
                f = f + pad[:, :, None] * jnp.eye(dim, dtype=f.dtype)
        parts.append(f)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def split_stack(tree: Any, sizes: Sequence[int]) -> list:
    """Inverse of :func:`stack_factors` along the rows: the pieces of every leaf of `tree`
    (a stack or a pytree of stacks with the same leading axis), ``sizes[i]`` rows each."""
    out, start = [], 0
    for n in sizes:
        out.append(jax.tree.map(lambda x, a=start, n=n: x[a : a + n], tree))
        start += n
    return out


def descending_eigh(stack: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(eigenvalues, eigenvectors, ok)`` of a padded stack, eigenvalues descending.

    One batched ``eigh`` (the deadlock-safe shape); ``ok`` is False for non-finite results.
    """
    w, q = symmetric_eigh(stack)
    w, q = w[..., ::-1], q[..., ::-1]
    ok = jnp.all(jnp.isfinite(q), axis=(-2, -1)) & jnp.all(jnp.isfinite(w), axis=-1)
    return w, q, ok


def precondition(blocks: jax.Array, left: jax.Array | None, right: jax.Array | None):
    """``left @ G @ right`` per block (a missing side is the identity)."""
    out = blocks if left is None else mm(left, blocks)
    return out if right is None else mm(out, right)


def block_norms(blocks: jax.Array) -> jax.Array:
    """Frobenius norm of each block of a ``[n, r, c]`` stack, shape ``[n, 1, 1]``."""
    return jnp.sqrt(jnp.sum(jnp.square(blocks), axis=(-2, -1), keepdims=True))


def ema(old: jax.Array, new: jax.Array, decay: Any) -> jax.Array:
    return decay * old + (1.0 - decay) * new


def shampoo_statistics(blocks, stats, decay):
    """``L ← β L + (1-β) G Gᵀ``, ``R ← β R + (1-β) Gᵀ G`` per group (None sides stay None)."""
    return tuple(
        (
            None if left is None else ema(left, mmt(g, g), decay),
            None if right is None else ema(right, tmm(g, g), decay),
        )
        for g, (left, right) in zip(blocks, stats, strict=True)
    )


def eig_power(q: jax.Array, s: jax.Array, power: float, damping: Any) -> jax.Array:
    """``(d + max(ε·max d, tiny))^power`` with ``d = diag(qᵀ s q)`` (``[n, d]``): the eigenvalues
    of the factor ``s`` in the (possibly stale) eigenbasis ``q``, re-estimated cheaply."""
    d = jnp.maximum(jnp.sum(q * mm(s, q), axis=-2), 0.0)
    floor = jnp.maximum(damping * jnp.max(d, axis=-1, keepdims=True), jnp.finfo(d.dtype).tiny)
    return (d + floor) ** power


def kl_statistics(blocks, stats, bases, first, correction, decay, damping):
    """KL-minimizing factor statistics (KL-Shampoo / KL-SOAP, arXiv:2509.03378).

    ``L ← β L + (1-β)/c · G R⁻¹ Gᵀ`` and ``R ← β R + (1-β)/r · Gᵀ L⁻¹ G``, where each inverse
    is taken in the stored eigenbasis (``bases``: per group ``(Q_L, Q_R)`` like `stats`) with
    eigenvalues re-estimated from the bias-corrected statistics (``stats / correction``). On
    the ``first`` step there
    is no factor yet: the scalar inverses ``(r/‖G‖) I`` and ``(c/‖G‖) I`` make
    ``tr(L)·tr(R) = ‖G‖²``, the scale of the Kronecker product being estimated.
    """
    out = []
    for g, (left, right), (ql, qr) in zip(blocks, stats, bases, strict=True):
        r, c = g.shape[-2:]
        gnorm = jnp.maximum(block_norms(g)[..., 0], jnp.finfo(g.dtype).tiny)  # [n, 1]
        new_l = new_r = None
        if left is not None:
            if right is None:
                h, s_r = g, jnp.ones((g.shape[0], c), g.dtype)
            else:
                h = mm(g, qr)
                s_r = jnp.where(first, c / gnorm, eig_power(qr, right / correction, -1.0, damping))
            new_l = ema(left, mmt(h * s_r[:, None, :], h) / c, decay)
        if right is not None:
            if left is None:
                h, s_l = g, jnp.ones((g.shape[0], r), g.dtype)
            else:
                h = tmm(ql, g)
                s_l = jnp.where(first, r / gnorm, eig_power(ql, left / correction, -1.0, damping))
            new_r = ema(right, tmm(h * s_l[:, :, None], h) / r, decay)
        out.append((new_l, new_r))
    return tuple(out)


def identity_stack(num: int, dim: int, dtype: Any) -> jax.Array:
    return jnp.broadcast_to(jnp.eye(dim, dtype=dtype), (num, dim, dim))


def state_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (works on ``jax.eval_shape`` outputs too)."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
