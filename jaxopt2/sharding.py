"""Sharding: optimizer state laid out over a device mesh, and what it costs per device.

jaxopt2 distributes with JAX's own sharding and nothing else. The library's side of it:

* **The ambient mesh.** Under ``jax.set_mesh(mesh)`` (or ``jax.sharding.use_mesh``) the
  optimizers with per-block work split it across every device of the mesh. Shampoo and SOAP
  own blocks (owner-computes, as Distributed Shampoo does): each per-group stack of blocks,
  statistics and preconditioners is padded to a multiple of the device count and split along
  its rows, so each device updates, decomposes (:func:`map_owned`: its own one batched
  ``eigh``) and applies the preconditioners of its own blocks, and only the preconditioned
  blocks are gathered — parameter-sized traffic per step, not preconditioner-sized. A group
  that padding would more than double is kept whole on every device (10 blocks padded to 256
  would multiply its memory and traffic) and computed beside the owned rows. K-FAC owns its
  layers' factors the same way (grouped by size): each device inverts and applies its own,
  receives only its own layers' statistics (per-device partial sums over the batch rows,
  reduce-scattered: :func:`partial_sums`, :func:`sum_partials`), and only the
  preconditioned gradients are gathered. Without a mesh (or on one device)
  nothing changes: the same optimizer object runs the same program as before. Both of JAX's
  sharding modes work: with ``Explicit`` mesh axes the stacks are moved with
  ``jax.sharding.reshard``, with ``Auto`` axes they are constrained with
  ``jax.lax.with_sharding_constraint``. K-FAC needs ``Auto`` axes: its statistics contract
  activations over the sharded batch, which explicit mode asks every such product to
  annotate; it says so instead of failing inside jax.
* **State follows the parameters.** :func:`state_sharding` gives the sharding of every leaf
  of an optimizer's state from the parameters' shardings: a subtree shaped like the
  parameters (a moment, a diagonal) takes the parameters' shardings leaf by leaf; the
  per-block stacks a state declares (its ``sharded_rows``: field names, or ``(name, i)`` for
  one element of a tuple field) are split along their rows, each device holding the blocks it
  owns; a sequence with one entry per parameter leaf that a state declares (its
  ``per_leaf``, named the same way; None for a leaf without an entry, as SOAP's second moment
  of the leaves it does not block) takes the parameters' shardings entry by entry; everything
  else (counters, keys) is replicated. Use it as
  ``jax.jit(opt.init, out_shardings=state_sharding(opt, params, shardings))(params)`` to
  build a sharded state without materializing it on one device.
* **Sizing a job.** :func:`state_memory` is the optimizer state's bytes on the fullest device,
  from ``jax.eval_shape`` and those shardings alone (parameters may be
  ``jax.ShapeDtypeStruct``\\ s): nothing is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# The public surface; the row helpers below (padded_rows, splits, kept_rows, shard_rows,
# map_owned, own_rows, map_split, partial_sums, sum_partials, gather_rows) are the
# optimizers' own machinery, reachable by name but not part of it.
__all__ = ["explicit_mesh", "mesh_size", "state_memory", "state_sharding"]


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


def _is_param_shaped(node: Any, treedef, shapes) -> bool:
    try:
        if jax.tree.structure(node) != treedef:
            return False
    except Exception:
        return False
    leaves = jax.tree.leaves(node)
    return all(tuple(np.shape(x)) == s for x, s in zip(leaves, shapes, strict=True))


def _param_sharding_tree(params: Any, shardings: Any) -> Any:
    """The parameters' shardings as a tree shaped like `params` (one sharding may stand for
    all of them)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, params)
    return shardings


