"""Which parameters are K-FAC layers: explicit tags, else discovery from the jaxpr.

Discovery. A parameter leaf that reaches a product with the data as one operand (through
transposes, dtype casts, copies and call boundaries such as ``jit``/``pjit``, ``remat`` and
custom-derivative wrappers, into their bodies and back out) is a layer's weight:
  * a leaf of rank 2 or more in a ``dot_general`` that contracts some of its axes with the
    data and keeps the others (no batch axes): a dense layer whose inputs are the contracted
    axes flattened and whose outputs are the kept ones flattened. A rank-2 weight is the
    usual ``[in, out]`` matrix; attention projections are rank-3 (flax.nnx
    ``LinearGeneral`` as in ``MultiHeadAttention``: ``[D, H, Dh]`` for queries, keys and
    values, ``[H, Dh, D]``, two contracted axes, for the output) and are the dense layers
    ``D -> H·Dh`` and ``H·Dh -> D`` they compute;
  * a rank-4 leaf as the kernel of a ``conv_general_dilated`` (no feature groups): a 2-D
    convolution, whose statistics come from image patches (Grosse & Martens, 2016).
Its bias is a leaf with as many entries as the layer has outputs, laid out as the kept axes
(``[out]``, equinox's ``[out, 1, 1]``, ``LinearGeneral``'s ``[H, Dh]``), added (after
reshaping and broadcasting) to that product's output. This finds the layers of plain JAX
functions (``x @ w + b``), equinox models (``jax.vmap(eqx.nn.Linear)``, ``eqx.nn.Conv2d``,
``eqx.nn.MultiheadAttention``) and flax.nnx models (``nnx.Linear``, ``nnx.Conv``,
``nnx.MultiHeadAttention``) without any change to the model. A weight only ever indexed (an
embedding table: ``take``/``gather``, not a product) is no layer.

Loops. Inside ``lax.scan`` (entered through nested calls too), a weight the body closes over
(a loop invariant: an RNN cell, a layer applied at every step) is one layer whose statistics
gather every iteration, like the rows of a sequence; the curvature pass unrolls the loop. A
weight sliced from a stacked parameter (a scan over layers: a ``[L, in, out]`` leaf scanned
along its first axis as one of the scan's ``xs``, as ``eqx.filter_vmap``-built layers are) is
a stack of ``L`` layers: slice ``l`` gets its own factors, from the iteration that uses it
(with its bias, a ``[L, out]`` leaf scanned alongside). Stacked convolution kernels are not
layers (diagonal preconditioner).

Tags. :func:`jaxopt2.tag_dense` and :func:`jaxopt2.tag_conv2d` (module :mod:`.tags`) name a
layer explicitly and override discovery for their weight. A weight in two discovered products
(tied weights, a layer applied twice) is refused with a message naming it; tagged at each use,
it is one layer whose statistics gather the rows of every use.

Conventions: a layer's weight is seen as the matrix ``[in, out]`` (:meth:`Layer.to_matrix`);
inputs become ``[M, in]`` rows (every non-contracted axis is a row axis: batch, time, image
positions) and output gradients ``[M, out]`` (:meth:`Layer.rows`). Parameters in no layer are
preconditioned diagonally by the optimizer.

Factor slots. Without a layer plan, they follow from parameter shapes alone (the shape rule;
``init`` sees nothing else): a rank-2 leaf
``[d0, d1]`` gets factors of sizes ``d0 + 1`` and ``d1 + 1`` (either axis may be the input; the
``+ 1`` is the bias's homogeneous coordinate); a rank-3 leaf ``[L, d0, d1]`` gets ``L``
such pairs (stacked ``[L, d, d]``: a possible scan over layers); a rank-4 kernel gets
``in·kh·kw + 1`` and ``out``, laid out OIHW (equinox, ``jax.lax``) or HWIO (flax): the window
is the pair of axes of equal sizes (a square window), else the pair with the smaller product;
where shapes cannot tell, both layouts fit. A discovered layer that its leaf's slots cannot
hold (a rank-3 attention kernel, which the rule reads as a stack) is then preconditioned
diagonally. With a plan (the :class:`Discovery` of :func:`jaxopt2.kfac_layers`, passed as
``kfac(layers=...)``), slots are allocated for the planned layers alone, sized exactly
(see :mod:`.factors`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from jaxopt2 import _jaxpr
from jaxopt2.curvature.tags import find_loss_tag
from jaxopt2.optimizers.kfac._tags import ConvSpec, layer_tag_p

__all__ = ["Discovery", "Layer", "discover", "factor_sizes", "factor_stack"]

# Ops that move or recast data without mixing entries: a parameter passes through them.
_LAYOUT = {"convert_element_type", "copy", "copy_p", "reduce_precision"}
_RESHAPE = {"reshape", "broadcast_in_dim", "squeeze", "expand_dims"}


def factor_stack(shape: tuple[int, ...]) -> int | None:
    """How many factor pairs a leaf of this shape gets stacked (``L`` for a rank-3 leaf
    ``[L, d0, d1]``, a possible scan over layers; None: one pair, unstacked)."""
    return int(shape[0]) if len(shape) == 3 else None


def factor_sizes(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The two factor sizes allocated for a leaf of this shape (None: not a layer shape); for
    a rank-3 leaf, those of each of its :func:`factor_stack` slices."""
    if len(shape) == 3:
        return shape[1] + 1, shape[2] + 1
    if len(shape) == 2:
        return shape[0] + 1, shape[1] + 1
    if len(shape) == 4:
        d0, d1, d2, d3 = shape
        oihw, hwio = (d1 * d2 * d3 + 1, d0), (d0 * d1 * d2 + 1, d3)
        if d2 == d3 and d0 != d1:  # a square window last
            return oihw
        if d0 == d1 and d2 != d3:  # a square window first
            return hwio
        if d2 * d3 != d0 * d1:  # the window is the pair with the smaller product
            return oihw if d2 * d3 < d0 * d1 else hwio
        return max(oihw[0], hwio[0]), max(oihw[1], hwio[1])  # undecidable: room for both
    return None


