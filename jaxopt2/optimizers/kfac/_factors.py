"""K-FAC's factor layout and algebra: factors grouped by size, owned per device, and their
damped inverses and eigenbases run one size after another.

Layout (fixed here once):

* **Slots.** Which leaves get factors, and of which sizes, is fixed at ``init``, which sees
  the parameters alone (possibly under ``jax.eval_shape``). Two ways (:func:`plan`):

  - *A layer plan* (``kfac(layers=jaxopt2.kfac_layers(loss_fn, params, *batch))``): the
    :class:`~jaxopt2.optimizers.kfac._layers.Discovery` of the loss names the layers, so
    exactly their weight leaves get slots, sized ``in (+1 with a bias)`` and ``out`` (per
    slice of a scan over layers), and every other leaf (an embedding table, which is indexed
    and never multiplied; a positional table; a norm's scale) costs no factor state. The
    update checks that ``value_fn`` still has those layers. This is the only way to give
    attention kernels (rank 3, read by the shape rule as stacks) their factors.
  - *The shape rule* (no plan): a rank-2, rank-3 (``[L, ...]``, a scan over layers) or
    rank-4 (conv) leaf gets the pair of slots
    :func:`~jaxopt2.optimizers.kfac._layers.factor_sizes` gives, used or not (shapes cannot
    tell an embedding table from a weight); a layer its leaf's slots cannot hold is
    preconditioned diagonally. Which slot holds ``A`` and which ``G`` is decided by
    discovery at update time; a slot is zero-padded beyond the corner its layer uses.

  Either way a side longer than ``max_factor_dim`` (features; the bias's extra coordinate
  does not count) is *diagonal*: a vector ``[S]`` of the factor's diagonal (its statistic
  ``Σ rows²``, its damped inverse elementwise), so a ``[D, V]`` head over a large
  vocabulary gets one-sided K-FAC (full ``D + 1`` side, diagonal ``V`` side) and no side
  costs more than ``max_factor_dim + 1`` times its length.
  A diagonal side's stacks are ``[n, S]`` instead of ``[n, S, S]``; the helpers below
  (:func:`trace`, :func:`damped`, :func:`sandwich`, ...) tell the two apart by rank.
* **Groups.** Leaves whose slot pair has the same two sides (size, diagonal or not), in
  either order, form a group: its factors are two stacks ``[n, S0, S0]`` and ``[n, S1, S1]``
  (``[n, S]`` for a diagonal side; side 0 the larger), one row per layer (per slice), in
  leaf order. A leaf whose first slot is the smaller one is *flipped*: its slot 0 lives on
  side 1. The layer's gradient is kept in the
  group's orientation, ``[S0, S1]`` (transposed when ``A`` is on side 1), so preconditioning a
  group is one batched ``left @ V @ right`` whatever the layers' orientations.
* **Owners.** Under a device mesh a group (see :func:`owned`) has its rows
  rounded up to a multiple of the device count and split over the devices, the same rows on
  the same device (as Shampoo's blocks, :mod:`jaxopt2.optimizers._kronecker`): each device
  refreshes the inverses of its own layers and preconditions their gradients, and only the
  preconditioned gradients are gathered. A group that padding would more than double (10
  layers on 256 devices) is kept whole on every device.
* **Decompositions.** One batched call per matrix size, the sizes one after another
  (:func:`in_sequence`): two batched LAPACK calls at once deadlock jax 0.10's CPU runtime.
  Diagonal sides need no decomposition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt2._sharding import kept_rows, splits
from jaxopt2.optimizers import _kronecker as kr
from jaxopt2.optimizers.kfac._layers import Discovery, Layer, factor_sizes, factor_stack

__all__ = [
    "Group",
    "Member",
    "damped",
    "eigenbases",
    "fit",
    "gram",
    "identity_factors",
    "in_sequence",
    "inverses",
    "leaf_pair",
    "owned",
    "pad_side",
    "plan",
    "rotate",
    "row_info",
    "rows_where",
    "sandwich",
    "side_corner",
    "side_shape",
    "stack_rows",
    "trace",
    "transpose",
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
    """Leaves with the same two factor sides: sizes ``sizes = (S0, S1)``, ``S0 ≥ S1``, and
    ``diag`` (which side is kept diagonal, a vector ``[S]``)."""

    sizes: tuple[int, int]
    members: tuple[Member, ...]
    diag: tuple[bool, bool] = (False, False)

    @property
    def count(self) -> int:
        return sum(m.count for m in self.members)


def plan(
    shapes: Sequence[tuple[int, ...]],
    layers: Discovery | None = None,
    max_dim: int | None = None,
) -> tuple[tuple[Group, ...], dict[int, tuple]]:
    """The groups of a list of leaf shapes, and per leaf with slots ``(group index, Member)``.

    Args:
      shapes: the parameter leaves' shapes, in ``jax.tree.leaves`` order.
      layers: a layer plan (slots for its layers alone, sized from them), or None (the shape
        rule of :func:`~jaxopt2.optimizers.kfac._layers.factor_sizes`).
      max_dim: sides longer than this plus one (room for the bias's coordinate) are
        diagonal (None: none).

    Raises:
      ValueError: a plan made for parameters of other shapes.
    """
    slots: list[tuple[int, tuple[int, int], int | None]] = []  # leaf, sizes by slot, stack
    if layers is None:
        for leaf, shape in enumerate(shapes):
            sizes = factor_sizes(tuple(shape))
            if sizes is not None:
                slots.append((leaf, sizes, factor_stack(tuple(shape))))
    else:
        given = tuple(tuple(int(d) for d in s) for s in shapes)
        if given != tuple(layers.leaf_shapes):
            raise ValueError(
                "kfac(layers=...): the layer plan was made for parameters of shapes "
                f"{list(layers.leaf_shapes)}, but the parameters have shapes {list(given)}; "
                "make the plan with jaxopt2.kfac_layers on these parameters."
            )
        for leaf, uses in sorted(layers.units.items()):
            head = uses[0]
            ka, kg = head.in_features + (head.bias is not None), head.out_features
            sizes = (ka, kg) if head.a_slot == 0 else (kg, ka)
            slots.append((leaf, sizes, None if head.stack is None else head.stack[0]))
    # the one extra coordinate is the bias's: a layer of max_dim inputs keeps its side full
    side = lambda s: (s, max_dim is not None and s > max_dim + 1)
    order: list[tuple] = []
    rows: dict[tuple, list[Member]] = {}
    for leaf, sizes, stack in slots:
        s0, s1 = side(sizes[0]), side(sizes[1])
        key = (max(s0, s1), min(s0, s1))
        if key not in rows:
            order.append(key)
            rows[key] = []
        count = 1 if stack is None else stack
        offset = sum(m.count for m in rows[key])
        rows[key].append(Member(leaf, offset, count, s0 < s1, stack is not None))
    groups = tuple(Group((k[0][0], k[1][0]), tuple(rows[k]), (k[0][1], k[1][1])) for k in order)
    where = {m.leaf: (g, m) for g, group in enumerate(groups) for m in group.members}
    return groups, where


def fit(disc: Discovery, groups: Sequence[Group], where: dict, planned: bool) -> Discovery:
    """`disc` with the layers the allocated slots hold.

    With a plan (`planned`), every layer found must be the planned one, and every planned
    layer must be found. With the shape rule, a dense layer its leaf's slots cannot hold (a
    rank-3 attention kernel, allocated as a stack) is left to the diagonal preconditioner.

    Raises:
      ValueError: a plan that does not match `disc`; a convolution kernel whose layout the
        shape rule misread.
    """
    kept: list[Layer] = []
    for leaf, uses in disc.units.items():
        head = uses[0]
        name = disc.leaf_names[leaf]
        ka, kg = head.in_features + (head.bias is not None), head.out_features
        holds = leaf in where
        if holds:
            g, m = where[leaf]
            sizes = groups[g].sizes[::-1] if m.flip else groups[g].sizes
            stack = None if head.stack is None else head.stack[0]
            holds = (
                (stack is not None) == m.stacked
                and (stack is None or stack == m.count)
                and ka <= sizes[head.a_slot]
                and kg <= sizes[1 - head.a_slot]
                and (not planned or (ka, kg) == (sizes[head.a_slot], sizes[1 - head.a_slot]))
            )
        if holds:
            kept.extend(uses)
        elif planned:
            raise ValueError(
                f"kfac(layers=...): value_fn has the {head.kind} layer {name} "
                f"({head.in_features} -> {head.out_features}), which the layer plan does not "
                "have as such; make the plan with jaxopt2.kfac_layers on the same loss."
            )
        elif head.kind == "conv2d":
            raise ValueError(
                f"parameter {name} of shape {disc.leaf_shapes[leaf]} is a conv2d layer with "
                f"{head.in_features} inputs and {head.out_features} outputs, which does not "
                "fit the factors allocated from its shape: rank-4 kernels must be laid out "
                "OIHW or HWIO (or pass a layer plan, kfac(layers=jaxopt2.kfac_layers(...)))."
            )
    if planned:
        missing = [disc.leaf_names[leaf] for leaf in where if leaf not in disc.units]
        if missing:
            raise ValueError(
                f"kfac(layers=...): the layer plan has layers that value_fn does not use as "
                f"layers: {', '.join(missing)}; make the plan with jaxopt2.kfac_layers on the "
                "same loss."
            )
    return dataclasses.replace(disc, layers=tuple(sorted(kept, key=lambda layer: layer.path)))


def owned(group: Group) -> bool:
    """Whether a group's rows are split over the ambient mesh
    (:func:`jaxopt2._sharding.splits` of its layer count, the rule of
    :func:`jaxopt2.optimizers._kronecker.owned`)."""
    return splits(group.count)


def stack_rows(group: Group) -> int:
    """Rows of a group's stacks: its layer count, rounded up to a multiple of the device count
    when the group is :func:`owned` (the extra rows are padding, never used)."""
    return kept_rows(group.count)


def side_shape(size: int, diag: bool) -> tuple[int, ...]:
    """One row of a side's stack: ``[S, S]``, or ``[S]`` for a diagonal side."""
    return (size,) if diag else (size, size)


