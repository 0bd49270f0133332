"""Explicit layer tags: ``jaxopt2.tag_dense`` and ``jaxopt2.tag_conv2d``.

A tag marks a layer's output, its input and its parameters inside an ordinary model, and
returns the output unchanged (an identity for jit, grad and vmap). K-FAC uses tagged layers
instead of discovering them (:mod:`.layers`): a tag overrides discovery for its weight, and a
weight tagged at several places (tied weights, a layer applied twice) is one layer whose
statistics gather every use, as the rows of a sequence do.

    >>> import jax.numpy as jnp, jaxopt2
    >>> def dense(p, x):
    ...     return jaxopt2.tag_dense(x @ p["w"] + p["b"], x, p["w"], p["b"])
    >>> dense({"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}, jnp.ones((4, 3))).shape
    (4, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core
from jax.interpreters import ad, batching, mlir

__all__ = ["ConvSpec", "layer_tag_p", "tag_conv2d", "tag_dense"]

# bind(outputs, inputs, weight[, bias], kind=..., conv=..., layout=...) -> outputs
layer_tag_p = core.Primitive("jaxopt2_layer_tag")
layer_tag_p.def_impl(lambda outputs, *rest, **params: outputs)
layer_tag_p.def_abstract_eval(lambda outputs, *rest, **params: outputs)
mlir.register_lowering(
    layer_tag_p,
    mlir.lower_fun(lambda outputs, *rest, **params: outputs, multiple_results=False),
)


def _layer_tag_jvp(primals, tangents, **params):
    return layer_tag_p.bind(*primals, **params), ad.instantiate_zeros(tangents[0])


ad.primitive_jvps[layer_tag_p] = _layer_tag_jvp


class ConvSpec(tuple):
    """The static arguments of a tagged 2-D convolution (hashable, as primitive params must be):
    ``(window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)`` with explicit
    padding pairs and ``jax.lax.ConvDimensionNumbers``."""

    __slots__ = ()

    @property
    def window_strides(self):
        return self[0]

    @property
    def padding(self):
        return self[1]

    @property
    def lhs_dilation(self):
        return self[2]

    @property
    def rhs_dilation(self):
        return self[3]

    @property
    def dimension_numbers(self) -> jax.lax.ConvDimensionNumbers:
        return self[4]


def _to_axis(x: jax.Array, bdim: int | None, size: int, axis: int) -> jax.Array:
    """Move a vmapped axis to `axis` (broadcasting an unbatched operand)."""
    if bdim is None:
        return jnp.moveaxis(jnp.broadcast_to(x, (size, *x.shape)), 0, axis)
    return jnp.moveaxis(x, bdim, axis)


def _merge(x: jax.Array, axis: int) -> jax.Array:
    """Fold axis `axis` into the next one (the vmapped axis into the example axis)."""
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2 :])


def _layer_tag_batch(args, dims, *, kind, conv, layout):
    outputs, inputs, *params = args
    d_out, d_in, *d_params = dims
    if any(d is not None for d in d_params):
        raise ValueError(
            f"tag_{kind}: the weight or bias is vmapped over; a layer tag needs parameters "
            "shared by every example (vmap the data, not the parameters)."
        )
    size = outputs.shape[d_out] if d_out is not None else inputs.shape[d_in]
    bind = lambda o, i: layer_tag_p.bind(o, i, *params, kind=kind, conv=conv, layout=layout)
    if kind == "dense":  # every axis but the last is a row: the vmapped one becomes one more
        return bind(_to_axis(outputs, d_out, size, 0), _to_axis(inputs, d_in, size, 0)), 0
    # conv: fold the vmapped axis into the operands' example (N) axis, then unfold
    in_axis, out_axis = conv.dimension_numbers.lhs_spec[0], conv.dimension_numbers.out_spec[0]
    out = _to_axis(outputs, d_out, size, out_axis)
    res = bind(_merge(out, out_axis), _merge(_to_axis(inputs, d_in, size, in_axis), in_axis))
    return res.reshape(out.shape), out_axis


batching.primitive_batchers[layer_tag_p] = _layer_tag_batch

_LAYOUTS = ("in_out", "out_in")


def tag_dense(
    outputs: jax.Array,
    inputs: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    layout: str | None = None,
) -> jax.Array:
    """Mark ``outputs = inputs @ W (+ bias)`` as a dense layer for K-FAC; returns `outputs`.

    Args:
      outputs: ``[..., out]`` (every leading axis is a row: batch, time, ...).
      inputs: ``[..., in]``, the same leading axes.
      weight: the parameter, ``[in, out]`` or ``[out, in]`` (equinox's and PyTorch's layout),
        told apart by the shapes.
      bias: the ``[out]`` parameter added to the product, if any.
      layout: ``"in_out"`` or ``"out_in"``; needed only for a square weight.

    Raises:
      ValueError: shapes that don't make a dense layer, or a square weight without `layout`.
    """
    outputs, inputs, weight = jnp.asarray(outputs), jnp.asarray(inputs), jnp.asarray(weight)
    if weight.ndim != 2 or inputs.ndim < 1 or outputs.ndim < 1:
        raise ValueError(
            f"tag_dense: weight must be 2-D and inputs/outputs at least 1-D, got weight "
            f"{weight.shape}, inputs {inputs.shape}, outputs {outputs.shape}."
        )
    d_in, d_out = inputs.shape[-1], outputs.shape[-1]
    if inputs.shape[:-1] != outputs.shape[:-1]:
        raise ValueError(
            f"tag_dense: inputs {inputs.shape} and outputs {outputs.shape} must share their "
            "leading (row) axes."
        )
    fits = [
        lay
        for lay, s in zip(_LAYOUTS, ((d_in, d_out), (d_out, d_in)), strict=True)
        if weight.shape == s
    ]
    if not fits:
        raise ValueError(
            f"tag_dense: a weight of shape {weight.shape} does not map inputs with {d_in} "
            f"features to outputs with {d_out}: expected ({d_in}, {d_out}) or ({d_out}, {d_in})."
        )
    if layout is None:
        if len(fits) > 1:
            raise ValueError(
                f"tag_dense: the weight {weight.shape} is square, so its layout is ambiguous: "
                "pass layout='in_out' (outputs = inputs @ weight) or 'out_in' "
                "(outputs = inputs @ weight.T)."
            )
        layout = fits[0]
    elif layout not in fits:
        raise ValueError(f"tag_dense: layout must be one of {fits} here, got {layout!r}.")
    params = [weight]
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.size != d_out or max(bias.shape, default=1) != d_out:
            raise ValueError(f"tag_dense: bias of shape {bias.shape} for {d_out} outputs.")
        params.append(bias)
    return layer_tag_p.bind(outputs, inputs, *params, kind="dense", conv=None, layout=layout)


def tag_conv2d(
    outputs: jax.Array,
    inputs: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    window_strides: Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "VALID",
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
) -> jax.Array:
    """Mark ``outputs = conv(inputs, kernel) (+ bias)`` as a 2-D convolution for K-FAC.

    The keyword arguments are those of ``jax.lax.conv_general_dilated`` for the convolution
    that made `outputs` (default layouts NCHW / OIHW / NCHW, as there). Returns `outputs`.

    Raises:
      ValueError: inputs, kernel and outputs whose shapes don't make that convolution.
    """
    outputs, inputs, kernel = jnp.asarray(outputs), jnp.asarray(inputs), jnp.asarray(kernel)
    if inputs.ndim != 4 or kernel.ndim != 4 or outputs.ndim != 4:
        raise ValueError(
            f"tag_conv2d: inputs, kernel and outputs must be 4-D, got {inputs.shape}, "
            f"{kernel.shape}, {outputs.shape}."
        )
    dn = jax.lax.conv_dimension_numbers(inputs.shape, kernel.shape, dimension_numbers)
    strides = tuple(int(s) for s in window_strides)
    lhs_dil = (1, 1) if lhs_dilation is None else tuple(int(s) for s in lhs_dilation)
    rhs_dil = (1, 1) if rhs_dilation is None else tuple(int(s) for s in rhs_dilation)
    if isinstance(padding, str):
        in_sp = [inputs.shape[d] for d in dn.lhs_spec[2:]]
        k_sp = [kernel.shape[d] for d in dn.rhs_spec[2:]]
        dilated_in = [(s - 1) * d + 1 for s, d in zip(in_sp, lhs_dil, strict=True)]
        dilated_k = [(s - 1) * d + 1 for s, d in zip(k_sp, rhs_dil, strict=True)]
        pads = tuple(jax.lax.padtype_to_pads(dilated_in, dilated_k, strides, padding))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    expected = jax.eval_shape(
        lambda x, k: jax.lax.conv_general_dilated(
            x, k, strides, pads, lhs_dil, rhs_dil, dimension_numbers=dn
        ),
        inputs,
        kernel,
    ).shape
    if tuple(expected) != tuple(outputs.shape):
        raise ValueError(
            f"tag_conv2d: convolving inputs {inputs.shape} with kernel {kernel.shape} gives "
            f"{tuple(expected)}, but outputs are {outputs.shape}: check the conv arguments."
        )
    params = [kernel]
    n_out = kernel.shape[dn.rhs_spec[0]]
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.size != n_out or max(bias.shape, default=1) != n_out:
            raise ValueError(f"tag_conv2d: bias of shape {bias.shape} for {n_out} channels.")
        params.append(bias)
    spec = ConvSpec((strides, pads, lhs_dil, rhs_dil, dn))
    return layer_tag_p.bind(outputs, inputs, *params, kind="conv2d", conv=spec, layout=None)