@dataclasses.dataclass(frozen=True)
class Layer:
    """One use of a layer's weight (a product found in ``value_fn``, or a tag).

    Attributes:
      name: the weight's pytree path (as ``jax.tree_util.keystr`` writes it).
      kind: ``"dense"`` or ``"conv2d"``.
      weight: index of the weight leaf in ``jax.tree.leaves(params)``.
      bias: index of the bias leaf, or None.
      path: the product's (or the tag's) equation (see :mod:`jaxopt2._jaxpr`).
      tagged: named by an explicit tag.
      input_index: which input of that equation is the layer's input.
      weight_perm: the leaf's axes in matrix order (input axes..., output axis).
      in_features, out_features: the matrix view's sizes (without the bias row).
      op: what :meth:`rows` needs: ``("dot", the input's contracted axes, weight operand,
        number of the weight's kept axes)`` for a discovered dense layer, ``("conv",
        ConvSpec, filter shape)`` for a convolution, None for a tagged dense layer.
      calls: how many times the equation runs per evaluation (the product of the lengths of
        the ``lax.scan`` loops around it; 1 outside loops).
      stack: for a weight sliced from a stacked ``[L, ...]`` leaf by a scan over layers,
        ``(L, inner, reverse)``: ``inner`` calls of the equation per iteration of that scan
        (loops nested inside it) and whether it runs backwards; None otherwise.
        ``weight_perm`` then refers to the slice's axes.
    """

    name: str
    kind: str
    weight: int
    bias: int | None
    path: _jaxpr.EqnPath
    tagged: bool
    input_index: int
    weight_perm: tuple[int, ...]
    in_features: int
    out_features: int
    op: Any
    calls: int = 1
    stack: tuple[int, int, bool] | None = None

    def slice_of(self, call: int) -> int:
        """Which slice of a stacked weight the `call`-th run of the equation uses (the
        evaluator unrolls loops in iteration order); 0 for an unstacked weight."""
        if self.stack is None:
            return 0
        length, inner, reverse = self.stack
        k = (call // inner) % length
        return length - 1 - k if reverse else k

    @property
    def in_axis(self) -> int:
        """Dense layers: the weight leaf's input axis (0: stored ``[in, out]``)."""
        return self.weight_perm[0]

    @property
    def a_slot(self) -> int:
        """Which of the leaf's two factor slots holds ``A`` (the other holds ``G``)."""
        return self.in_axis if len(self.weight_perm) == 2 else 0

    def to_matrix(self, leaf: jax.Array) -> jax.Array:
        """The weight (or a gradient shaped like it) as ``[in, out]``."""
        return jnp.transpose(leaf, self.weight_perm).reshape(self.in_features, self.out_features)

    def from_matrix(self, m: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Inverse of :meth:`to_matrix` for a leaf of `shape`."""
        moved = m.reshape([shape[a] for a in self.weight_perm])
        return jnp.transpose(moved, [int(a) for a in np.argsort(self.weight_perm)])

    def rows(self, x: jax.Array, out_grad: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Inputs as ``[M, in]`` rows and output gradients as ``[M, out]`` rows, in one order."""
        if self.op is None:  # tagged dense: every leading axis is a row axis
            return x.reshape(-1, x.shape[-1]), out_grad.reshape(-1, out_grad.shape[-1])
        if self.op[0] == "dot":
            _, c_in, weight_operand, kept = self.op
            x_rows = [d for d in range(x.ndim) if d not in c_in]
            a = jnp.transpose(x, (*x_rows, *c_in)).reshape(-1, self.in_features)
            # dot_general output axes: (lhs kept..., rhs kept...)
            g = out_grad
            if weight_operand == 0:
                g = jnp.moveaxis(g, tuple(range(kept)), tuple(range(-kept, 0)))
            return a, g.reshape(-1, self.out_features)
        _, spec, filter_shape = self.op
        dn = spec.dimension_numbers
        patches = jax.lax.conv_general_dilated_patches(
            x,
            filter_shape,
            spec.window_strides,
            spec.padding,
            spec.lhs_dilation,
            spec.rhs_dilation,
            dimension_numbers=dn,
            precision=jax.lax.Precision.HIGHEST,
        )  # laid out as the output, features (in_channel, kh, kw) with the channel slowest
        a = jnp.moveaxis(patches, dn.out_spec[1], -1)
        g = jnp.moveaxis(out_grad, dn.out_spec[1], -1)
        return a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])