def zero_factors(groups: Sequence[Group], dtype: Any) -> tuple:
    """Per group ``(side 0 [n, S0, S0], side 1 [n, S1, S1])`` of zeros (``[n, S]`` for a
    diagonal side)."""
    return tuple(
        tuple(
            jnp.zeros((stack_rows(g), *side_shape(s, d)), dtype)
            for s, d in zip(g.sizes, g.diag, strict=True)
        )
        for g in groups
    )


def identity_factors(groups: Sequence[Group], dtype: Any) -> tuple:
    """Per group a pair of identity stacks shaped like :func:`zero_factors` (ones for a
    diagonal side)."""
    return tuple(
        tuple(
            jnp.ones((stack_rows(g), s), dtype) if d else kr.identity_stack(stack_rows(g), s, dtype)
            for s, d in zip(g.sizes, g.diag, strict=True)
        )
        for g in groups
    )


# --- one side's algebra: a stack [n, S, S], or [n, S] for a diagonal side ------------------


def _is_diag(stack: jax.Array) -> bool:
    return stack.ndim == 2


def trace(stack: jax.Array) -> jax.Array:
    """Per row the trace, ``[n]``."""
    return jnp.sum(stack, axis=-1) if _is_diag(stack) else jnp.trace(stack, axis1=-2, axis2=-1)


