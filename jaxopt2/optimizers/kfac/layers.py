"""Which parameters are K-FAC layers: discovery from the jaxpr of ``value_fn``.

A parameter leaf of rank 2 that reaches a ``dot_general`` as one operand (through
transposes, dtype casts, copies and call boundaries such as ``jit``/``pjit``, ``remat`` and
custom-derivative wrappers), with the other operand coming from the data, is a dense layer:
its weight. Its bias is a rank-1 leaf added (after broadcasting) to that product's output
(through transposes/reshapes/casts). This finds the layers of plain JAX functions
(``x @ w + b``) and of equinox models (``jax.vmap(eqx.nn.Linear)``: ``dot_general(W, x)``
then a transpose) without any change to the model.

Conventions: a dense layer's weight is seen as the matrix ``[in, out]`` (the leaf itself, or
its transpose when the leaf is stored ``[out, in]``, as equinox and PyTorch do); inputs are
flattened to ``[M, in]`` rows (every non-contracted input axis is a row axis: batch, time,
...), output gradients to ``[M, out]``.

A rank-2 weight used by two products (tied weights, a layer applied twice) is refused with a
message naming it; parameters in no layer are preconditioned diagonally by the optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from jaxopt2 import _jaxpr
from jaxopt2.curvature.tags import find_loss_tag

__all__ = ["DenseLayer", "Discovery", "discover"]

# Ops that move or recast data without mixing entries: a parameter passes through them.
_LAYOUT = {"convert_element_type", "copy", "copy_p", "reduce_precision"}


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """A dense layer found in ``value_fn``.

    Attributes:
      name: the weight's pytree path (as ``jax.tree_util.keystr`` writes it).
      weight: index of the weight leaf in ``jax.tree.leaves(params)``.
      bias: index of the bias leaf, or None.
      path: the ``dot_general`` equation (see :mod:`jaxopt2._jaxpr`).
      weight_operand: 0 if the weight is the product's left operand, 1 if the right one.
      in_axis: the weight leaf's axis that is contracted with the inputs (0: ``[in, out]``).
      in_features, out_features: the matrix view's sizes.
    """

    name: str
    weight: int
    bias: int | None
    path: _jaxpr.EqnPath
    weight_operand: int
    in_axis: int
    in_features: int
    out_features: int


@dataclasses.dataclass(frozen=True)
class Discovery:
    """What K-FAC found in ``value_fn``: its layers and its tagged loss."""

    layers: tuple[DenseLayer, ...]
    loss: str
    loss_path: _jaxpr.EqnPath
    leaf_names: tuple[str, ...]

    @property
    def layer_leaves(self) -> frozenset[int]:
        out = set()
        for layer in self.layers:
            out.add(layer.weight)
            if layer.bias is not None:
                out.add(layer.bias)
        return frozenset(out)

    def describe(self) -> str:
        lines = [f"tagged loss: {self.loss}"]
        for layer in self.layers:
            bias = "" if layer.bias is None else f" + bias {self.leaf_names[layer.bias]}"
            lines.append(f"dense {layer.name}: {layer.in_features} -> {layer.out_features}{bias}")
        rest = [n for i, n in enumerate(self.leaf_names) if i not in self.layer_leaves]
        if rest:
            lines.append("diagonal (no layer): " + ", ".join(rest))
        return "\n".join(lines)


@dataclasses.dataclass
class _Param:
    leaf: int
    perm: tuple[int, ...]  # operand axis -> leaf axis


@dataclasses.dataclass
class _Out:
    layer: int  # index into the layer list


def discover(
    closed: core.ClosedJaxpr, leaf_paths: list[Any], leaf_shapes: list[tuple]
) -> Discovery:
    """Find the dense layers and the loss tag in a traced ``value_fn`` (params as its inputs)."""
    names = tuple(jax.tree_util.keystr(p) for p in leaf_paths)
    loss_path, loss_eqn = find_loss_tag(closed.jaxpr)
    found: list[dict[str, Any]] = []
    uses: dict[int, list[_jaxpr.EqnPath]] = {}

    def visit(jaxpr: core.Jaxpr, env: dict, prefix: _jaxpr.EqnPath) -> None:
        get = lambda v: None if isinstance(v, core.Literal) else env.get(v)
        for i, eqn in enumerate(jaxpr.eqns):
            here = (*prefix, i)
            name = eqn.primitive.name
            ins = [get(v) for v in eqn.invars]
            out = eqn.outvars[0] if eqn.outvars else None
            sub = _jaxpr.inner_jaxpr(eqn)
            if sub is not None:
                visit(sub, {sv: x for sv, x in zip(sub.invars, ins, strict=True) if x}, here)
                continue
            if name in _LAYOUT and ins[0] is not None:
                env[out] = ins[0]
            elif name == "transpose" and ins[0] is not None:
                perm = eqn.params["permutation"]
                if isinstance(ins[0], _Param):
                    env[out] = _Param(ins[0].leaf, tuple(ins[0].perm[p] for p in perm))
                else:
                    env[out] = ins[0]
            elif name in ("reshape", "broadcast_in_dim", "squeeze", "expand_dims"):
                x = ins[0]
                if isinstance(x, _Out) or (isinstance(x, _Param) and len(leaf_shapes[x.leaf]) == 1):
                    env[out] = x  # a layer's output, or a bias vector being broadcast
            elif name == "dot_general":
                layer = _dense(eqn, ins, leaf_shapes)
                if layer is not None:
                    uses.setdefault(layer["weight"], []).append(here)
                    layer["path"] = here
                    found.append(layer)
                    env[out] = _Out(len(found) - 1)
            elif name == "add":
                a, b = ins
                for o, p in ((a, b), (b, a)):
                    if (
                        isinstance(o, _Out)
                        and isinstance(p, _Param)
                        and len(leaf_shapes[p.leaf]) == 1
                        and leaf_shapes[p.leaf][0] == found[o.layer]["out_features"]
                        and found[o.layer]["bias"] is None
                    ):
                        found[o.layer]["bias"] = p.leaf
                        env[out] = o

    env0 = {
        v: _Param(i, tuple(range(len(leaf_shapes[i])))) for i, v in enumerate(closed.jaxpr.invars)
    }
    visit(closed.jaxpr, env0, ())
    for leaf, paths in uses.items():
        if len(paths) > 1:
            raise ValueError(
                f"parameter {names[leaf]} is the weight of {len(paths)} matrix products (tied "
                "weights or a layer applied twice): K-FAC's Kronecker factors assume one use. "
                "Untie it, or let it be preconditioned diagonally by keeping it out of "
                "products with data (explicit layer tags come with a later release)."
            )
    layers = tuple(
        DenseLayer(
            name=names[f["weight"]],
            weight=f["weight"],
            bias=f["bias"],
            path=f["path"],
            weight_operand=f["weight_operand"],
            in_axis=f["in_axis"],
            in_features=f["in_features"],
            out_features=f["out_features"],
        )
        for f in found
    )
    return Discovery(layers, loss_eqn.params["loss"], loss_path, names)


def _dense(eqn: core.JaxprEqn, ins: list, leaf_shapes: list[tuple]) -> dict[str, Any] | None:
    """The layer a ``dot_general`` makes, if one operand is a rank-2 parameter and the other
    comes from the data."""
    (contract, batch) = eqn.params["dimension_numbers"]
    params = [isinstance(x, _Param) for x in ins]
    if params[0] == params[1]:
        return None
    w = 0 if params[0] else 1
    ref: _Param = ins[w]
    shape = leaf_shapes[ref.leaf]
    if len(shape) != 2 or batch[w] or len(contract[w]) != 1:
        return None
    in_axis = ref.perm[contract[w][0]]
    return {
        "weight": ref.leaf,
        "bias": None,
        "weight_operand": w,
        "in_axis": in_axis,
        "in_features": int(shape[in_axis]),
        "out_features": int(shape[1 - in_axis]),
    }


def matrix_layout(eqn_params: dict, weight_operand: int, x: Any, out_grad: Any):
    """Flatten a dense layer's input operand to ``[M, in]`` and its output (or output
    gradient) to ``[M, out]``, row order matching (see the module docstring)."""
    (contract, _) = eqn_params["dimension_numbers"]
    xo = 1 - weight_operand
    c_in = contract[xo][0]
    x_rows = [d for d in range(x.ndim) if d != c_in]
    a = jnp.transpose(x, (*x_rows, c_in)).reshape(-1, x.shape[c_in])
    # dot_general output axes: (lhs free..., rhs free...); the weight has one free axis.
    n_rows = len(x_rows)
    if weight_operand == 0:  # (out, rows...)
        g = jnp.moveaxis(out_grad, 0, -1)
    else:  # (rows..., out)
        g = out_grad
    g = g.reshape(int(np.prod(g.shape[:n_rows])), g.shape[-1])
    return a, g
