r"""K-FAC as an optax transformation, compiled once inside the user's ``jit``.

For a dense or convolution layer ``s = W a (+ b)`` (found by :mod:`.layers`, or tagged with
:func:`jaxopt2.tag_dense` / :func:`jaxopt2.tag_conv2d`) the Fisher block of ``W`` is
approximated by ``A ⊗ G`` with ``A = E[ā āᵀ]`` (inputs, with a homogeneous coordinate for the
bias; image patches for a convolution) and ``G = E[g gᵀ]`` (gradients of the per-example
loss at the layer's output, summed over its positions or time steps, with
targets sampled from the model's predictive distribution: the true Fisher), both kept as
exponential moving averages (``stats_decay``). The examples are the rows of the tagged outputs
(every axis but the last: a ``[B, T, V]`` tag is ``B·T`` tokens, exactly like its flattened
``[B·T, V]``), weighted as the tagged loss weights them
(:func:`jaxopt2.curvature.tags.row_weights`): the output cotangents carry ``√c_r``, so
``G`` is a plain sum, and with the tag's ``weights`` the rows of ``A`` are weighted too (a
padded token leaves both factors). Every ``invert_every`` steps the damped
inverses are refreshed with factored Tikhonov damping and the π-correction:

.. math::

   \pi = \sqrt{\frac{\operatorname{tr}(A)/\dim A}{\operatorname{tr}(G)/\dim G}}, \qquad
   Δ_W = (A + \pi\sqrt{λ}\, I)^{-1}\; ∇_W\; (G + \sqrt{λ}/\pi\; I)^{-1}

(``∇_W`` seen as ``[in(+1), out]``). Parameters in no layer get the diagonal of the sampled
Fisher, ``Δ = ∇ / (diag F + λ)``. With ``learning_rate=None`` (the default) the step is
``δ = α Δ + μ δ_{prev}`` with ``α`` (and ``μ`` when ``momentum=None``) minimizing the damped
quadratic model ``½ δᵀ (F + λI) δ + ∇ᵀδ``, using exact Gauss-Newton products (two JVPs of
the tagged outputs), and ``λ`` adapted by the Levenberg-Marquardt rule from the reduction ratio
``ρ = (h(θ+δ) − h(θ)) / M(δ)`` every ``damping_adaptation_interval`` steps (an extra forward
pass of ``value_fn`` at those steps). In that mode ``scale_by_kfac`` returns the final signed
step, so ``kfac()`` is not ``chain(..., scale_by_learning_rate)``: the learning rate *is* ``α``.
With a number, ``kfac(lr, momentum=m)`` is ``chain(scale_by_kfac, trace(m), scale_by_lr(lr))``
(the trace keeps its state over a step with non-finite statistics, as ``scale_by_kfac`` does).

Memory. The state's shapes are fixed at ``init``, which sees the parameters alone, so which
leaves are layers is decided there in one of two ways (:mod:`.factors`): the layer plan,
``kfac(layers=kfac_layers(loss_fn, params, *batch))`` (factors for the found layers alone,
sized exactly: attention kernels included, embedding and positional tables free), or
without one a rule on shapes (every rank-2/3/4 leaf gets slots). A plan rather than a mask
or a cheaper rule, because shapes cannot tell a ``[V, D]`` table (indexed) from a weight, nor
a ``[D, H, Dh]`` attention kernel from a stack of ``D`` layers: only the loss can, and
:func:`kfac_layers` already reads it. The update checks the plan against ``value_fn``. Either
way a factor side of more than ``max_factor_dim`` features is kept diagonal (one-sided
K-FAC), so no factor costs more than ``max_factor_dim`` times its side. On a vocab-8192
LM (2.5M parameters) the state is 1.56x Adam's with a plan, 1.87x without (55x with neither
bound); see ``experiments/kfac_lm_memory.py``.

Deadlock safety (jax 0.10 CPU): the inverses are batched per factor size and the batches
run one after another (each takes a data dependency on the previous one's result), so no
two batched LAPACK calls run concurrently: two at once can block both workers of XLA's CPU
thread pool, each waiting for sub-tasks only the other could run.

Under a device mesh (``Auto`` axes) the factors are owned: grouped by size
(:mod:`.factors`), each group that padding to the device count would not more than double
split over the devices, each device refreshes the inverses of its own layers and
preconditions their gradients, and only the preconditioned gradients are gathered. The
statistics are means over the global batch: each device sums ``aᵀa`` and ``gᵀg`` over its
share of the rows (:func:`jaxopt2._sharding.partial_sums`) and the sums are reduce-scattered
to the owners of the layers (:func:`jaxopt2._sharding.sum_partials`; all-reduced for a group
kept whole), so a device receives only its own layers' statistics. EKFAC's per-step scaling,
computed from per-example rows split over the batch, gathers the bases.

References:
  Martens, Grosse. "Optimizing Neural Networks with Kronecker-factored Approximate
  Curvature." ICML 2015. arXiv:1503.05671.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt2 import _jaxpr
from jaxopt2._sharding import gather_rows, map_split, own_rows, partial_sums, sum_partials
from jaxopt2._tree import check_choice
from jaxopt2.curvature.products import (
    output_fisher_vp,
    output_loss,
    output_residual,
    sample_targets,
)
from jaxopt2.curvature.tags import row_shape, row_weights
from jaxopt2.optimizers import _kronecker as kr
from jaxopt2.optimizers import registry
from jaxopt2.optimizers._contract import (
    check_learning_rate,
    check_number,
    check_seed,
    require_value_fn,
    resolve_key,
    static_dtype,
    static_int,
)
from jaxopt2.optimizers.kfac import _factors as fx
from jaxopt2.optimizers.kfac._layers import Discovery, Layer, discover
from jaxopt2.sharding import explicit_mesh

__all__ = ["ScaleByKfacState", "kfac", "kfac_layers", "leafwise", "scale_by_kfac"]

FISHER = ("sampled", "empirical", "exact")

MAX_FACTOR_DIM = 1024
"""Default ``max_factor_dim``: factor sides longer than this are kept diagonal.

