r"""K-FAC as an optax transformation, compiled once inside the user's ``jit``.

For a dense or convolution layer ``s = W a (+ b)`` (found by :mod:`.layers`, or tagged with
:func:`jaxopt2.tag_dense` / :func:`jaxopt2.tag_conv2d`) the Fisher block of ``W`` is
approximated by ``A ⊗ G`` with ``A = E[ā āᵀ]`` (inputs, with a homogeneous coordinate for the
bias; image patches for a convolution) and ``G = E[g gᵀ]`` (gradients of the per-example
loss at the layer's output, summed over its positions or time steps, with
targets sampled from the model's predictive distribution: the true Fisher), both kept as
exponential moving averages (``stats_decay``). Every ``invert_every`` steps the damped
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
With a number, ``kfac(lr, momentum=m)`` is ``chain(scale_by_kfac, trace(m), scale_by_lr(lr))``.

Deadlock safety (jax 0.10 CPU): the inverses are batched per factor size and the batches
run one after another (each takes a data dependency on the previous one's result), so no
two batched LAPACK calls run concurrently: two at once can block both workers of XLA's CPU
thread pool, each waiting for sub-tasks only the other could run.

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
from jaxopt2._tree import check_choice, check_hyperparameter, check_positive_int
from jaxopt2.curvature.products import (
    output_fisher_vp,
    output_loss,
    output_residual,
    sample_targets,
)
from jaxopt2.optimizers import kronecker as kr
from jaxopt2.optimizers import registry
from jaxopt2.optimizers.contract import require_value_fn, resolve_key
from jaxopt2.optimizers.kfac import factors as fx
from jaxopt2.optimizers.kfac.layers import Discovery, Layer, discover, factor_sizes, factor_stack
from jaxopt2.sharding import explicit_mesh

__all__ = ["ScaleByKfacState", "kfac", "kfac_layers", "scale_by_kfac"]

FISHER = ("sampled", "empirical", "exact")


class ScaleByKfacState(NamedTuple):
    """State of :func:`scale_by_kfac`; every shape follows from the parameter shapes.

    Attributes:
      count: updates taken (int32).
      factors: per leaf, for rank-2 and rank-4 leaves a pair of square factors of the sizes
        :func:`~jaxopt2.optimizers.kfac.layers.factor_sizes` gives (one holds ``A`` and the
        other ``G`` once discovery says which leaves are layers; unused ones stay zero), for
        rank-3 leaves ``[L, ...]`` such a pair stacked ``[L, d, d]`` (a scan over layers),
        None for other leaves. EMAs in ``stats_dtype``.
      inverses: the damped inverses of ``factors`` (same layout); with ``ekfac=True`` the
        factors' eigenvectors instead (in the slots' top-left corners).
      scaling: ``ekfac=True`` only: per layer leaf the ``[size_A, size_G]`` EMA of the
        squared per-example gradients in the eigenbasis (None otherwise).
      diag: EMA of the sampled Fisher's diagonal, like the parameters (the parameters in no
        layer use it; the entries of layer parameters stay zero).
      damping: the current λ.
      prev_update: the previous step ``δ`` (adaptive mode).
      key: fallback PRNG key (target sampling).
      rho: the last reduction ratio measured (NaN before the first).
      num_nonfinite: steps with non-finite statistics (skipped).
      num_failed_inverses: factor inverses that failed and kept their previous value.
    """

    count: jax.Array
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


def _trace(closed, leaves, eps, discovery: Discovery):
    """Evaluate ``value_fn``'s jaxpr with layer outputs perturbed by ``eps`` (per layer, one
    perturbation per call: ``[calls, *output shape]``); return the tagged outputs and
    ``(layer inputs, one per call; targets, value)``."""
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
    return tag[0], (inputs, tag[1], value)


def _output_fisher_sqrt(loss: str, outputs: jax.Array) -> jax.Array:
    """``B`` with ``B Bᵀ`` the per-example output Fisher, ``[N, C, C]`` (columns are vectors)."""
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


def _discover(value_fn, params) -> tuple[Any, Discovery]:
    closed = jax.make_jaxpr(value_fn)(params)
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(params), strict=True)
    disc = discover(closed, list(paths), [tuple(np.shape(x)) for x in leaves])
    return closed, disc


def kfac_layers(loss_fn: Callable[..., jax.Array], params: Any, *batch: Any) -> Discovery:
    """What K-FAC finds in ``loss_fn(params, *batch)``: its layers and its tagged loss.

    Prints the report and returns the :class:`~jaxopt2.optimizers.kfac.layers.Discovery`.
    The check of the tagged loss compares ``loss_fn`` with the tagged loss of the tagged
    outputs and targets and reports the difference (parameter-only terms such as an L2
    penalty are allowed; a wrong loss name or a sum instead of a mean shows up here).
    """

    closed, disc = _discover(lambda p: loss_fn(p, *batch), params)
    leaves = jax.tree.leaves(params)
    eps = [jnp.zeros((layer.calls,)) for layer in disc.layers]
    outputs, (_, targets, value) = _trace(closed, leaves, eps, disc)
    tagged = output_loss(disc.loss, outputs, targets)
    gap = float(value) - float(tagged)
    report = disc.describe() + (
        f"\nloss check: value_fn = {float(value):.6g}, tagged {disc.loss} of the tagged "
        f"outputs = {float(tagged):.6g} (difference {gap:.3g}"
        + (
            ")"
            if abs(gap) <= 1e-5 * max(1.0, abs(float(value)))
            else ": parameter-only terms such as an L2 penalty explain a difference; a wrong loss "
            "name or a sum instead of a mean over the batch does not)"
        )
    )
    print(report)
    return disc


def scale_by_kfac(
    learning_rate: float | None = None,
    momentum: float | None = None,
    damping: float = 1.0,
    stats_decay: float = 0.95,
    invert_every: int = 5,
    fisher: str = "sampled",
    adapt_damping: bool = True,
    damping_adaptation_interval: int = 5,
    damping_adaptation_decay: float = 0.95**5,
    min_damping: float = 1e-8,
    norm_constraint: float | None = None,
    ekfac: bool = False,
    seed: int = 0,
    stats_dtype: Any = jnp.float32,
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
      invert_every: refresh the damped inverses every this many steps (static).
      fisher: ``"sampled"`` (targets drawn from the model, needs ``key``), ``"empirical"``
        (the true targets) or ``"exact"`` (``G`` from the exact output-space Fisher: one
        backward pass per output unit) (static).
      adapt_damping: the Levenberg-Marquardt rule on λ (adaptive mode) (static).
      damping_adaptation_interval: steps between λ updates (static).
      damping_adaptation_decay: λ is multiplied (ρ > 3/4) or divided (ρ < 1/4) by this.
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
      stats_dtype: dtype of factors, inverses and moments (static).
    """
    check_choice(fisher, "fisher", FISHER)
    invert_every = check_positive_int(invert_every, "invert_every")
    interval = check_positive_int(damping_adaptation_interval, "damping_adaptation_interval")
    check_hyperparameter(damping, "damping", low=0.0, low_inclusive=False)
    check_hyperparameter(stats_decay, "stats_decay", low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter(damping_adaptation_decay, "damping_adaptation_decay", low=0.0, high=1.0)
    if momentum is not None:
        check_hyperparameter(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)
    adaptive = learning_rate is None
    if norm_constraint is not None:
        if adaptive:
            raise ValueError(
                "kfac: norm_constraint needs a learning rate; the adaptive step "
                "(learning_rate=None) is already sized by the quadratic model."
            )
        check_hyperparameter(norm_constraint, "norm_constraint", low=0.0, low_inclusive=False)

    def init_fn(params):
        def factor_pair(p):
            shape = tuple(jnp.shape(p))
            sizes = factor_sizes(shape)
            if sizes is None:
                return None
            lead = () if factor_stack(shape) is None else (factor_stack(shape),)
            return tuple(jnp.zeros((*lead, d, d), stats_dtype) for d in sizes)

        factors = tuple(factor_pair(p) for p in jax.tree.leaves(params))
        eye = lambda x: jnp.broadcast_to(jnp.eye(x.shape[-1], dtype=stats_dtype), x.shape)
        inverses = tuple(None if f is None else tuple(eye(x) for x in f) for f in factors)
        scaling = tuple(
            None if f is None or not ekfac
            else jnp.zeros((*f[0].shape[:-2], f[0].shape[-1], f[1].shape[-1]), stats_dtype)
            for f in factors
        )  # fmt: skip
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
        layer_eqns = _layer_eqns(closed, disc)
        # Perturbations of the layer outputs, in the outputs' own dtypes.
        eps_avals = [e.outvars[0].aval for e in layer_eqns]
        zero_eps = lambda: [
            jnp.zeros((layer.calls, *a.shape), a.dtype)
            for layer, a in zip(disc.layers, eps_avals, strict=True)
        ]
        eps0 = zero_eps()
        # The backward pass differentiates the layer outputs (for G) and only the parameters in
        # no layer (their diagonal Fisher): the layers' own weight gradients are not needed.
        in_layer = disc.layer_leaves
        free = [i for i in range(len(leaves)) if i not in in_layer]

        def fwd(free_leaves, eps):
            lv = list(leaves)
            for i, x in zip(free, free_leaves, strict=True):
                lv[i] = x
            return _trace(closed, lv, eps, disc)

        outputs, vjp_fn, (inputs, targets, value) = jax.vjp(
            fwd, [leaves[i] for i in free], eps0, has_aux=True
        )
        n = outputs.shape[0]
        if fisher == "exact":
            sqrt_f = _output_fisher_sqrt(disc.loss, jax.lax.stop_gradient(outputs))
            per_col = jax.vmap(lambda u: vjp_fn(u), in_axes=-1)(sqrt_f)
            leaf_grads, out_grads = per_col  # leading axis: output units
        else:
            if fisher == "sampled":
                y = sample_targets(disc.loss, jax.lax.stop_gradient(outputs), use_key)
            else:
                y = targets
            r = output_residual(disc.loss, jax.lax.stop_gradient(outputs), y)
            leaf_grads, out_grads = jax.tree.map(lambda x: x[None], vjp_fn(r))

        new_factors = list(state.factors)
        units = disc.units
        index = {layer.path: i for i, layer in enumerate(disc.layers)}
        unit_rows: dict[int, list[list[tuple[jax.Array, jax.Array]]]] = {}  # leaf -> slices
        for leaf, uses in units.items():
            new_factors[leaf] = _unit_statistics(
                uses, index, inputs, out_grads, new_factors[leaf], n, decay, stats_dtype, unit_rows
            )
        diag_leaves = list(jax.tree.leaves(state.diag))  # layer leaves' entries stay zero
        for i, g in zip(free, leaf_grads, strict=True):
            sample = jnp.sum(jnp.square(g), axis=0) / n
            diag_leaves[i] = decay * diag_leaves[i] + (1 - decay) * sample.astype(stats_dtype)
        diag = treedef.unflatten(diag_leaves)
        finite = kr.all_finite((new_factors, diag, grads))
        keep = lambda new, old: jax.tree.map(lambda x, y: jnp.where(finite, x, y), new, old)
        factors = keep(tuple(new_factors), state.factors)
        diag = keep(diag, state.diag)

        # --- damped inverses, refreshed every `invert_every` steps ----------------------------
        lam = state.damping
        correction = 1.0 - decay ** (t + 1).astype(stats_dtype)

        heads = [uses[0] for uses in units.values()]
        corner = lambda layer: (layer.in_features + (layer.bias is not None), layer.out_features)

        def refresh(inverses, scaling, failed):
            # One matrix per factor (per slice of a stacked layer), batched by size in fx.
            mats, slots = [], []
            for layer in heads:
                sa = layer.a_slot
                for k in range(_slices(layer)):
                    fa = _slice(factors[layer.weight][sa], layer, k) / correction
                    fg = _slice(factors[layer.weight][1 - sa], layer, k) / correction
                    dim_a = layer.in_features + (layer.bias is not None)
                    if ekfac:  # eigenbases of the used corners
                        ka, kg = corner(layer)
                        mats += [fa[:ka, :ka], fg[:kg, :kg]]
                        slots += [(layer, k, sa), (layer, k, 1 - sa)]
                        continue
                    pi = jnp.sqrt(
                        (jnp.trace(fa) / dim_a)
                        / jnp.maximum(jnp.trace(fg) / layer.out_features, 1e-30)
                    )
                    pi = jnp.where(jnp.isfinite(pi) & (pi > 0), pi, 1.0)
                    for f, gamma, axis in ((fa, pi * jnp.sqrt(lam), sa),
                                           (fg, jnp.sqrt(lam) / pi, 1 - sa)):  # fmt: skip
                        mats.append(f + gamma * jnp.eye(f.shape[0], dtype=f.dtype))
                        slots.append((layer, k, axis))
            new: dict[tuple[int, int], list[Any]] = {}  # (leaf, axis) -> one entry per slice
            new_scaling: dict[int, list[Any]] = {}
            if not ekfac:
                for (layer, k, axis), (inv, ok) in zip(slots, fx.inverses(mats), strict=True):
                    old = _slice(inverses[layer.weight][axis], layer, k)
                    new.setdefault((layer.weight, axis), []).append(jnp.where(ok, inv, old))
                    failed = failed + (~ok).astype(jnp.int32)
            else:
                bases = fx.eigenbases(mats)
                for j in range(0, len(slots), 2):
                    (layer, k, sa), (qa, wa, oka), (qg, wg, okg) = slots[j], *bases[j : j + 2]
                    ok = oka & okg
                    leaf = layer.weight
                    for q, axis in ((qa, sa), (qg, 1 - sa)):
                        slot = _slice(inverses[leaf][axis], layer, k)
                        placed = jnp.zeros_like(slot).at[: q.shape[0], : q.shape[1]].set(q)
                        new.setdefault((leaf, axis), []).append(jnp.where(ok, placed, slot))
                    # K-FAC's eigenvalues in the new basis start the EMA of the scaling.
                    s0 = jnp.outer(jnp.maximum(wa, 0.0), jnp.maximum(wg, 0.0))
                    old = _slice(scaling[leaf], layer, k)
                    placed = jnp.zeros_like(old).at[: s0.shape[0], : s0.shape[1]].set(s0)
                    new_scaling.setdefault(leaf, []).append(jnp.where(ok, placed, old))
                    failed = failed + (~oka).astype(jnp.int32) + (~okg).astype(jnp.int32)
            out = [list(x) if x is not None else None for x in inverses]
            out_scaling = list(scaling)
            for layer in heads:
                for axis in (0, 1):
                    out[layer.weight][axis] = _unslice(new[(layer.weight, axis)], layer)
                if ekfac:
                    out_scaling[layer.weight] = _unslice(new_scaling[layer.weight], layer)
            return tuple(None if x is None else tuple(x) for x in out), tuple(out_scaling), failed

        inverses, scaling, failed = jax.lax.cond(
            (t % invert_every == 0) & finite,
            refresh,
            lambda inv, sc, f: (inv, sc, f),
            state.inverses,
            state.scaling,
            state.num_failed_inverses,
        )
        if ekfac:  # the per-step EMA of the squared per-example gradients in the eigenbasis
            n_examples = outputs.shape[0]
            new_scaling = list(scaling)
            for layer in heads:
                leaf, sa = layer.weight, layer.a_slot
                ka, kg = corner(layer)
                per_slice = []
                for k in range(_slices(layer)):
                    qa = _slice(inverses[leaf][sa], layer, k)[:ka, :ka]
                    qg = _slice(inverses[leaf][1 - sa], layer, k)[:kg, :kg]
                    per_slice.append(_ekfac_scaling(unit_rows[leaf][k], qa, qg, n_examples, layer))
                s_t = _unslice(per_slice, layer)
                old = scaling[leaf]
                pad = jnp.zeros_like(old).at[..., :ka, :kg].set(s_t)
                new_scaling[leaf] = jnp.where(finite, decay * old + (1 - decay) * pad, old)
            scaling = tuple(new_scaling)

        # --- the preconditioned gradient -----------------------------------------------------
        direction = list(grads)
        diag_hat = [d / correction for d in jax.tree.leaves(diag)]
        for i in free:
            direction[i] = grads[i] / (diag_hat[i] + lam)
        for layer in heads:
            sa = layer.a_slot

            def precondition(gw, gb, inv_a, inv_g, s_leaf, layer=layer):
                """One layer (one slice of a stacked one): its preconditioned gradient."""
                v = layer.to_matrix(gw)
                if gb is not None:
                    v = jnp.concatenate([v, gb.reshape(1, -1)], axis=0)
                m_a = inv_a[: v.shape[0], : v.shape[0]]
                m_g = inv_g[: v.shape[1], : v.shape[1]]
                if ekfac:  # m_a, m_g are the eigenbases
                    s_hat = s_leaf[: v.shape[0], : v.shape[1]]
                    rotated = kr.mm(kr.mm(m_a.T, v), m_g) / (s_hat + lam)
                    pre = kr.mm(kr.mm(m_a, rotated), m_g.T)
                else:
                    pre = kr.mm(kr.mm(m_a, v), m_g)
                d_w = layer.from_matrix(pre[: layer.in_features], gw.shape)
                d_b = None if gb is None else pre[-1].reshape(gb.shape)
                return d_w, d_b

            args = (
                grads[layer.weight],
                None if layer.bias is None else grads[layer.bias],
                inverses[layer.weight][sa],
                inverses[layer.weight][1 - sa],
                scaling[layer.weight] if ekfac else None,
            )
            fn = precondition if layer.stack is None else jax.vmap(precondition)
            d_w, d_b = fn(*args)
            direction[layer.weight] = d_w
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
        model = lambda lv: _trace(closed, lv, zero_eps(), disc)[0]
        cast = lambda vs: [v.astype(jnp.result_type(x)) for v, x in zip(vs, leaves, strict=True)]
        # Both Jacobian-vector products in one batched JVP: one primal pass, the two tangents
        # as one batch (the primal does not depend on the tangent, so it comes out unbatched).
        tangents = [jnp.stack([a, b]) for a, b in zip(cast(delta), cast(prev), strict=True)]
        out0, j_both = jax.vmap(lambda tv: jax.jvp(model, (leaves,), (tv,)), out_axes=(None, 0))(
            tangents
        )
        j_delta, j_prev = j_both[0], j_both[1]
        fq = lambda u, v: jnp.sum(u * output_fisher_vp(disc.loss, out0, v)) / n
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
            prev_update=treedef.unflatten([x.astype(stats_dtype) for x in step]),
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


def _slice(arr: jax.Array, layer: Layer, k: int) -> jax.Array:
    """Slice `k` of a stacked layer's per-slice array (the array itself if unstacked)."""
    return arr if layer.stack is None else arr[k]


def _unslice(parts: list[jax.Array], layer: Layer) -> jax.Array:
    """Inverse of :func:`_slice` over all slices."""
    return parts[0] if layer.stack is None else jnp.stack(parts)


def _unit_statistics(
    uses, index, inputs, out_grads, pair, n, decay, stats_dtype, unit_rows
) -> tuple[jax.Array, jax.Array]:
    """The factor EMAs of one weight leaf from all its uses: ``A`` from the inputs (with the
    bias's homogeneous coordinate) over the rows of every call, ``G`` from the output
    gradients. A stacked weight (a scan over layers) gets one pair per slice, from the calls
    that use that slice (``Layer.slice_of``), as if each slice were its own layer. Fills
    ``unit_rows[leaf][slice]`` with each call's rows (EKFAC)."""
    head = uses[0]
    slices = _slices(head)
    leaf = head.weight
    unit_rows[leaf] = [[] for _ in range(slices)]
    sum_a, sum_g, rows_a = [0.0] * slices, [0.0] * slices, [0] * slices
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
            a_k = a_k.reshape(-1, a_k.shape[-1])
            g_k = g_k.reshape(-1, g_k.shape[-1])
            sum_a[k], rows_a[k] = sum_a[k] + kr.mm(a_k.T, a_k), rows_a[k] + a_k.shape[0]
            sum_g[k] = sum_g[k] + kr.mm(g_k.T, g_k)
    sa = head.a_slot
    out = list(pair)
    stat_a = _unslice([sa_k / r for sa_k, r in zip(sum_a, rows_a, strict=True)], head)
    out[sa] = fx.ema_into(pair[sa], stat_a, decay)
    out[1 - sa] = fx.ema_into(pair[1 - sa], _unslice([sg / n for sg in sum_g], head), decay)
    return tuple(out)


def _ekfac_scaling(rows, qa, qg, n, layer) -> jax.Array:
    """``E_n[(Q_Aᵀ ∇_n Q_G)²]`` from a layer's rows: per-example gradients ``Σ_rows a gᵀ``
    over the example's rows (positions, time steps, tied uses), summed over output-Fisher
    columns."""
    if len(rows) == 1 and rows[0][0].shape[0] == n:  # one row per example: no outer products
        a, g = rows[0]
        a2 = jnp.square(kr.mm(a, qa))
        g2 = jnp.sum(jnp.square(jnp.einsum("cmo,op->cmp", g, qg, precision="highest")), axis=0)
        return kr.mm(a2.T, g2) / n
    total = 0.0
    for a, g in rows:
        if a.shape[0] % n:
            raise ValueError(
                f"ekfac: layer {layer.name} has {a.shape[0]} rows for {n} examples; per-example "
                "gradients need the example axis to lead the layer's row axes."
            )
        ta = kr.mm(a, qa).reshape(n, -1, qa.shape[1])
        tg = jnp.einsum("cmo,op->cmp", g, qg, precision="highest")
        tg = tg.reshape(g.shape[0], n, -1, qg.shape[1])
        total = total + jnp.einsum("nti,cnto->cnio", ta, tg, precision="highest")
    return jnp.mean(jnp.sum(jnp.square(total), axis=0), axis=0)


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
    invert_every: int = 5,
    fisher: str = "sampled",
    adapt_damping: bool = True,
    norm_constraint: float | None = None,
    ekfac: bool = False,
    weight_decay: float = 0.0,
    seed: int = 0,
    stats_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC (Martens & Grosse, 2015). ``kfac()``: learning rate, momentum and damping all
    adaptive (the recommended setting; see the module docstring for how that step differs
    from ``chain(..., scale_by_learning_rate)``). With a learning rate:
    ``chain(scale_by_kfac, [trace(momentum)], add_decayed_weights, scale_by_learning_rate)``.

    Needs the extra arguments ``value_fn`` (a loss that calls :func:`jaxopt2.tag_loss`) and
    ``key`` (target sampling; falls back to a key in the state).

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
    check_hyperparameter(weight_decay, "weight_decay", low=0.0)
    inner = scale_by_kfac(
        learning_rate=learning_rate,
        momentum=momentum if learning_rate is None else None,
        damping=damping,
        stats_decay=stats_decay,
        invert_every=invert_every,
        fisher=fisher,
        adapt_damping=adapt_damping,
        norm_constraint=norm_constraint,
        ekfac=ekfac,
        seed=seed,
        stats_dtype=stats_dtype,
    )
    if learning_rate is None:
        if weight_decay:
            raise ValueError(
                "kfac(learning_rate=None) takes its step from the quadratic model; put weight "
                "decay into the loss (an L2 term) or pass a learning rate."
            )
        return inner
    parts = [inner]
    if momentum is not None:
        parts.append(optax.trace(decay=momentum))
    parts += [optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(learning_rate)]
    return optax.chain(*parts)


registry.register(
    "kfac",
    kfac,
    needs_value_fn=True,
    needs_key=True,
    static_args=("invert_every", "fisher", "adapt_damping", "ekfac", "seed", "stats_dtype"),
)
