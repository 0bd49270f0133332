"""Sharding: optimizer state laid out over a device mesh, and what it costs per device.

jaxopt2 distributes with JAX's own sharding and nothing else. The library's side of it:

* **The ambient mesh.** Under ``jax.set_mesh(mesh)`` (or ``jax.sharding.use_mesh``) the
  optimizers with per-block work split it across every device of the mesh. Shampoo and SOAP
  own blocks (owner-computes, as Distributed Shampoo does): each per-group stack of blocks,
  statistics and preconditioners is padded to a multiple of the device count and split along
  its rows, so each device updates, decomposes (its own one batched ``eigh``) and applies the
  preconditioners of its own blocks, and only the preconditioned blocks are gathered —
  parameter-sized traffic per step, not preconditioner-sized. A group that padding would more
  than double is kept whole on every device (10 blocks padded to 256 would multiply its memory
  and traffic) and computed beside the owned rows. K-FAC owns its layers' factors the same way
  (grouped by size): each device inverts and applies its own, receives only its own layers'
  statistics (per-device partial sums over the batch rows, reduce-scattered), and only the
  preconditioned gradients are gathered. Without a mesh (or on one device) nothing changes:
  the same optimizer object runs the same program as before. Both of JAX's sharding modes
  work: with ``Explicit`` mesh axes the stacks are moved with ``jax.sharding.reshard``, with
  ``Auto`` axes they are constrained with ``jax.lax.with_sharding_constraint``. K-FAC needs
  ``Auto`` axes: its statistics contract activations over the sharded batch, which explicit
  mode asks every such product to annotate; it says so instead of failing inside jax.
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
from jax.sharding import NamedSharding, PartitionSpec

from jaxopt2._sharding import explicit_mesh, mesh_size

__all__ = ["explicit_mesh", "mesh_size", "state_memory", "state_sharding"]

# The row helpers lived here until 0.2.0; the old names resolve, with a warning, until 0.3.0.
_MOVED_HELPERS = ("gather_rows", "kept_rows", "map_owned", "map_split", "own_rows", "padded_rows",
                  "partial_sums", "shard_rows", "splits", "sum_partials")  # fmt: skip


def __getattr__(name: str):
    if name in _MOVED_HELPERS:
        import warnings

        from jaxopt2 import _sharding

        warnings.warn(
            f"jaxopt2.sharding.{name} is internal (the optimizers' own machinery) and moved to "
            f"jaxopt2._sharding; the old name goes away in 0.3.0",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_sharding, name)
    raise AttributeError(f"module 'jaxopt2.sharding' has no attribute {name!r}")


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