A full side of size ``d`` costs ``d²`` entries twice (the EMA and its inverse or eigenbasis)
and a ``d³`` decomposition at every refresh; at 1024 that is 8 MiB in float32 and about a
gigaflop, the size of a wide transformer's MLP side, while the sides beyond it in practice
are vocabularies (a ``[D, V]`` head, a ``[V, D]`` table), where the per-step estimate has
far fewer rows than ``V`` and the softmax's Fisher ``diag(p) − p pᵀ`` is dominated by its
diagonal. Above it the cost grows quadratically (a 32k vocabulary: 8 GiB per factor) for
little curvature: the side is kept diagonal (one-sided K-FAC) and costs ``2d``."""


class ScaleByKfacState(NamedTuple):
    """State of :func:`scale_by_kfac`; every shape follows from the parameter shapes.

    Attributes:
      count: updates taken (int32).
      factors: per group of leaves with the same two factor sizes (see
        :mod:`jaxopt2.optimizers.kfac._factors`) a pair of stacks ``[n, S0, S0]``,
        ``[n, S1, S1]``, one row per layer (per slice of a stacked ``[L, ...]`` leaf), zero
        beyond each layer's corner and for leaves that are no layer; under a mesh an owned
        group's rows are padded and split over the devices. EMAs in ``stats_dtype``.
        :func:`leafwise` shows them per parameter leaf.
      inverses: the damped inverses of ``factors`` (same layout); with ``ekfac=True`` the
        factors' eigenvectors instead (in the slots' top-left corners).
      scaling: ``ekfac=True`` only: per group the ``[n, S0, S1]`` EMA of the squared
        per-example gradients in the eigenbasis (None per group otherwise).
      diag: EMA of the sampled Fisher's diagonal, like the parameters (the parameters in no
        layer use it; the entries of layer parameters stay zero).
      damping: the current λ.
      prev_update: the previous step ``δ`` (adaptive mode; kept over a skipped step).
      key: fallback PRNG key (target sampling).
      rho: the last reduction ratio measured (NaN before the first).
      num_nonfinite: steps with non-finite statistics (skipped).
      num_failed_inverses: factor inverses that failed and kept their previous value.
    """

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax
    factors: tuple
    inverses: tuple
    scaling: tuple
    diag: Any
    damping: jax.Array
    prev_update: Any
    key: jax.Array
    rho: jax.Array
    num_nonfinite: jax.Array
    num_failed_inverses: jax.Array

    # per-layer stacks, owned over a mesh (a class attribute, not a field)
    sharded_rows = ("factors", "inverses", "scaling")  # type: ignore[misc]


def _trace(closed, leaves, eps, discovery: Discovery):
    """Evaluate ``value_fn``'s jaxpr with layer outputs perturbed by ``eps`` (per layer, one
    perturbation per call: ``[calls, *output shape]``); return the tagged outputs and
    ``(layer inputs, one per call; (targets, weights or None), value)``."""
    by_path = {layer.path: i for i, layer in enumerate(discovery.layers)}
    inputs: list[list[Any]] = [[] for _ in discovery.layers]
    tag: list[Any] = []

    def hook(here, eqn, invals):
        if here == discovery.loss_path:
            tag.extend(invals)
            return None
        i = by_path.get(here)
        if i is None:
            return None
        layer = discovery.layers[i]
        call = len(inputs[i])  # scan bodies are unrolled: the same equation once per iteration
        inputs[i].append(invals[layer.input_index])
        if layer.tagged:  # the tag's first input is the layer's output
            out = invals[0]
        else:
            out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        return [out + eps[i][call]]

    interesting = [*by_path, discovery.loss_path]
    enter = lambda here: any(p[: len(here)] == here for p in interesting)
    (value,) = _jaxpr.evaluate(closed.jaxpr, closed.consts, leaves, hook, enter)
    return tag[0], (inputs, (tag[1], tag[2] if len(tag) > 2 else None), value)


def _output_fisher_sqrt(loss: str, outputs: jax.Array) -> jax.Array:
    """``B`` with ``B Bᵀ`` the per-example output Fisher, ``[N, C, C]`` (columns are vectors)."""
    if outputs.ndim == 1:  # one output per row
        return _output_fisher_sqrt(loss, outputs[:, None])[..., 0, :]
    c = outputs.shape[-1]
    eye = jnp.eye(c, dtype=outputs.dtype)
    if loss == "squared_error":
        return jnp.broadcast_to(eye, (*outputs.shape, c))
    if loss == "sigmoid_cross_entropy":
        p = jax.nn.sigmoid(outputs)
        return jnp.sqrt(p * (1 - p))[..., None] * eye
    p = jax.nn.softmax(outputs, axis=-1)
    s = jnp.sqrt(p)
    return s[..., None] * eye - p[..., :, None] * s[..., None, :]


def _output_cotangents(loss, outputs, weights, fisher, key, targets) -> jax.Array:
    """The cotangents of the tagged outputs whose backward pass gives the statistics:
    ``[columns, *outputs.shape]`` (the output Fisher's square-root columns for ``"exact"``,
    else one column of residuals against sampled or true targets), each row scaled by
    ``√c_r`` of :func:`jaxopt2.curvature.tags.row_weights`. Sums of outer products of the
    resulting gradients are then the tagged loss's curvature (``Σ_r c_r J_rᵀ F_r J_r``):
    no division by a batch size follows, and a ``[B, T, V]`` tag counts its ``B·T`` rows."""
    outputs = jax.lax.stop_gradient(outputs)
    root = jnp.sqrt(row_weights(outputs, weights))
    if fisher == "exact":
        cols = _output_fisher_sqrt(loss, outputs)
        return jnp.moveaxis(root[..., None] * cols, -1, 0)
    y = sample_targets(loss, outputs, key) if fisher == "sampled" else targets
    return (root * output_residual(loss, outputs, y))[None]


def _loss_check(disc: Discovery, value, outputs, targets, weights) -> str:
    """The report line comparing ``value_fn`` with the loss the tag implies, naming the likely
    cause of a difference (a sum over tokens, a mean over the batch only, a missing ½...)."""
    tagged = float(output_loss(disc.loss, outputs, targets, weights))
    value = float(value)
    gap = value - tagged
    rows = row_shape(outputs)
    n = int(np.prod(rows))
    what = (
        "sum(weights * l) / sum(weights)"
        if weights is not None
        else f"the mean over all {n} rows {rows} (every axis of the outputs {tuple(outputs.shape)} "
        "but the last)"
    )
    line = (
        f"\nloss check: value_fn = {value:.6g}, tagged {disc.loss} of the tagged outputs = "
        f"{tagged:.6g} (difference {gap:.3g}"
    )
    if abs(gap) <= 1e-5 * max(1.0, abs(value)):
        return line + ")"
    ratio = value / tagged if tagged else float("inf")
    near = lambda k: k > 0 and k != 1 and abs(ratio - k) <= 1e-4 * k
    causes = []
    positions = n // rows[0] if rows else 1
    if near(positions):
        causes.append(
            f"value_fn / tagged = {ratio:.6g} = the {positions} positions per batch row: "
            "value_fn sums over the positions (tokens) and averages over the batch only"
        )
    elif near(n):
        causes.append(f"value_fn / tagged = {ratio:.6g} = the {n} rows: a sum instead of a mean")
    if weights is not None:
        total = float(jnp.sum(weights))
        if near(total / n):
            causes.append(
                f"value_fn / tagged = {ratio:.6g} = sum(weights) / rows: the weighted sum is "
                "divided by the number of rows instead of sum(weights)"
            )
    if disc.loss == "squared_error" and near(2.0):
        causes.append("value_fn / tagged = 2: the ½ of ½‖f − y‖² is missing")
    if outputs.ndim > 1 and near(1 / outputs.shape[-1]):
        causes.append(
            f"value_fn / tagged = 1/{outputs.shape[-1]}: value_fn also averages over the last "
            "axis, which the tag sums"
        )
    cause = (
        "likely cause: " + "; ".join(causes)
        if causes
        else "parameter-only terms such as an L2 penalty explain a difference; a wrong loss "
        "name or a sum instead of a mean over the batch does not"
    )
    per_row = {
        "softmax_cross_entropy": "cross-entropy (optax.softmax_cross_entropy_with_integer_"
        "labels for labels, optax.softmax_cross_entropy for probabilities)",
        "sigmoid_cross_entropy": "binary cross-entropy summed over the last axis",
        "squared_error": "½‖f − y‖² over the last axis",
    }[disc.loss]
    return (
        f"{line}: {cause}). The tag's curvature is that of {what} of the per-row {per_row}: "
        "compute that value."
    )


def _discover(value_fn, params) -> tuple[Any, Discovery]:
    closed = jax.make_jaxpr(value_fn)(params)
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(params), strict=True)
    disc = discover(closed, list(paths), [tuple(np.shape(x)) for x in leaves])
    return closed, disc


def kfac_layers(loss_fn: Callable[..., jax.Array], params: Any, *batch: Any) -> Discovery:
    """What K-FAC finds in ``loss_fn(params, *batch)``: its layers and its tagged loss.

    Prints the report and returns the :class:`~jaxopt2.optimizers.kfac._layers.Discovery`,
    which is also a layer plan for ``kfac(layers=...)`` (factors for these layers alone).
    The check of the tagged loss compares ``loss_fn`` with the loss the tag implies (the mean
    over every row, all axes of the outputs but the last, of the named loss summed over the
    last axis; ``Σ w·ℓ / Σ w`` with the tag's weights) and reports the difference
    (parameter-only terms such as an L2 penalty are allowed), naming the likely cause when the
    ratio points at one: a sum over the tokens with a mean over the batch only (ratio: the
    positions per batch row), a sum instead of a mean, a weighted sum divided by the row
    count instead of the weights' sum, a missing ½ of the squared error.
    """

    closed, disc = _discover(lambda p: loss_fn(p, *batch), params)
    leaves = jax.tree.leaves(params)
    eps = [jnp.zeros((layer.calls,)) for layer in disc.layers]
    outputs, (_, (targets, weights), value) = _trace(closed, leaves, eps, disc)
    print(disc.describe() + _loss_check(disc, value, outputs, targets, weights))
    return disc


def scale_by_kfac(
    learning_rate: float | None = None,
    momentum: float | None = None,
    damping: float = 1.0,
    stats_decay: float = 0.95,
    invert_every: int | None = None,
    stats_every: int | None = None,
    fisher: str = "sampled",
    adapt_damping: bool = True,
    damping_adaptation_interval: int | None = None,
    damping_adaptation_decay: float = 0.95**5,
    min_damping: float = 1e-8,
    norm_constraint: float | None = None,
    ekfac: bool = False,
    seed: int = 0,
    stats_dtype: Any = "float32",
    max_factor_dim: int | None = None,
    layers: Discovery | None = None,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC's preconditioned direction, or with ``learning_rate=None`` its full adaptive step.

    Args:
      learning_rate: None: adaptive (the step from the quadratic model, signed; see the module
        docstring); a number or schedule: return the preconditioned gradient for the usual
        optax chain (the rate itself is applied by :func:`kfac`; here it only sizes
        `norm_constraint`).
      momentum: adaptive mode only: None solves for ``μ`` too; a number fixes it.
      damping: initial λ (Tikhonov), added as ``π√λ`` / ``√λ/π`` to the factors and as ``λ``
        to the diagonal Fisher and the quadratic model.
      stats_decay: EMA decay of the factors and of the diagonal Fisher.
      invert_every: refresh the damped inverses every this many steps (static; None: 5).
      stats_every: update the factors and the diagonal Fisher every this many steps, at
        steps ``0, k, 2k, ...`` (static; None: 1, every step). The statistics' extra forward
        and backward pass (sampled targets) are most of K-FAC's cost over a first-order
        step; between updates the stored factors precondition as they are (the EMA's bias
        correction counts updates, not steps). Not with ``ekfac=True``, whose scaling is a
        per-step statistic.
      fisher: ``"sampled"`` (targets drawn from the model, needs ``key``), ``"empirical"``
        (the true targets) or ``"exact"`` (``G`` from the exact output-space Fisher: one
        backward pass per output unit) (static).
      adapt_damping: the Levenberg-Marquardt rule on λ (adaptive mode) (static).
      damping_adaptation_interval: steps between λ updates (static; None: 5).
      damping_adaptation_decay: λ is multiplied (ρ > 3/4) or divided (ρ < 1/4) by this, in
        (0, 1].
      min_damping: floor of λ.
      norm_constraint: with a learning rate ``η``: scale the direction ``Δ`` down so that
        ``η² |Δ·∇| ≤ norm_constraint`` (the step's approximate squared Fisher norm; a trust
        region against early, badly estimated factors). Not for the adaptive mode, whose step
        the quadratic model already sizes.
      ekfac: EKFAC (George et al., 2018) instead of K-FAC's inverses: every `invert_every`
        steps the factors' eigenbases ``Q_A``, ``Q_G``; every step an EMA (``stats_decay``) of
        the squared per-example gradients in that basis, ``s = E[(Q_Aᵀ ∇_n Q_G)²]``, reset to
        K-FAC's eigenvalue products at each refresh; direction
        ``Q_A ((Q_Aᵀ ∇ Q_G) / (s + λ)) Q_Gᵀ`` (Tikhonov damping in the eigenbasis) (static).
        Per-example gradients assume the example axis is the first row axis.
      seed: seed of the fallback key.
      stats_dtype: dtype of factors, inverses and moments: a name or a dtype (static).
      max_factor_dim: a factor side of more features than this (the bias's homogeneous
        coordinate not counted) is kept diagonal (one-sided K-FAC for a large-vocabulary
        head); None: :data:`MAX_FACTOR_DIM`; a value at least the longest side keeps every
        side full (static).
      layers: a layer plan, the :class:`~jaxopt2.optimizers.kfac._layers.Discovery` of
        :func:`kfac_layers` on the loss: factors for its layers alone, sized exactly (and
        for attention kernels); None: the shape rule (see :mod:`.factors`) (static).

    Structural arguments default to None rather than their value so that
    ``optax.inject_hyperparams`` leaves them alone (see :mod:`jaxopt2.optimizers._contract`).
    """
    check_choice(fisher, "fisher", FISHER)
    check_learning_rate(learning_rate, "kfac", adaptive=True)
    invert_every = static_int(invert_every, "invert_every", 5, who="kfac")
    stats_every = static_int(stats_every, "stats_every", 1, who="kfac")
    if ekfac and stats_every > 1:
        raise ValueError(
            f"kfac: stats_every={stats_every} needs ekfac=False: EKFAC's eigenbasis scaling is "
            "an average of every step's per-example gradients."
        )
    interval = static_int(damping_adaptation_interval, "damping_adaptation_interval", 5, who="kfac")
    stats_dtype = static_dtype(stats_dtype, who="kfac")
    check_seed(seed)
    check_number(damping, "damping", low=0.0, low_inclusive=False)
    check_number(stats_decay, "stats_decay", low=0.0, high=1.0, high_inclusive=False)
    check_number(
        damping_adaptation_decay,
        "damping_adaptation_decay",
        low=0.0,
        high=1.0,
        low_inclusive=False,
        why="λ is divided by it when the model overestimates the reduction.",
    )
    check_number(min_damping, "min_damping", low=0.0)
    check_number(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False, optional=True)
    adaptive = learning_rate is None
    if norm_constraint is not None:
        if adaptive:
            raise ValueError(
                "kfac: norm_constraint needs a learning rate; the adaptive step "
                "(learning_rate=None) is already sized by the quadratic model."
            )
        check_number(norm_constraint, "norm_constraint", low=0.0, low_inclusive=False)
    max_factor_dim = static_int(max_factor_dim, "max_factor_dim", MAX_FACTOR_DIM, who="kfac")
    if layers is not None and not isinstance(layers, Discovery):
        raise TypeError(
            "kfac: layers must be the layer plan jaxopt2.kfac_layers(loss_fn, params, *batch) "
            f"returns, got {type(layers).__name__}."
        )

    def init_fn(params):
        groups, _ = fx.plan(
            [tuple(jnp.shape(p)) for p in jax.tree.leaves(params)], layers, max_factor_dim
        )
        factors = fx.zero_factors(groups, stats_dtype)
        inverses = fx.identity_factors(groups, stats_dtype)
        scaling = tuple(
            jnp.zeros((fx.stack_rows(g), *g.sizes), stats_dtype) if ekfac else None for g in groups
        )
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), stats_dtype), params)
        return ScaleByKfacState(
            count=jnp.zeros([], jnp.int32),
            factors=factors,
            inverses=inverses,
            scaling=scaling,
            diag=zeros,
            damping=jnp.asarray(damping, stats_dtype),
            prev_update=zeros,
            key=jax.random.PRNGKey(seed),
            rho=jnp.asarray(jnp.nan, stats_dtype),
            num_nonfinite=jnp.zeros([], jnp.int32),
            num_failed_inverses=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, key=None, **extra):
        del extra
        value_fn = require_value_fn(value_fn, "kfac")
        if explicit_mesh():
            raise ValueError(
                "kfac runs under a device mesh with Auto axes only: this mesh has Explicit "
                "axes. Make it with jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * "
                "len(shape)); the batch and parameters may stay sharded as they are."
            )
        if params is None:
            raise ValueError("kfac needs params: call update(grads, state, params, value_fn=...).")
        closed, disc = _discover(value_fn, params)
        groups, where = fx.plan([tuple(jnp.shape(x)) for x in jax.tree.leaves(params)],
                                layers, max_factor_dim)  # fmt: skip
        disc = fx.fit(disc, groups, where, planned=layers is not None)
        if not disc.layers:
            raise ValueError(
                "kfac found no layer in value_fn: no rank-2 parameter is multiplied with the "
                "data (dot_general) and no rank-4 one convolves it. K-FAC needs dense or conv "
                "layers: check that the parameters reach the products unchanged, tag them with "
                "jaxopt2.tag_dense / tag_conv2d, or use a diagonal optimizer for this model."
            )
        use_key, next_key = resolve_key(key, state.key)
        leaves, treedef = jax.tree.flatten(params)
        grads = [g.astype(stats_dtype) for g in jax.tree.leaves(updates)]
        t = state.count
        decay = stats_decay

        # --- statistics: one forward with layer-output perturbations, one backward ---------
        units = disc.units
        index = {layer.path: i for i, layer in enumerate(disc.layers)}
        heads = {uses[0].weight: uses[0] for uses in units.values()}
        info = fx.row_info(groups, heads)
        sides = _diagonal_sides(groups, where, heads)
        unit_rows: dict[int, list[list[tuple[jax.Array, jax.Array]]]] = {}  # leaf -> slices
        seen: dict[str, int] = {}  # the tag's row count (static)
        layer_eqns = _layer_eqns(closed, disc)
        # Perturbations of the layer outputs, in the outputs' own dtypes.
        eps_avals = [e.outvars[0].aval for e in layer_eqns]
        zero_eps = lambda: [
            jnp.zeros((layer.calls, *a.shape), a.dtype)
            for layer, a in zip(disc.layers, eps_avals, strict=True)
        ]
        # The backward pass differentiates the layer outputs (for G) and only the parameters in
        # no layer (their diagonal Fisher): the layers' own weight gradients are not needed.
        in_layer = disc.layer_leaves
        free = [i for i in range(len(leaves)) if i not in in_layer]

        def statistics(old_factors, old_diag):
            """The factors' and the diagonal Fisher's EMAs after this step's statistics, and
            whether those statistics are finite (the caller keeps the old values if not).
            Fills `unit_rows` (EKFAC's per-example rows) as a side effect."""

            def fwd(free_leaves, eps):
                lv = list(leaves)
                for i, x in zip(free, free_leaves, strict=True):
                    lv[i] = x
                return _trace(closed, lv, eps, disc)

            outputs, vjp_fn, (inputs, (targets, weights), _) = jax.vjp(
                fwd, [leaves[i] for i in free], zero_eps(), has_aux=True
            )
            seen["rows"] = int(np.prod(row_shape(outputs)))
            cot = _output_cotangents(disc.loss, outputs, weights, fisher, use_key, targets)
            # leading axis: output-Fisher columns (one unless "exact")
            leaf_grads, out_grads = jax.vmap(vjp_fn)(cot.astype(outputs.dtype))
            raw = {
                leaf: _unit_statistics(
                    uses,
                    index,
                    inputs,
                    out_grads,
                    stats_dtype,
                    unit_rows,
                    _input_row_weights(weights),
                    sides[leaf],
                )
                for leaf, uses in units.items()
            }
            diag_leaves = list(jax.tree.leaves(old_diag))  # layer leaves' entries stay zero
            for i, g in zip(free, leaf_grads, strict=True):
                sample = jnp.sum(jnp.square(g), axis=0)  # rows already weighted by √c_r
                diag_leaves[i] = decay * diag_leaves[i] + (1 - decay) * sample.astype(stats_dtype)
            diag = treedef.unflatten(diag_leaves)
            ok = kr.all_finite((raw, diag))
            stats = _stat_stacks(groups, raw, heads, stats_dtype)
            factors = tuple(
                tuple(decay * f + (1 - decay) * s for f, s in zip(fp, sp, strict=True))
                for fp, sp in zip(old_factors, stats, strict=True)
            )
            return factors, diag, ok  # kept or not below, with the gradients' finiteness

        if stats_every == 1:
            factors, diag, stats_ok = statistics(state.factors, state.diag)
        else:  # the stored statistics between updates
            factors, diag, stats_ok = jax.lax.cond(
                t % stats_every == 0,
                statistics,
                lambda f, d: (f, d, jnp.asarray(True)),
                state.factors,
                state.diag,
            )
        finite = stats_ok & kr.all_finite(grads)
        # a non-finite gradient skips the step: the statistics are kept too
        factors = jax.tree.map(lambda x, y: jnp.where(finite, x, y), factors, state.factors)
        diag = jax.tree.map(lambda x, y: jnp.where(finite, x, y), diag, state.diag)

        # --- damped inverses, refreshed every `invert_every` steps ----------------------------
        # Each device refreshes the rows of the groups it owns (and the whole of the groups
        # that padding would more than double): nothing travels but the failure count.
        lam = state.damping
        correction = 1.0 - decay ** (t // stats_every + 1).astype(stats_dtype)  # per update
        consts = [
            tuple(jnp.asarray(r[k]) for k in ("a_side", "dim_a", "dim_g", "k0", "k1", "layer"))
            for r in info
        ]

        def refresh_rows(items, shared):
            """Per group ``(side 0, side 1, scaling, bad rows)`` from its factors and stored
            inverses (or bases): K-FAC's damped inverses, or EKFAC's eigenbases."""
            lam_, corr = shared
            mats, corners = [], []
            for f0, f1, _, _, _, a_side, dim_a, dim_g, k0, k1, _ in items:
                f0, f1 = f0 / corr, f1 / corr
                if ekfac:
                    mats += [f0, f1]
                    corners += [k0, k1]
                    continue
                # π = sqrt((tr A / dim A) / (tr G / dim G)) balances the damping of the sides
                on0 = a_side == 0
                tr0, tr1 = fx.trace(f0), fx.trace(f1)
                tr_a, tr_g = jnp.where(on0, tr0, tr1), jnp.where(on0, tr1, tr0)
                pi = jnp.sqrt((tr_a / dim_a) / jnp.maximum(tr_g / dim_g, 1e-30))
                pi = jnp.where(jnp.isfinite(pi) & (pi > 0), pi, 1.0)
                gam_a, gam_g = pi * jnp.sqrt(lam_), jnp.sqrt(lam_) / pi
                for f, gam in ((f0, jnp.where(on0, gam_a, gam_g)),
                               (f1, jnp.where(on0, gam_g, gam_a))):  # fmt: skip
                    mats.append(fx.damped(f, gam))
            results = fx.eigenbases(mats, corners) if ekfac else fx.inverses(mats)
            out = []
            for j, (_, _, old0, old1, old_s, *_, layer) in enumerate(items):
                r0, r1 = results[2 * j], results[2 * j + 1]
                bad = (layer & ~r0[-1]).astype(jnp.int32) + (layer & ~r1[-1]).astype(jnp.int32)
                if not ekfac:
                    new0 = fx.rows_where(r0[1] & layer, r0[0], old0)
                    new1 = fx.rows_where(r1[1] & layer, r1[0], old1)
                    out.append((new0, new1, None, bad))
                    continue
                (q0, w0, ok0), (q1, w1, ok1) = r0, r1
                ok = ok0 & ok1 & layer
                # K-FAC's eigenvalues in the new basis start the EMA of the scaling
                s0 = jnp.maximum(w0, 0.0)[:, :, None] * jnp.maximum(w1, 0.0)[:, None, :]
                out.append((fx.rows_where(ok, q0, old0), fx.rows_where(ok, q1, old1),
                            fx.rows_where(ok, s0, old_s), bad))  # fmt: skip
            return out

        def refresh(inverses, scaling, failed):
            args = [
                (*fp, *ip, s, *c)
                for fp, ip, s, c in zip(factors, inverses, scaling, consts, strict=True)
            ]
            outs = map_split(refresh_rows, args, [fx.owned(g) for g in groups], (lam, correction))
            new_inverses = tuple((o[0], o[1]) for o in outs)
            new_scaling = tuple(o[2] for o in outs)
            bad = sum((jnp.sum(o[3], dtype=jnp.int32) for o in outs), jnp.zeros([], jnp.int32))
            return new_inverses, new_scaling, failed + bad

        inverses, scaling, failed = jax.lax.cond(
            (t % invert_every == 0) & finite,
            refresh,
            lambda inv, sc, f: (inv, sc, f),
            state.inverses,
            state.scaling,
            state.num_failed_inverses,
        )
        if ekfac:  # the per-step EMA of the squared per-example gradients in the eigenbasis
            # (from per-example rows, which are split over the batch, not over the owners:
            # the bases are gathered for it)
            fresh = _ekfac_stacks(groups, gather_rows(inverses), heads, unit_rows, seen["rows"])
            scaling = tuple(
                jnp.where(finite, decay * old + (1 - decay) * s, old)
                for old, s in zip(scaling, fresh, strict=True)
            )

        # --- the preconditioned gradient -----------------------------------------------------
        direction = list(grads)
        diag_hat = [d / correction for d in jax.tree.leaves(diag)]
        for i in free:
            direction[i] = grads[i] / (diag_hat[i] + lam)
        blocks = _gradient_stacks(groups, grads, heads, stats_dtype)

        def precondition_rows(items, lam_):
            """Per group its layers' preconditioned gradients ``[n, S0, S1]``."""
            out = []
            for inv0, inv1, s, v in items:
                if ekfac:  # inv0, inv1 are the eigenbases
                    rotated = fx.sandwich(fx.transpose(inv0), v, inv1) / (s + lam_)
                    out.append(fx.sandwich(inv0, rotated, fx.transpose(inv1)))
                else:
                    out.append(fx.sandwich(inv0, v, inv1))
            return out

        args = [(*ip, s, b) for ip, s, b in zip(inverses, scaling, blocks, strict=True)]
        pre = map_split(precondition_rows, args, [fx.owned(g) for g in groups], lam)
        pre = [gather_rows(p) if fx.owned(g) else p for g, p in zip(groups, pre, strict=True)]
        for leaf, layer in heads.items():
            g, member = where[leaf]
            rows = pre[g][member.offset : member.offset + member.count]
            bias = None if layer.bias is None else grads[layer.bias]
            d_w, d_b = _from_group(layer, member, groups[g].sizes, rows, grads[leaf], bias)
            direction[leaf] = d_w
            if layer.bias is not None:
                direction[layer.bias] = d_b

        if not adaptive:
            if norm_constraint is not None:
                lr = learning_rate(t) if callable(learning_rate) else learning_rate
                sq = lr**2 * jnp.abs(
                    sum(jnp.sum(d * g) for d, g in zip(direction, grads, strict=True))
                )
                coeff = jnp.minimum(1.0, jnp.sqrt(norm_constraint / jnp.maximum(sq, 1e-30)))
                direction = [coeff * d for d in direction]
            new_updates = [
                d.astype(g.dtype) for d, g in zip(direction, jax.tree.leaves(updates), strict=True)
            ]
            new_state = state._replace(
                count=optax.safe_increment(t),
                factors=factors,
                inverses=inverses,
                scaling=scaling,
                diag=diag,
                key=next_key,
                num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32),
                num_failed_inverses=failed,
            )
            return treedef.unflatten(new_updates), new_state

        # --- adaptive α, μ from the quadratic model (exact Gauss-Newton products) -------------
        delta = [-d for d in direction]
        prev = [p.astype(stats_dtype) for p in jax.tree.leaves(state.prev_update)]
        model = lambda lv: _trace(closed, lv, zero_eps(), disc)
        cast = lambda vs: [v.astype(jnp.result_type(x)) for v, x in zip(vs, leaves, strict=True)]
        # Both Jacobian-vector products in one batched JVP: one primal pass, the two tangents
        # as one batch (the primal does not depend on the tangent, so it comes out unbatched).
        tangents = [jnp.stack([a, b]) for a, b in zip(cast(delta), cast(prev), strict=True)]
        # (the loss value and the tag's weights come with the primal pass, as its aux)
        out0, j_both, (_, (_, weights), value) = jax.vmap(
            lambda tv: jax.jvp(model, (leaves,), (tv,), has_aux=True), out_axes=(None, 0, None)
        )(tangents)
        # The model's products run in the parameters' dtype; the 2x2 quadratic model is formed
        # in stats_dtype: bfloat16 coefficients (3 significant digits) can make its determinant
        # a difference of rounding errors, and the solved alpha, mu arbitrarily large.
        j_delta, j_prev = j_both[0].astype(stats_dtype), j_both[1].astype(stats_dtype)
        out0 = out0.astype(stats_dtype)
        c_rows = row_weights(out0, weights)
        fq = lambda u, v: jnp.sum(c_rows * u * output_fisher_vp(disc.loss, out0, v))
        dot = lambda u, v: sum(jnp.sum(x * y) for x, y in zip(u, v, strict=True))
        c11, c12, c22 = fq(j_delta, j_delta), fq(j_delta, j_prev), fq(j_prev, j_prev)
        d11, d12, d22 = dot(delta, delta), dot(delta, prev), dot(prev, prev)
        b1, b2 = dot(grads, delta), dot(grads, prev)
        m11, m12, m22 = c11 + lam * d11, c12 + lam * d12, c22 + lam * d22
        first = t == 0
        if momentum is None:
            det = m11 * m22 - m12 * m12
            alpha_2 = (-b1 * m22 + b2 * m12) / det
            mu_2 = (b1 * m12 - b2 * m11) / det
            ok2 = jnp.isfinite(alpha_2) & jnp.isfinite(mu_2) & (det > 0) & ~first
            alpha = jnp.where(ok2, alpha_2, -b1 / m11)
            mu = jnp.where(ok2, mu_2, 0.0)
        else:
            mu = jnp.where(first, 0.0, momentum)
            alpha = -(b1 + mu * m12) / m11
        step = [alpha * d + mu * p for d, p in zip(delta, prev, strict=True)]
        predicted = (
            0.5 * (alpha**2 * m11 + 2 * alpha * mu * m12 + mu**2 * m22) + alpha * b1 + mu * b2
        )
        step_ok = jnp.isfinite(predicted) & finite
        step = [jnp.where(step_ok, s, 0.0) for s in step]

        rho, lam_new = state.rho, lam
        if adapt_damping:

            def adapt(_):
                moved = treedef.unflatten(
                    [(p + s.astype(p.dtype)) for p, s in zip(leaves, step, strict=True)]
                )
                new_value = value_fn(moved)
                r = (new_value - value) / predicted
                grow = jnp.where(r < 0.25, lam / damping_adaptation_decay, lam)
                shrink = jnp.where(r > 0.75, lam * damping_adaptation_decay, grow)
                return r.astype(stats_dtype), jnp.maximum(
                    jnp.where(jnp.isfinite(r), shrink, lam / damping_adaptation_decay), min_damping
                ).astype(stats_dtype)

            rho, lam_new = jax.lax.cond(
                ((t + 1) % interval == 0) & step_ok, adapt, lambda _: (state.rho, lam), None
            )

        new_updates = treedef.unflatten(
            [s.astype(g.dtype) for s, g in zip(step, jax.tree.leaves(updates), strict=True)]
        )
        new_state = ScaleByKfacState(
            count=optax.safe_increment(t),
            factors=factors,
            inverses=inverses,
            scaling=scaling,
            diag=diag,
            damping=jnp.asarray(lam_new, stats_dtype),
            # A skipped step (non-finite statistics) keeps the last step for the momentum.
            prev_update=jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                treedef.unflatten([x.astype(stats_dtype) for x in step]),
                state.prev_update,
            ),
            key=next_key,
            rho=jnp.asarray(rho, stats_dtype),
            num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32),
            num_failed_inverses=failed,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _slices(layer: Layer) -> int:
    """How many layers a weight leaf holds (``L`` for a stacked leaf, else 1)."""
    return 1 if layer.stack is None else layer.stack[0]