@dataclasses.dataclass(frozen=True)
class Discovery:
    """What K-FAC found in ``value_fn``: its layers (uses of weights) and its tagged loss."""

    layers: tuple[Layer, ...]
    loss: str
    loss_path: _jaxpr.EqnPath
    leaf_names: tuple[str, ...]
    leaf_shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def units(self) -> dict[int, tuple[Layer, ...]]:
        """Weight leaf -> its uses (one per layer, several for a weight tagged at each use)."""
        out: dict[int, list[Layer]] = {}
        for layer in self.layers:
            out.setdefault(layer.weight, []).append(layer)
        return {w: tuple(uses) for w, uses in out.items()}

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
        for uses in self.units.values():
            layer = uses[0]
            bias = "" if layer.bias is None else f" + bias {self.leaf_names[layer.bias]}"
            if layer.kind == "conv2d":
                k = "x".join(str(s) for s in layer.op[2])
                channels = layer.in_features // math.prod(layer.op[2])
                size = f"{channels}ch x {k} -> {layer.out_features}ch"
            else:
                size = f"{layer.in_features} -> {layer.out_features}"
            how = "tagged" if layer.tagged else "found"
            how += f", {len(uses)} uses" if len(uses) > 1 else ""
            if layer.stack is not None:
                how += f", stacked: {layer.stack[0]} layers of a scan"
            elif layer.calls > 1:
                how += f", {layer.calls} scan iterations"
            lines.append(f"{layer.kind} {layer.name}: {size}{bias} ({how})")
        rest = [n for i, n in enumerate(self.leaf_names) if i not in self.layer_leaves]
        if rest:
            lines.append("diagonal (no layer): " + ", ".join(rest))
        return "\n".join(lines)