def damped(stack: jax.Array, gamma: jax.Array) -> jax.Array:
    """``F + γ I`` per row (`gamma`: ``[n]``)."""
    gamma = gamma.astype(stack.dtype)
    if _is_diag(stack):
        return stack + gamma[:, None]
    return stack + gamma[:, None, None] * jnp.eye(stack.shape[-1], dtype=stack.dtype)


def rows_where(ok: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` in the rows where `ok` (``[n]``), `old` elsewhere."""
    return jnp.where(ok.reshape(-1, *([1] * (new.ndim - 1))), new, old)


def transpose(stack: jax.Array) -> jax.Array:
    """Each row transposed (a diagonal side is its own transpose)."""
    return stack if _is_diag(stack) else jnp.swapaxes(stack, -1, -2)


def sandwich(left: jax.Array, v: jax.Array, right: jax.Array) -> jax.Array:
    """``left @ v @ right`` per row (``v``: ``[n, S0, S1]``), a diagonal side a scaling."""
    v = left[..., :, None] * v if _is_diag(left) else kr.mm(left, v)
    return v * right[..., None, :] if _is_diag(right) else kr.mm(v, right)


def rotate(rows: jax.Array, basis: jax.Array) -> jax.Array:
    """``rows @ basis`` (`rows` ``[..., k]``, `basis` one row ``[k, k]``, or ``[k]`` for a
    diagonal side, whose basis is the coordinates: a mask)."""
    if basis.ndim == 1:
        return rows * basis
    return jnp.einsum("...i,ij->...j", rows, basis, precision=jax.lax.Precision.HIGHEST)


def side_corner(stack: jax.Array, k: int) -> jax.Array:
    """Each row's top-left ``k`` corner (the first ``k`` entries of a diagonal side)."""
    return stack[..., :k] if _is_diag(stack) else stack[..., :k, :k]


def pad_side(x: jax.Array, size: int, diag: bool) -> jax.Array:
    """A statistic's used corner (``[..., k, k]``, or ``[..., k]`` for a diagonal side)
    zero-padded to the slot's size."""
    axes = 1 if diag else 2
    pad = [(0, 0)] * (x.ndim - axes) + [(0, size - x.shape[-1])] * axes
    return jnp.pad(x, pad)


def gram(diag: bool) -> Callable[[jax.Array], jax.Array]:
    """The statistic of a side from its rows ``[M, k]``: ``rowsᵀ rows``, or its diagonal
    ``Σ rows²`` for a diagonal side (never forming the ``k × k`` product)."""
    if diag:
        return lambda rows: jnp.sum(jnp.square(rows), axis=0)
    return lambda rows: kr.mm(rows.T, rows)


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
    """Per stack ``(inverses, ok)`` of SPD matrices by Cholesky (of positive diagonals,
    elementwise, for a diagonal side)."""
    out: list[Any] = [None] * len(stacks)
    full = [i for i, s in enumerate(stacks) if not _is_diag(s)]
    for i, s in enumerate(stacks):
        if _is_diag(s):
            inv = 1.0 / s
            out[i] = (inv, jnp.all(jnp.isfinite(inv) & (s > 0), axis=-1))
    for i, r in zip(full, in_sequence([stacks[i] for i in full], _spd_inverse), strict=True):
        out[i] = r
    return out


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

    A diagonal side's basis is the coordinates themselves: its "eigenvectors" are a ``[n, S]``
    mask (one in the corner), its eigenvalues the diagonal (in the coordinates' order).
    """
    out: list[Any] = [None] * len(stacks)
    full = [i for i, s in enumerate(stacks) if not _is_diag(s)]
    for i, (s, k) in enumerate(zip(stacks, corners, strict=True)):
        if _is_diag(s):
            inside = jnp.arange(s.shape[-1])[None, :] < k[:, None]
            ok = jnp.all(jnp.isfinite(s), axis=-1)
            out[i] = (inside.astype(s.dtype), jnp.where(inside, s, 0.0), ok)
    for i, r in zip(full, _full_eigenbases([stacks[i] for i in full], [corners[i] for i in full]),
                    strict=True):  # fmt: skip
        out[i] = r
    return out


def _full_eigenbases(stacks: list[jax.Array], corners: list[jax.Array]) -> list[tuple]:
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
        info: dict[str, np.ndarray] = {
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