def _unslice(parts: list[jax.Array], layer: Layer, axis: int = 0) -> jax.Array:
    """Inverse of :func:`_slice` over all slices (stacked along `axis`)."""
    return parts[0] if layer.stack is None else jnp.stack(parts, axis=axis)


def _input_row_weights(weights) -> jax.Array | None:
    """With tagged weights, the flat ``[N]`` factors ``w_r / mean(w)`` by which ``A``'s rows
    are weighted (so that ``A = Σ_r c_r a_r a_rᵀ`` like ``G``: a masked token's inputs leave
    ``A`` as its gradients leave ``G``); None without weights."""
    if weights is None:
        return None
    w = jax.lax.stop_gradient(weights).reshape(-1)
    return w * (w.shape[0] / jnp.where(jnp.sum(w) > 0, jnp.sum(w), 1))


def _unit_statistics(
    uses, index, inputs, out_grads, stats_dtype, unit_rows, row_w=None, diagonal=(False, False)
) -> tuple[jax.Array, jax.Array]:
    """This step's ``(A, G)`` of one weight leaf from all its uses, as per-device partial
    sums (:func:`jaxopt2._sharding.partial_sums`: ``[devices, k, k]``, the used corners;
    ``[devices, L, k, k]`` for a stacked leaf; ``devices`` is 1 without a mesh): ``A`` from
    the inputs (with the bias's homogeneous coordinate) over the rows of every call, ``G``
    from the output gradients (their rows already weighted by :func:`_output_cotangents`, so
    ``G`` is their sum). A stacked weight (a scan over layers) gets one pair per slice,
    from the calls that use that slice (``Layer.slice_of``), as if each slice were its own
    layer. Fills ``unit_rows[leaf][slice]`` with each call's rows (EKFAC). ``row_w``
    (:func:`_input_row_weights`) weights the rows of ``A`` of a layer whose row count is a
    multiple of the tag's rows (example-major: each tag row's block of rows shares its
    weight); a layer with other row counts keeps the plain mean. A side in `diagonal`
    (``(A, G)``) gets the diagonal alone (``[devices, k]``)."""
    gram_a, gram_g = fx.gram(diagonal[0]), fx.gram(diagonal[1])
    head = uses[0]
    slices = _slices(head)
    leaf = head.weight
    unit_rows[leaf] = [[] for _ in range(slices)]
    # running sums: a Python 0.0 until the first array is added
    sum_a: list[Any] = [0.0] * slices
    sum_g: list[Any] = [0.0] * slices
    rows_a = [0] * slices
    for layer in uses:
        i = index[layer.path]
        xs = jnp.stack(inputs[i])  # [calls, ...]: one entry per call (scan iteration)
        a = jax.vmap(lambda x, og, layer=layer: layer.rows(x, og)[0])(xs, out_grads[i][0]).astype(
            stats_dtype
        )
        if layer.bias is not None:
            a = jnp.concatenate([a, jnp.ones_like(a[..., :1])], axis=-1)
        # One [M, out] block per call and output-Fisher column (one unless "exact").
        g = jax.vmap(
            jax.vmap(lambda x, og, layer=layer: layer.rows(x, og)[1], in_axes=(0, 0)),
            in_axes=(None, 0),
        )(xs, out_grads[i]).astype(stats_dtype)  # [columns, calls, M, out]
        owner = [layer.slice_of(c) for c in range(layer.calls)]
        for c, k in enumerate(owner):
            unit_rows[leaf][k].append((a[c], g[:, c]))
        for k in range(slices):
            calls = [c for c, o in enumerate(owner) if o == k]
            a_k, g_k = (a, g) if slices == 1 else (a[np.array(calls)], g[:, np.array(calls)])
            # rows batch-major ([M, calls(, columns)] -> rows), so that each device's share
            # of the rows (partial_sums) is its share of the batch: no resharding first
            a_k = jnp.swapaxes(a_k, 0, 1)
            if row_w is not None and a_k.shape[0] % row_w.shape[0] == 0:
                per = jnp.repeat(row_w, a_k.shape[0] // row_w.shape[0]).astype(a_k.dtype)
                a_k = a_k * jnp.sqrt(per)[:, None, None]
            a_k = a_k.reshape(-1, a_k.shape[-1])
            g_k = jnp.moveaxis(g_k, -2, 0).reshape(-1, g_k.shape[-1])
            sum_a[k], rows_a[k] = sum_a[k] + partial_sums(gram_a, a_k), rows_a[k] + a_k.shape[0]
            sum_g[k] = sum_g[k] + partial_sums(gram_g, g_k)
    stat_a = _unslice([sa_k / r for sa_k, r in zip(sum_a, rows_a, strict=True)], head, axis=1)
    return stat_a, _unslice(sum_g, head, axis=1)


def _diagonal_sides(groups, where: dict, heads: dict) -> dict[int, tuple[bool, bool]]:
    """Per layer leaf whether its ``A`` and its ``G`` side are kept diagonal."""
    out = {}
    for leaf, layer in heads.items():
        g, member = where[leaf]
        a_side = _a_side(layer, member)
        out[leaf] = (groups[g].diag[a_side], groups[g].diag[1 - a_side])
    return out


def _shapes(tree: Any) -> tuple:
    """A pytree's structure and leaf shapes, hashable (to tell alike slices)."""
    return jax.tree.structure(tree), tuple(jnp.shape(x) for x in jax.tree.leaves(tree))


def _concat(parts: list[jax.Array]) -> jax.Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _corner(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`x` (``[..., r, c]``) zero-padded to ``[..., *size]``."""
    pad = [(0, 0)] * (x.ndim - 2) + [(0, size[0] - x.shape[-2]), (0, size[1] - x.shape[-1])]
    return jnp.pad(x, pad)


def _a_side(layer: Layer, member) -> int:
    return layer.a_slot ^ int(member.flip)


def _stat_stacks(groups, raw: dict, heads: dict, dtype) -> tuple:
    """This step's statistics per group and side, ``[stack_rows, S, S]`` (zero for leaves that
    are no layer and for padding), summed over the devices' partial sums: reduce-scattered
    to the owners of an owned group's rows (each device receives only its layers'
    statistics), all-reduced for a group kept whole."""
    out = []
    for group in groups:
        pair = []
        for side, (size, diag) in enumerate(zip(group.sizes, group.diag, strict=True)):
            row = fx.side_shape(size, diag)
            parts = {}
            for m in group.members:
                if m.leaf in raw:
                    stat = raw[m.leaf][0 if side == _a_side(heads[m.leaf], m) else 1]
                    stat = stat if m.stacked else stat[:, None]  # [devices, count, k(, k)]
                    parts[m.leaf] = fx.pad_side(stat.astype(dtype), size, diag)
            if not parts:  # no layer in the group (rank-2 leaves no layer uses): no sums
                pair.append(own_rows(jnp.zeros((group.count, *row), dtype)))
                continue
            devices = next(iter(parts.values())).shape[0]
            zeros = lambda m, row=row: jnp.zeros((devices, m.count, *row), dtype)
            stack = [parts[m.leaf] if m.leaf in parts else zeros(m) for m in group.members]
            pair.append(sum_partials(jnp.concatenate(stack, axis=1), split=fx.owned(group)))
        out.append(tuple(pair))
    return tuple(out)


def _gradient_stacks(groups, grads: list, heads: dict, dtype) -> list:
    """Per group its layers' gradients (bias as the last row) in the group's orientation
    ``[stack_rows, S0, S1]``: transposed when ``A`` is on side 1."""
    out = []
    for group in groups:
        parts = []
        for m in group.members:
            layer = heads.get(m.leaf)
            if layer is None:
                parts.append(jnp.zeros((m.count, *group.sizes), dtype))
                continue
            a_side = _a_side(layer, m)
            size = (group.sizes[a_side], group.sizes[1 - a_side])

            def one(gw, gb, layer=layer, a_side=a_side, size=size):
                v = layer.to_matrix(gw)
                if gb is not None:
                    v = jnp.concatenate([v, gb.reshape(1, -1)], axis=0)
                v = _corner(v, size)
                return v if a_side == 0 else v.T

            gb = None if layer.bias is None else grads[layer.bias]
            v = jax.vmap(one)(grads[m.leaf], gb) if m.stacked else one(grads[m.leaf], gb)[None]
            parts.append(v.astype(dtype))
        out.append(own_rows(_concat(parts)))
    return out


def _from_group(layer: Layer, member, sizes, rows: jax.Array, gw: jax.Array, gb) -> tuple:
    """Inverse of :func:`_gradient_stacks` for one leaf: its weight's and bias's directions
    from its rows ``[count, S0, S1]``."""
    a_side = _a_side(layer, member)

    def one(p, gw, gb):
        p = p if a_side == 0 else p.T
        d_w = layer.from_matrix(p[: layer.in_features, : layer.out_features], gw.shape)
        d_b = None if gb is None else p[layer.in_features, : layer.out_features].reshape(gb.shape)
        return d_w, d_b

    if member.stacked:
        return jax.vmap(one)(rows, gw, gb)
    return one(rows[0], gw, gb)


def _ekfac_stacks(groups, bases: tuple, heads: dict, unit_rows: dict, n: int) -> tuple:
    """Per group this step's EKFAC scaling ``E_n[(Q_Aᵀ ∇_n Q_G)²]`` in the group's
    orientation ``[stack_rows, S0, S1]`` (zero for leaves that are no layer)."""
    out = []
    for g, group in enumerate(groups):
        parts = []
        for m in group.members:
            layer = heads.get(m.leaf)
            if layer is None:
                parts.append(jnp.zeros((m.count, *group.sizes), bases[g][0].dtype))
                continue
            a_side = _a_side(layer, m)
            ka, kg = layer.in_features + (layer.bias is not None), layer.out_features
            size = (group.sizes[a_side], group.sizes[1 - a_side])
            qa = fx.side_corner(bases[g][a_side][m.offset : m.offset + m.count], ka)
            qg = fx.side_corner(bases[g][1 - a_side][m.offset : m.offset + m.count], kg)

            def one(rows, qa, qg, layer=layer, size=size):
                return _corner(_ekfac_scaling(rows, qa, qg, n, layer), size)

            per_slice = unit_rows[m.leaf]  # [slice][call] -> (a, g)
            if m.count == 1:
                s = one(per_slice[0], qa[0], qg[0])[None]
            elif len({_shapes(r) for r in per_slice}) == 1:
                # a scan's slices alike: one vmapped program, not one copy per slice
                rows = jax.tree.map(lambda *xs: jnp.stack(xs), *per_slice)
                s = jax.vmap(one)(rows, qa, qg)
            else:
                s = jnp.stack([one(r, qa[k], qg[k]) for k, r in enumerate(per_slice)])
            parts.append(s if a_side == 0 else jnp.swapaxes(s, -1, -2))
        out.append(own_rows(_concat(parts)))
    return tuple(out)


def leafwise(
    state: ScaleByKfacState,
    params: Any,
    layers: Discovery | None = None,
    max_factor_dim: int | None = None,
) -> ScaleByKfacState:
    """`state` with ``factors``, ``inverses`` and ``scaling`` per parameter leaf instead of per
    group (for inspection): per leaf with factor slots the pair ``(slot 0, slot 1)`` of
    :func:`~jaxopt2.optimizers.kfac._layers.factor_sizes` (``[d, d]``, ``[L, d, d]`` for a
    stacked leaf; with ``ekfac`` the bases in ``inverses``) and the scaling ``[d0, d1]``
    (rows: slot 0's basis), None for other leaves. A diagonal side is its ``[d]`` diagonal.
    Pass the `layers` plan and `max_factor_dim` the optimizer was made with (they fix the
    layout; None: :data:`MAX_FACTOR_DIM`, as in :func:`scale_by_kfac`). The per-leaf fields
    are tuples in the order of ``jax.tree.leaves(params)``. A state of
    ``jax.ShapeDtypeStruct`` leaves (from ``jax.eval_shape``) gives the per-leaf shapes."""
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
        return jax.eval_shape(lambda s: leafwise(s, params, layers, max_factor_dim), state)
    if max_factor_dim is None:
        max_factor_dim = MAX_FACTOR_DIM
    _, where = fx.plan(
        [tuple(jnp.shape(x)) for x in jax.tree.leaves(params)], layers, max_factor_dim
    )
    num = len(jax.tree.leaves(params))
    pairs = lambda stacks: tuple(
        fx.leaf_pair(stacks[where[i][0]], where[i][1]) if i in where else None for i in range(num)
    )

    def scaling(i):
        if i not in where or state.scaling[where[i][0]] is None:
            return None
        g, m = where[i]
        s = state.scaling[g][m.offset : m.offset + m.count]
        s = jnp.swapaxes(s, -1, -2) if m.flip else s
        return s if m.stacked else s[0]

    return state._replace(
        factors=pairs(state.factors),
        inverses=pairs(state.inverses),
        scaling=tuple(scaling(i) for i in range(num)),
    )


def _ekfac_scaling(rows, qa, qg, n, layer) -> jax.Array:
    """``Σ_n (Q_Aᵀ ∇_n Q_G)²`` from a layer's rows: per-example gradients ``Σ_rows a gᵀ``
    over the example's rows (positions, time steps, tied uses; `n` examples: the tag's rows),
    summed over output-Fisher columns; ``g`` carries the tagged loss's row weights
    (:func:`_output_cotangents`), which makes the sum the mean ``E_n`` of the unweighted
    rows."""
    if len(rows) == 1 and rows[0][0].shape[0] == n:  # one row per example: no outer products
        a, g = rows[0]
        a2 = jnp.square(fx.rotate(a, qa))
        g2 = jnp.sum(jnp.square(fx.rotate(g, qg)), axis=0)
        return kr.mm(a2.T, g2)
    total: Any = 0.0
    for a, g in rows:
        if a.shape[0] % n:
            raise ValueError(
                f"ekfac: layer {layer.name} has {a.shape[0]} rows for {n} examples; per-example "
                "gradients need the example axis to lead the layer's row axes."
            )
        ta = fx.rotate(a, qa).reshape(n, -1, qa.shape[-1])
        tg = fx.rotate(g, qg)
        tg = tg.reshape(g.shape[0], n, -1, qg.shape[-1])
        total = total + jnp.einsum("nti,cnto->cnio", ta, tg, precision="highest")
    return jnp.sum(jnp.square(total), axis=(0, 1))


def _layer_eqns(closed, disc: Discovery) -> list[Any]:
    """Each layer's ``dot_general`` equation (one walk of the jaxpr)."""
    by_path = dict(_jaxpr.walk(closed.jaxpr))
    return [by_path[layer.path] for layer in disc.layers]


