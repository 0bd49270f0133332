"""The row machinery behind the optimizers' device-mesh support (see :mod:`jaxopt2.sharding`):
per-group stacks of blocks padded to a multiple of the device count and split along their rows,
each device computing its own rows; K-FAC's per-device partial sums of statistics. Internal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def mesh_size() -> int:
    """Devices in the ambient mesh (1 when no mesh is set)."""
    mesh = _mesh()
    return 1 if mesh is None else int(mesh.size)


def padded_rows(n: int) -> int:
    """``n`` rounded up to a multiple of the ambient mesh's device count."""
    size = mesh_size()
    return -(-n // size) * size if n else n


def splits(count: int) -> bool:
    """Whether a stack of `count` rows (blocks, layers) is split over the ambient mesh, each
    device owning a share: under a mesh of more than one device, unless padding `count` to a
    multiple of the device count would more than double it (then the stack is kept whole on
    every device: 10 blocks on 256 devices would cost 256 rows of memory and traffic for 10;
    150 on 256 are split, one row per device instead of 150)."""
    return mesh_size() > 1 and padded_rows(count) <= 2 * count


def kept_rows(count: int) -> int:
    """Rows a stack of `count` rows is kept with: `count` rounded up to a multiple of the
    device count when it :func:`splits` (the extra rows are padding), else `count`."""
    return padded_rows(count) if splits(count) else count


def _move(x: jax.Array, spec: PartitionSpec) -> jax.Array:
    mesh = _mesh()
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_rows(tree: Any) -> Any:
    """Shard the leading (stack) axis of every leaf over all axes of the ambient mesh.

    A no-op without a mesh, on one device, and for a leaf whose leading axis is not a multiple
    of the device count (pad it first: :func:`padded_rows`).
    """
    mesh = _mesh()
    if mesh is None or mesh.size == 1:
        return tree

    def one(x):
        if jnp.ndim(x) == 0 or x.shape[0] % mesh.size:
            return x
        return _move(x, PartitionSpec(tuple(mesh.axis_names)))

    return jax.tree.map(one, tree)


def map_owned(fn: Callable[[Any, Any], tuple[Any, Any]], rows: Any, whole: Any = ()) -> Any:
    """``fn(rows, whole) -> (rows_out, whole_out)`` run by each device on the rows it owns.

    Every array leaf of `rows` is split along its first axis over all axes of the ambient
    mesh (``jax.shard_map``): each device sees its own share of every stack, and `whole`
    (replicated values) in full. ``rows_out`` leaves are a device's rows of stacks split the
    same way; ``whole_out`` must be computed from `whole` alone, the same on every device
    (it is returned replicated).

    This is owner-computes: nothing is gathered, whatever `fn` concatenates, decomposes or
    splits. Without a mesh or on one device it is just ``fn(rows, whole)``. Every leaf's
    first axis must be a multiple of the device count (pad with :func:`padded_rows`).
    """
    mesh = _mesh()
    if mesh is None or mesh.size == 1 or not jax.tree.leaves(rows):
        return fn(rows, whole)
    uneven = [x.shape for x in jax.tree.leaves(rows) if jnp.ndim(x) == 0 or x.shape[0] % mesh.size]
    if uneven:
        raise ValueError(
            f"map_owned splits stacks over {mesh.size} devices; these leading axes are not a "
            f"multiple of it: {uneven}."
        )
    spec = PartitionSpec(tuple(mesh.axis_names))
    # whole_out is the same on every device but computed beside the device's own rows (one
    # batched decomposition of both), so the per-device-value check is off
    run = jax.shard_map(
        fn,
        in_specs=(spec, PartitionSpec()),
        out_specs=(spec, PartitionSpec()),
        check_vma=False,
    )
    return run(shard_rows(rows), gather_rows(whole))


def own_rows(stack: jax.Array) -> jax.Array:
    """`stack` as it is kept when its rows are owned: unchanged unless it :func:`splits`;
    then zero-padded along its first axis to :func:`padded_rows` and split along it.

    It is made whole (replicated) first, so that the split does not flow back into whatever
    the stack was built from: XLA would otherwise reshard every parameter-shaped value
    derived from it (or all-reduce the padded stack where its rows were contracted from a
    sharded batch, twice the traffic).
    """
    count = stack.shape[0]
    if not splits(count):
        return stack
    stack = gather_rows(stack)
    extra = kept_rows(count) - count
    if extra:
        stack = jnp.pad(stack, ((0, extra),) + ((0, 0),) * (stack.ndim - 1))
    return shard_rows(stack)


def map_split(fn: Callable[[list, Any], list], items: list, split: list, shared: Any = ()) -> list:
    """``fn(items, shared) -> outputs`` (one output per item, in order) with the items whose
    `split` flag is set owned by rows (:func:`map_owned`) and the others whole.

    Each device calls `fn` once, on its own rows of the split items and the whole of the
    others (so one batched decomposition covers both), in the items' order. Returns the
    outputs in that order, a split item's split along its rows like the item, the others
    replicated (each must then come from whole items and `shared` alone).
    """
    flags = [bool(f) for f in split]
    if len(flags) != len(items):
        raise ValueError(f"map_split: {len(items)} items but {len(flags)} split flags.")

    def merge(own, rest):
        it = {True: iter(own), False: iter(rest)}
        return [next(it[f]) for f in flags]

    def part(xs):
        return ([x for x, f in zip(xs, flags, strict=True) if f],
                [x for x, f in zip(xs, flags, strict=True) if not f])  # fmt: skip

    def body(rows, whole):
        rest, shared_ = whole
        return part(fn(merge(rows, rest), shared_))

    own, rest = part(items)
    return merge(*map_owned(body, own, (rest, shared)))


def partial_sums(fn: Callable[[jax.Array], jax.Array], rows: jax.Array) -> jax.Array:
    """``fn`` of each device's share of `rows`, kept per device: ``[devices, ...]``.

    `rows` (``[R, ...]``) is split along its first axis over all axes of the ambient mesh,
    zero-padded to a multiple of the device count first, so `fn` must be a sum over rows
    that zero rows do not change (a Gram matrix ``aᵀa``, a column sum). Each device applies
    `fn` to its rows and keeps the result: nothing is communicated. The sum over the leading
    axis is ``fn(rows)``; :func:`sum_partials` takes it with one collective. Without a mesh
    (or on one device) it is ``fn(rows)[None]``.
    """
    mesh = _mesh()
    if mesh is None or mesh.size == 1:
        return fn(rows)[None]
    extra = -rows.shape[0] % mesh.size
    if extra:
        rows = jnp.pad(rows, ((0, extra),) + ((0, 0),) * (rows.ndim - 1))
    spec = PartitionSpec(tuple(mesh.axis_names))
    return jax.shard_map(lambda r: fn(r)[None], in_specs=spec, out_specs=spec)(rows)


def sum_partials(partials: jax.Array, *, split: bool) -> jax.Array:
    """The sum of per-device partial stacks (``[devices, n, ...]`` from :func:`partial_sums`)
    over the devices: ``[n, ...]``.

    With `split` the stack's rows are owned: zero-padded to :func:`padded_rows` and the sum
    reduce-scattered (each device receives only the summed rows it owns, split like
    :func:`own_rows`); otherwise all-reduced (the whole sum on every device). Without a mesh
    (or on one device) it is ``partials[0]``.
    """
    mesh = _mesh()
    if mesh is None or mesh.size == 1:
        return partials[0]
    axes = tuple(mesh.axis_names)
    spec = PartitionSpec(axes)
    if not split:
        reduce = lambda p: jax.lax.psum(p[0], axes)
        return jax.shard_map(reduce, in_specs=spec, out_specs=PartitionSpec())(partials)
    extra = padded_rows(partials.shape[1]) - partials.shape[1]
    if extra:
        partials = jnp.pad(partials, ((0, 0), (0, extra)) + ((0, 0),) * (partials.ndim - 2))
    scatter = lambda p: jax.lax.psum_scatter(p[0], axes, scatter_dimension=0, tiled=True)
    return jax.shard_map(scatter, in_specs=spec, out_specs=spec)(partials)


def explicit_mesh() -> bool:
    """Whether the ambient mesh has ``Explicit`` axes (sharding in the types)."""
    mesh = _mesh()
    return mesh is not None and any(t == AxisType.Explicit for t in mesh.axis_types)


def gather_rows(tree: Any) -> Any:
    """Every leaf replicated over the ambient mesh (the stacks' results, gathered for use)."""
    mesh = _mesh()
    if mesh is None or mesh.size == 1:
        return tree
    return jax.tree.map(lambda x: _move(x, PartitionSpec()), tree)


# --- state layout ------------------------------------------------------------------------