@dataclasses.dataclass
class _Param:
    leaf: int
    perm: tuple[int, ...]  # operand axis -> leaf axis (of the slice, when stacked)
    # sliced from the stacked leaf by a scan over its first axis: (length, calls of the scan's
    # body per evaluation, reverse); the value is then one slice ``leaf[l]``
    stack: tuple[int, int, bool] | None = None
    # reshaped or broadcast (a bias on its way to an add): no longer a weight operand
    view: bool = False


@dataclasses.dataclass
class _Out:
    layer: int  # index into the found list


@dataclasses.dataclass
class _Derived:
    leaves: frozenset[int]  # computed from these parameters alone (no data): an L2 term, ...


def _vector_like(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 1 and max(shape) == math.prod(shape)


def _shape(x: _Param, leaf_shapes: list[tuple]) -> tuple[int, ...]:
    """The shape of the parameter value `x` stands for (one slice of a stacked leaf)."""
    shape = tuple(leaf_shapes[x.leaf])
    return shape[1:] if x.stack is not None else shape


def _sliced(x: Any, length: int, body_calls: int, reverse: bool, leaf_shapes) -> Any:
    """What a scan's body sees of its ``xs`` input `x`: a slice of a parameter scanned along
    its first axis (a scan over layers), or nothing known."""
    if not isinstance(x, _Param) or x.stack is not None or x.view or not x.perm or x.perm[0]:
        return None
    if len(leaf_shapes[x.leaf]) not in (2, 3):  # stacked biases and dense weights
        return None
    return _Param(x.leaf, tuple(a - 1 for a in x.perm[1:]), (length, body_calls, reverse))


def discover(
    closed: core.ClosedJaxpr, leaf_paths: list[Any], leaf_shapes: list[tuple]
) -> Discovery:
    """Find the layers and the loss tag in a traced ``value_fn`` (params as its inputs)."""
    names = tuple(jax.tree_util.keystr(p) for p in leaf_paths)
    loss_path, loss_eqn = find_loss_tag(closed.jaxpr)
    found: list[dict[str, Any]] = []
    # parameter -> other ops that combine it with data before the loss tag (so they can shape
    # the model's outputs; terms added to the loss after the tag, such as L2, cannot)
    data_uses: dict[int, set[str]] = {}

    def visit(jaxpr: core.Jaxpr, env: dict, prefix: _jaxpr.EqnPath, calls: int) -> None:
        get = lambda v: None if isinstance(v, core.Literal) else env.get(v)
        for i, eqn in enumerate(jaxpr.eqns):
            here = (*prefix, i)
            name = eqn.primitive.name
            ins: list[Any] = [get(v) for v in eqn.invars]
            out = eqn.outvars[0] if eqn.outvars else None
            sub = _jaxpr.inner_jaxpr(eqn)
            if sub is not None:
                repeat = 1
                if name == "scan":  # loop invariants, and slices of scanned parameters
                    p = eqn.params
                    repeat, first_x = p["length"], p["num_consts"] + p["num_carry"]
                    ins = [
                        x if j < p["num_consts"]
                        else _sliced(x, repeat, calls * repeat, p["reverse"], leaf_shapes)
                        if j >= first_x
                        else None
                        for j, x in enumerate(ins)
                    ]  # fmt: skip
                sub_env = {sv: x for sv, x in zip(sub.invars, ins, strict=True) if x}
                visit(sub, sub_env, here, calls * repeat)
                if name != "scan":  # a call's outputs are its body's: follow them out
                    for ov, sv in zip(eqn.outvars, sub.outvars, strict=True):
                        if not isinstance(sv, core.Literal) and sv in sub_env:
                            env[ov] = sub_env[sv]
                continue
            layer = None
            if eqn.primitive is layer_tag_p:
                layer = _tagged(eqn, ins, leaf_shapes, names)
            elif name == "dot_general":
                layer = _dense(eqn, ins, leaf_shapes)
            elif name == "conv_general_dilated":
                layer = _conv(eqn, ins, leaf_shapes)
            if layer is not None:
                layer["path"] = here
                layer["calls"] = calls
                stack = layer.pop("param_stack", None)
                if stack is not None:  # (L, calls of the slicing scan's body, reverse)
                    layer["stack"] = (stack[0], calls // stack[1], stack[2])
                    layer["param_stack"] = stack
                found.append(layer)
                env[out] = _Out(len(found) - 1)
            elif name in _LAYOUT and ins[0] is not None:
                env[out] = ins[0]
            elif name == "transpose" and ins[0] is not None:
                perm = eqn.params["permutation"]
                if isinstance(ins[0], _Param):
                    x = ins[0]
                    env[out] = _Param(x.leaf, tuple(x.perm[p] for p in perm), x.stack, x.view)
                else:
                    env[out] = ins[0]
            elif name in _RESHAPE:
                x = ins[0]
                if isinstance(x, _Out) or (
                    isinstance(x, _Param) and _vector_like(_shape(x, leaf_shapes))
                ):
                    env[out] = x  # a layer's output, or a bias vector being broadcast
                elif isinstance(x, _Param) and x.perm == tuple(range(len(x.perm))):
                    # a bias of several axes (``[H, Dh]``) reshaped for broadcasting
                    env[out] = dataclasses.replace(x, view=True)
            elif name == "add":
                for o, p in ((ins[0], ins[1]), (ins[1], ins[0])):
                    if (
                        isinstance(o, _Out)
                        and isinstance(p, _Param)
                        and _bias_fits(_shape(p, leaf_shapes), p.perm, found[o.layer])
                        and found[o.layer]["bias"] is None
                        and not found[o.layer]["tagged"]
                        and _same_stack(p.stack, found[o.layer].get("param_stack"))
                    ):
                        found[o.layer]["bias"] = p.leaf
                        env[out] = o
            if layer is not None or any(v in env for v in eqn.outvars):
                continue
            # Any other op: parameters alone give a parameter-only value; parameters mixed
            # with data are "other uses" (a layer weight used so is refused below).
            leaves: set[int] = set()
            for x in ins:
                if isinstance(x, _Param):
                    leaves.add(x.leaf)
                elif isinstance(x, _Derived):
                    leaves |= x.leaves
            if not leaves:
                continue
            with_data = any(
                not isinstance(v, core.Literal) and not isinstance(x, (_Param, _Derived))
                for v, x in zip(eqn.invars, ins, strict=True)
            )
            if with_data:
                if here < loss_path:  # paths order equations as they are evaluated
                    for leaf in leaves:
                        data_uses.setdefault(leaf, set()).add(name)
            else:
                for v in eqn.outvars:
                    env[v] = _Derived(frozenset(leaves))

    env0 = {
        v: _Param(i, tuple(range(len(leaf_shapes[i])))) for i, v in enumerate(closed.jaxpr.invars)
    }
    visit(closed.jaxpr, env0, (), 1)
    for f in found:
        f.pop("param_stack", None)
        f.pop("kept_shape", None)
    layers = _resolve([Layer(name=names[f["weight"]], **f) for f in found], names)
    for layer in layers:
        if not layer.tagged and layer.weight in data_uses:
            ops = ", ".join(sorted(data_uses[layer.weight]))
            raise ValueError(
                f"parameter {names[layer.weight]} is the weight of a {layer.kind} layer and is "
                f"also used with the data elsewhere ({ops}: tied weights, e.g. an embedding "
                "table reused as the output layer). K-FAC's factors would miss that use: tag "
                "the layer use with jaxopt2.tag_dense / tag_conv2d to accept it, or untie it."
            )
    shapes = tuple(tuple(int(d) for d in s) for s in leaf_shapes)
    return Discovery(layers, loss_eqn.params["loss"], loss_path, names, shapes)


def _bias_fits(shape: tuple[int, ...], perm: tuple[int, ...], layer: dict[str, Any]) -> bool:
    """Whether a parameter of `shape` can be the bias of `layer` (a dict of :func:`discover`):
    a vector of its output size, or (untransposed) laid out as the weight's kept axes."""
    if math.prod(shape) != layer["out_features"]:
        return False
    if _vector_like(shape):
        return True
    kept = layer.get("kept_shape")
    squeeze = lambda s: tuple(d for d in s if d != 1)
    return kept is not None and perm == tuple(range(len(perm))) and squeeze(shape) == squeeze(kept)


def _same_stack(bias_stack: Any, layer_stack: Any) -> bool:
    """A bias belongs to a layer only if both are unstacked, or sliced by the same scan."""
    return bias_stack == layer_stack


def _resolve(found: list[Layer], names: tuple[str, ...]) -> tuple[Layer, ...]:
    """Tags override discovery; refuse untagged shared weights and inconsistent tags."""
    tagged = {layer.weight for layer in found if layer.tagged}
    layers = [layer for layer in found if layer.tagged or layer.weight not in tagged]
    uses: dict[int, list[Layer]] = {}
    for layer in layers:
        uses.setdefault(layer.weight, []).append(layer)
    for leaf, group in uses.items():
        if len(group) > 1 and not group[0].tagged:
            raise ValueError(
                f"parameter {names[leaf]} is the weight of {len(group)} products (tied weights "
                "or a layer applied twice): K-FAC's Kronecker factors assume one use. Tag each "
                "use with jaxopt2.tag_dense / tag_conv2d to make it one layer whose statistics "
                "gather every use, or untie it."
            )
        first = group[0]
        for other in group[1:]:
            same = (other.kind, other.weight_perm, other.in_features, other.out_features)
            if same != (first.kind, first.weight_perm, first.in_features, first.out_features) or (
                (other.stack is None) != (first.stack is None)
            ):
                raise ValueError(
                    f"parameter {names[leaf]} is tagged as different layers ({first.kind} "
                    f"{first.in_features}->{first.out_features} and {other.kind} "
                    f"{other.in_features}->{other.out_features}); tag every use the same way."
                )
            if other.bias != first.bias:
                raise ValueError(
                    f"parameter {names[leaf]} is tagged with different biases at its uses; "
                    "give every use the same bias (or none)."
                )
    return tuple(sorted(layers, key=lambda layer: layer.path))


def _aval_shape(var: Any) -> tuple[int, ...]:
    """The shape of a jaxpr variable (its abstract value is an array's)."""
    return tuple(var.aval.shape)


def _dense(eqn: core.JaxprEqn, ins: list, leaf_shapes: list[tuple]) -> dict[str, Any] | None:
    """The layer a ``dot_general`` makes, if one operand is a parameter of rank 2 or more
    whose axes it partly contracts (no batch axes) and the other comes from the data."""
    (contract, batch) = eqn.params["dimension_numbers"]
    params = [isinstance(x, _Param) for x in ins]
    if params[0] == params[1]:
        return None
    w = 0 if params[0] else 1
    ref: _Param = ins[w]
    shape = _shape(ref, leaf_shapes)
    contracted = tuple(int(a) for a in contract[w])
    kept = tuple(a for a in range(len(shape)) if a not in contracted)  # operand axes
    if ref.view or len(shape) < 2 or batch[w] or not contracted or not kept:
        return None
    in_axes = tuple(ref.perm[a] for a in contracted)  # leaf axes, paired with the data's
    out_axes = tuple(ref.perm[a] for a in kept)
    return {
        "param_stack": ref.stack,
        "kind": "dense",
        "weight": ref.leaf,
        "bias": None,
        "tagged": False,
        "input_index": 1 - w,
        "weight_perm": (*in_axes, *out_axes),
        "in_features": math.prod(int(shape[a]) for a in in_axes),
        "out_features": math.prod(int(shape[a]) for a in out_axes),
        "op": ("dot", tuple(int(a) for a in contract[1 - w]), w, len(kept)),
        "kept_shape": tuple(int(shape[a]) for a in out_axes),
    }


def _conv_layer(ref: _Param, kernel_shape: tuple, spec: ConvSpec) -> dict[str, Any]:
    rhs = spec.dimension_numbers.rhs_spec  # (out, in, spatial...) as kernel-operand axes
    order = (rhs[1], *rhs[2:], rhs[0])
    filter_shape = tuple(int(kernel_shape[a]) for a in rhs[2:])
    return {
        "kind": "conv2d",
        "weight": ref.leaf,
        "bias": None,
        "input_index": 1,
        "weight_perm": tuple(ref.perm[a] for a in order),
        "in_features": int(kernel_shape[rhs[1]]) * math.prod(filter_shape),
        "out_features": int(kernel_shape[rhs[0]]),
        "op": ("conv", spec, filter_shape),
    }


def _conv(eqn: core.JaxprEqn, ins: list, leaf_shapes: list[tuple]) -> dict[str, Any] | None:
    """The layer a ``conv_general_dilated`` makes: a rank-4 parameter kernel on data."""
    lhs, rhs = ins
    p = eqn.params
    if isinstance(lhs, _Param) or not isinstance(rhs, _Param) or rhs.stack is not None or rhs.view:
        return None
    if len(leaf_shapes[rhs.leaf]) != 4 or p["feature_group_count"] != 1:
        return None
    if p["batch_group_count"] != 1 or len(_aval_shape(eqn.invars[0])) != 4:
        return None
    spec = ConvSpec(
        (
            tuple(p["window_strides"]),
            tuple(tuple(x) for x in p["padding"]),
            tuple(p["lhs_dilation"]),
            tuple(p["rhs_dilation"]),
            p["dimension_numbers"],
        )
    )
    layer = _conv_layer(rhs, _aval_shape(eqn.invars[1]), spec)
    return {**layer, "tagged": False, "input_index": 0}


def _tagged(eqn: core.JaxprEqn, ins: list, leaf_shapes: list[tuple], names) -> dict[str, Any]:
    """The layer an explicit tag names."""
    kind = eqn.params["kind"]
    weight = ins[2]
    if not isinstance(weight, _Param) or weight.view:
        raise ValueError(
            f"tag_{kind}: its weight is not a parameter of value_fn (pass the parameter leaf "
            "itself, or its transpose or dtype cast, not a value computed from it)."
        )
    if weight.stack is not None and kind != "dense":
        raise ValueError(
            f"tag_{kind} for {names[weight.leaf]}: a kernel sliced from a stacked parameter "
            "(a scan over layers) is not supported; K-FAC stacks dense layers only."
        )
    bias = None
    if len(ins) > 3:
        if not isinstance(ins[3], _Param) or (
            ins[3].view and not _vector_like(_shape(ins[3], leaf_shapes))
        ):
            raise ValueError(
                f"tag_{kind} for {names[weight.leaf]}: its bias is not a parameter of value_fn."
            )
        if ins[3].stack != weight.stack:
            raise ValueError(
                f"tag_{kind} for {names[weight.leaf]}: the weight and its bias must both be "
                "plain parameters or both be sliced by the same scan over layers."
            )
        bias = ins[3].leaf
    if kind == "dense":
        d_in = int(_aval_shape(eqn.invars[1])[-1])
        d_out = int(_aval_shape(eqn.invars[0])[-1])
        ops = (0, 1) if eqn.params["layout"] == "in_out" else (1, 0)
        layer = {
            "param_stack": weight.stack,
            "kind": "dense",
            "weight": weight.leaf,
            "weight_perm": tuple(weight.perm[a] for a in ops),
            "in_features": d_in,
            "out_features": d_out,
            "op": None,
        }
    else:
        layer = _conv_layer(weight, _aval_shape(eqn.invars[2]), eqn.params["conv"])
    return {**layer, "bias": bias, "tagged": True, "input_index": 1}