def kfac(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    momentum: float | None = None,
    damping: float = 1.0,
    stats_decay: float = 0.95,
    invert_every: int | None = None,
    stats_every: int | None = None,
    fisher: str = "sampled",
    adapt_damping: bool = True,
    norm_constraint: float | None = None,
    ekfac: bool = False,
    weight_decay: float | None = None,
    mask: Any = None,
    seed: int = 0,
    stats_dtype: Any = "float32",
    max_factor_dim: int | None = None,
    layers: Discovery | None = None,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC (Martens & Grosse, 2015). ``kfac()``: learning rate, momentum and damping all
    adaptive (the recommended setting; see the module docstring for how that step differs
    from ``chain(..., scale_by_learning_rate)``). With a learning rate:
    ``chain(scale_by_kfac, [trace(momentum)], add_decayed_weights, scale_by_learning_rate)``.

    Needs the extra arguments ``value_fn`` (a loss that calls :func:`jaxopt2.tag_loss`) and
    ``key`` (target sampling; falls back to a key in the state).

    Args:
      learning_rate: None (adaptive: the step size ``α`` from the quadratic model), a number
        ``>= 0`` or an optax schedule.
      momentum: in ``[0, 1)``. With a learning rate: heavy-ball momentum on the
        preconditioned direction (``optax.trace``; None: none). Without one: the fixed
        ``μ`` of the adaptive step ``δ = α Δ + μ δ_prev`` (``α`` still from the quadratic
        model, given ``μ``); None solves for ``μ`` as well.
      weight_decay: decoupled weight decay (with a learning rate only; None: none).
      mask: which leaves get the weight decay, as in ``optax.adamw``: a pytree of bools
        with the structure of (a prefix of) the parameters, or a function ``params ->``
        such a tree; None: every leaf (static).

    See :func:`scale_by_kfac` for the other arguments.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> from jaxopt2.optimizers.kfac import kfac
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (64, 5))
      >>> y = x @ jax.random.normal(jax.random.PRNGKey(1), (5, 2))
      >>> def loss_fn(p, x, y):
      ...     out = jaxopt2.tag_loss("squared_error", x @ p["w"] + p["b"], y)
      ...     return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))
      >>> p = {"w": jnp.zeros((5, 2)), "b": jnp.zeros(2)}
      >>> opt = kfac(); state = opt.init(p)
      >>> step = jax.jit(lambda p, s, k: jaxopt2.value_and_update(opt, loss_fn, p, s, x, y, key=k))
      >>> for i in range(20):
      ...     loss, u, state = step(p, state, jax.random.PRNGKey(i))
      ...     p = optax.apply_updates(p, u)
      >>> bool(loss_fn(p, x, y) < 1e-4)
      True
    """
    check_learning_rate(learning_rate, "kfac", adaptive=True)
    check_number(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False, optional=True)
    check_number(weight_decay, "weight_decay", low=0.0, schedule=True, optional=True)
    if (
        learning_rate is None
        and weight_decay is not None
        and (isinstance(weight_decay, jax.Array | np.ndarray) or weight_decay != 0)
    ):
        raise ValueError(
            "kfac(learning_rate=None) takes its step from the quadratic model; put weight "
            "decay into the loss (an L2 term) or pass a learning rate."
        )
    inner = scale_by_kfac(
        learning_rate=learning_rate,
        momentum=momentum if learning_rate is None else None,
        damping=damping,
        stats_decay=stats_decay,
        invert_every=invert_every,
        stats_every=stats_every,
        fisher=fisher,
        adapt_damping=adapt_damping,
        norm_constraint=norm_constraint,
        ekfac=ekfac,
        seed=seed,
        stats_dtype=stats_dtype,
        max_factor_dim=max_factor_dim,
        layers=layers,
    )
    if learning_rate is None:
        return inner
    parts = [inner]
    if momentum is not None:
        parts.append(_kept_on_nonfinite(optax.trace(decay=momentum)))
    if weight_decay is not None:
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def _kept_on_nonfinite(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """`inner` with its state kept on a non-finite input: the momentum after a step
    :func:`scale_by_kfac` skipped is the one before it (the update itself passes through)."""

    def update_fn(updates, state, params=None, **extra):
        del extra
        new_updates, new_state = inner.update(updates, state, params)
        ok = kr.all_finite(updates)
        return new_updates, jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


registry.register(
    "kfac",
    kfac,
    needs_value_fn=True,
    needs_key=True,
    static_args=(
        "mask",
        "invert_every",
        "stats_every",
        "fisher",
        "adapt_damping",
        "ekfac",
        "seed",
        "stats_dtype",
        "max_factor_dim",
        "layers",
    ),
)