def _mesh_of(shardings: Any):
    for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def state_sharding(optimizer, params: Any, shardings: Any, *, mesh=None) -> Any:
    """The sharding of every leaf of ``optimizer.init(params)``, as a tree shaped like it.

    Args:
      optimizer: an ``optax.GradientTransformation`` (any optax or jaxopt2 optimizer, chains
        and wrappers included).
      params: the parameters, or ``jax.ShapeDtypeStruct``\\ s of them.
      shardings: the parameters' ``NamedSharding``\\ s (a tree shaped like `params`, or one
        sharding for all of them).
      mesh: the mesh (default: the one the shardings name).

    Returns:
      ``NamedSharding``\\ s: a param-shaped subtree of the state gets `shardings`, and so
      does each entry of a per-parameter-leaf sequence a state declares (``per_leaf``); the
      per-block stacks of Shampoo/SOAP and K-FAC's factor stacks are split along their rows
      over every mesh axis (``init`` runs under the mesh, so they are padded to a multiple of
      its size); other leaves are replicated.
    """
    mesh = mesh if mesh is not None else _mesh_of(shardings)
    if mesh is None:
        raise ValueError(
            "state_sharding needs a mesh: pass NamedShardings of the parameters or mesh=."
        )
    per_param = _param_sharding_tree(params, shardings)
    treedef = jax.tree.structure(params)
    shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(params)]
    with jax.set_mesh(mesh):
        state = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))

    leaf_shardings = jax.tree.leaves(
        per_param, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )

    def by_leaf(node: Any) -> Any:
        # a sequence with one entry per parameter leaf (None where that leaf has none): an
        # entry shaped like its leaf takes the leaf's sharding
        if not isinstance(node, (tuple, list)) or len(node) != len(shapes):
            raise ValueError(
                f"a state field declared per parameter leaf has "
                f"{len(node) if isinstance(node, (tuple, list)) else 'no'} entries for "
                f"{len(shapes)} parameter leaves."
            )
        return type(node)(
            None if x is None else s if tuple(x.shape) == shape else replicated
            for x, s, shape in zip(node, leaf_shardings, shapes, strict=True)
        )

    def assign(node: Any, stacked: bool) -> Any:
        if stacked and hasattr(node, "shape"):
            return rows if len(node.shape) >= 1 and node.shape[0] % mesh.size == 0 else replicated
        if _is_param_shaped(node, treedef, shapes) and jax.tree.leaves(node):
            return per_param
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # a NamedTuple state
            # a marked field: a name (the whole field) or (name, i) (its i-th element)
            marked = getattr(type(node), "sharded_rows", ())
            leafwise = getattr(type(node), "per_leaf", ())
            fields = []
            for f, v in zip(node._fields, node, strict=True):
                parts = {m[1] for m in marked if isinstance(m, tuple) and m[0] == f}
                per_leaf = {m[1] for m in leafwise if isinstance(m, tuple) and m[0] == f}
                if (parts or per_leaf) and isinstance(v, (tuple, list)):
                    v = type(v)(
                        by_leaf(x) if i in per_leaf else assign(x, stacked or i in parts)
                        for i, x in enumerate(v)
                    )
                    fields.append(v)
                elif f in leafwise:
                    fields.append(by_leaf(v))
                else:
                    fields.append(assign(v, stacked or f in marked))
            return type(node)(*fields)
        if isinstance(node, (tuple, list)):
            return type(node)(assign(v, stacked) for v in node)
        if isinstance(node, dict):
            return {k: assign(v, stacked) for k, v in node.items()}
        if node is None:
            return None
        if hasattr(node, "shape"):
            return replicated
        # any other pytree node (an equinox module, a custom container): recurse generically
        children, sub = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
        return jax.tree.unflatten(sub, [assign(c, stacked) for c in children])

    return assign(state, False)


def _shard_bytes(x: Any, sharding: Any) -> int:
    shape = sharding.shard_shape(tuple(x.shape)) if sharding is not None else tuple(x.shape)
    return int(math.prod(shape)) * jnp.dtype(x.dtype).itemsize


def state_memory(optimizer, params: Any, shardings: Any = None) -> int:
    """Bytes of ``optimizer.init(params)`` on the fullest device.

    From ``jax.eval_shape`` and the layout of :func:`state_sharding`: nothing is allocated, so
    `params` may be ``jax.ShapeDtypeStruct``\\ s of a model far larger than the machine.
    Without `shardings` (one device) it is the whole state's size.
    """
    if shardings is None:
        state = jax.eval_shape(optimizer.init, params)
        return sum(_shard_bytes(x, None) for x in jax.tree.leaves(state))
    layout = state_sharding(optimizer, params, shardings)
    mesh = _mesh_of(shardings)
    with jax.set_mesh(mesh):
        state = jax.eval_shape(optimizer.init, params)
    is_sharding: Callable[[Any], bool] = lambda s: isinstance(s, jax.sharding.Sharding)
    layouts = jax.tree.leaves(layout, is_leaf=is_sharding)
    leaves = jax.tree.leaves(state)
    return sum(_shard_bytes(x, s) for x, s in zip(leaves, layouts, strict=True))
