"""Sophia: clipped, diagonally preconditioned momentum with a lazily refreshed Hessian estimate.

Update rule (Liu et al., 2023, Algorithm 3), with ``g_t`` the gradient and ``ĥ`` a stochastic
estimate of the Hessian diagonal computed every ``update_interval`` steps (steps 0, k, 2k, ...):

.. math::

   m_t &= b_1 m_{t-1} + (1 - b_1) g_t \\\\
   h_t &= b_2 h_{t-1} + (1 - b_2) \\hat h_t \\quad\\text{(refresh steps; } h_t = h_{t-1}
          \\text{ otherwise)} \\\\
   u_t &= \\operatorname{clip}\\big(m_t / \\max(\\gamma h_t, \\epsilon), -1, 1\\big)

and the parameter step is ``-learning_rate * (u_t + weight_decay * θ)`` (decoupled weight
decay). Every coordinate moves by at most ``learning_rate`` (plus the weight decay): where the
curvature estimate is small, negative or stale the step falls back to a sign step, and where
it is large the step is the diagonal Newton step ``m / (γ h)`` scaled by ``learning_rate``.

Estimators ``ĥ`` (argument ``estimator``):

* ``"hutchinson"`` (Sophia-H): ``u ⊙ (H u)`` for ``num_probes`` probes ``u`` (Gaussian, as in
  the paper, or Rademacher: ``probe``), averaged; an unbiased estimate of ``diag(H)``. Works
  for any ``value_fn``.
* ``"gnb"`` (Gauss-Newton-Bartlett, Sophia-G): needs a loss marked with
  :func:`jaxopt2.tag_loss`. Targets ``ŷ`` are sampled from the model's predictive
  distribution at the tagged outputs, ``ĝ`` is the gradient of the tagged loss (a mean over
  its ``B`` rows: every axis of the outputs but the last, ``B·T`` tokens for ``[B, T, V]``
  logits) against ``ŷ``, and ``ĥ = B · ĝ ⊙ ĝ``. Its expectation is ``diag(G)``, the diagonal
  of the Gauss-Newton matrix of the tagged loss. With per-row weights ``w`` (a padding
  mask) the rows enter ``ĝ`` weighted by ``√(w_r / Σ w)`` and ``ĥ = ĝ ⊙ ĝ``, again unbiased
  for ``diag(G)`` of ``Σ w_r ℓ_r / Σ w`` (without weights this is the same formula, with
  ``w_r = 1``). Terms of
  ``value_fn`` outside the tagged loss (an explicit L2 penalty, say) enter the gradient but
  not this estimate.

Differences from the paper: by default ``h`` is bias-corrected like Adam's moments (divided
by ``1 - b_2^r`` after ``r`` refreshes). The paper and its code use the raw EMA, which starts
at ``h = (1 - b_2) ĥ``: with ``b_2 = 0.99`` and a refresh every 10 steps the denominator
stays far below the estimate for the first ~1000 steps, and those steps are mostly sign
steps; ``bias_correction=False`` gives the paper's rule. A non-finite estimate is discarded
(the last good ``h`` is kept) and counted in the state. ``γ`` multiplies the estimate; the
paper's code writes the GNB denominator as ``ρ · B · EMA(ĝ ⊙ ĝ)``, the same thing with
``γ = ρ``.

References:
  Liu, Li, Hall, Liang, Ma. "Sophia: A Scalable Stochastic Second-order Optimizer for
  Language Model Pre-training." ICLR 2024. https://arxiv.org/abs/2305.14342
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt2._tree import all_finite, check_choice
from jaxopt2.curvature.estimators import hutchinson_diagonal
from jaxopt2.curvature.products import hessian_operator, output_residual, sample_targets
from jaxopt2.curvature.tags import split_loss
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
from jaxopt2.optimizers._deprecation import keyword_only

__all__ = ["ESTIMATORS", "ScaleBySophiaState", "scale_by_sophia", "sophia", "sophia_estimate"]

ESTIMATORS = ("hutchinson", "gnb")
PROBES = ("gaussian", "rademacher")


class ScaleBySophiaState(NamedTuple):
    """State of :func:`scale_by_sophia` (arrays only).

    Attributes:
      count: number of updates taken (int32).
      mu: EMA of the gradient (``stats_dtype``).
      hessian: EMA ``h`` of the Hessian-diagonal estimates (``stats_dtype``).
      key: the fallback PRNG key, used when ``update`` gets no ``key``.
      num_nonfinite: steps whose gradient was non-finite (all statistics kept) and refreshes
        whose estimate was non-finite and was discarded. The bias correction counts the
        refreshes in the EMA as those due minus this count, so a skipped step between two
        refreshes makes it count one refresh too few (a slightly smaller step while
        ``1 - b2^n`` is far from 1).
    """

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax
    mu: optax.Updates
    hessian: optax.Updates
    key: jax.Array
    num_nonfinite: jax.Array


def sophia_estimate(
    value_fn: Any,
    params: optax.Params,
    key: jax.Array,
    *,
    estimator: str = "hutchinson",
    num_probes: int = 1,
    probe: str = "gaussian",
) -> optax.Params:
    """One Sophia estimate ``ĥ`` of the Hessian diagonal at `params` (see the module docstring).

    Returned in the dtypes of `params`. ``"gnb"`` raises a ValueError naming
    :func:`jaxopt2.tag_loss` when `value_fn` has no tagged loss.
    """
    check_choice(estimator, "estimator", ESTIMATORS)
    if estimator == "hutchinson":
        return hutchinson_diagonal(
            hessian_operator(value_fn, params), params, key, num_probes, dist=probe
        )
    try:
        split = split_loss(value_fn, params)
    except ValueError as err:
        raise ValueError(
            "sophia(estimator='gnb') samples labels from the model's outputs, so it needs the "
            "loss tagged with jaxopt2.tag_loss(loss_name, outputs, targets); use "
            f"estimator='hutchinson' for an untagged loss. ({err})"
        ) from None
    outputs = jax.lax.stop_gradient(split.outputs)
    # ĝ = Σ_r √c_r J_rᵀ ∇ℓ_r(ŷ_r): E[ĝ ĝᵀ] = Σ_r c_r J_rᵀ F_r J_r, the GGN of the tagged loss
    root = jnp.sqrt(split.row_weights())
    _, vjp = jax.vjp(split.model_fn, params)

    def one(k: jax.Array) -> optax.Params:
        sampled = sample_targets(split.loss, outputs, k)
        (g,) = vjp((root * output_residual(split.loss, outputs, sampled)).astype(outputs.dtype))
        return jax.tree.map(lambda x: x * x, g)

    if num_probes == 1:
        return one(key)
    samples = jax.vmap(one)(jax.random.split(key, num_probes))
    return jax.tree.map(lambda x, p: jnp.mean(x, 0).astype(p.dtype), samples, params)


# The positional order of the arguments before they became keyword-only (and optax's names).
_LEGACY_SCALE_ORDER = (
    "b1",
    "b2",
    "gamma",
    "eps",
    "clip_threshold",
    "bias_correction",
    "estimator",
    "update_every",
    "num_probes",
    "probe",
    "seed",
    "stats_dtype",
)
_RENAMED = {"update_every": "update_interval"}


@keyword_only(legacy_order=_LEGACY_SCALE_ORDER, renamed=_RENAMED)
def scale_by_sophia(
    *,
    b1: float = 0.965,
    b2: float = 0.99,
    eps: float = 1e-8,
    gamma: float = 0.01,
    clip_threshold: float | None = 1.0,
    update_interval: int | None = None,
    bias_correction: bool = True,
    estimator: str = "hutchinson",
    num_probes: int | None = None,
    probe: str = "gaussian",
    seed: int = 0,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Sophia's clipped preconditioning ``clip(m / max(γ h, ε), ±clip_threshold)``.

    Args:
      b1: EMA decay of the gradient (the momentum ``m``).
      b2: EMA decay of the Hessian-diagonal estimate, applied at refresh steps only.
      eps: the floor of the denominator (keeps negative or zero estimates from dividing).
      gamma: the scale ``γ`` of the estimate in the denominator; the unclipped step is the
        diagonal Newton step ``m / h`` times ``learning_rate / γ``.
      clip_threshold: the per-coordinate bound of the preconditioned step (1 in the paper);
        None: no clipping (as in ``optax.contrib.sophia``).
      update_interval: refresh the estimate every this many steps (the paper's ``k``;
        static; None: 10). Formerly ``update_every``, which still works for one release with
        a DeprecationWarning.
      bias_correction: divide ``h`` by ``1 - b2^r`` after ``r`` refreshes, as Adam does
        (static). False is the paper's rule, where ``h`` starts at ``(1 - b2) ĥ`` and the
        first few hundred steps are mostly sign steps.
      estimator: ``"hutchinson"`` (any loss) or ``"gnb"`` (Gauss-Newton-Bartlett: a loss
        tagged with :func:`jaxopt2.tag_loss`); static.
      num_probes: probes (Hutchinson) or label samples (GNB) per estimate (static; None: 1).
      probe: Hutchinson probe distribution, ``"gaussian"`` (the paper's) or ``"rademacher"``
        (lower variance); static.
      seed: seed of the fallback key carried in the state.
      stats_dtype: dtype of ``m`` and ``h`` (float32 by default, whatever the parameters').

    Structural arguments default to None rather than their value so that
    ``optax.inject_hyperparams(sophia)`` leaves them alone (see :func:`jaxopt2.inject_hyperparams`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and the
      extra argument ``value_fn`` (and uses ``key`` when given).
    """
    check_number(b1, "b1", low=0.0, high=1.0, high_inclusive=False)
    check_number(b2, "b2", low=0.0, high=1.0, high_inclusive=False)
    check_number(gamma, "gamma", low=0.0, low_inclusive=False)
    check_number(eps, "eps", low=0.0, low_inclusive=False)
    check_number(clip_threshold, "clip_threshold", low=0.0, low_inclusive=False, optional=True)
    check_choice(estimator, "estimator", ESTIMATORS)
    check_choice(probe, "probe", PROBES)
    update_interval = static_int(update_interval, "update_interval", 10, who="sophia")
    num_probes = static_int(num_probes, "num_probes", 1, who="sophia")
    check_seed(seed)
    stats_dtype = static_dtype(stats_dtype, who="sophia")

    def init_fn(params: optax.Params) -> ScaleBySophiaState:
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), stats_dtype), params)
        return ScaleBySophiaState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros,
            hessian=zeros,
            key=jax.random.PRNGKey(seed),
            num_nonfinite=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, key=None, **extra):
        del extra
        value_fn = require_value_fn(value_fn, "scale_by_sophia")
        if params is None:
            raise ValueError("scale_by_sophia needs params: call update(grads, state, params).")
        use_key, next_key = resolve_key(key, state.key)

        def refresh(_):
            est = sophia_estimate(
                value_fn,
                params,
                use_key,
                estimator=estimator,
                num_probes=num_probes,
                probe=probe,
            )
            est = jax.tree.map(lambda x: x.astype(stats_dtype), est)
            ok = all_finite(est)
            # A non-finite estimate is discarded: the last good EMA is kept and counted.
            h = jax.tree.map(
                lambda e, h: jnp.where(ok, b2 * h + (1 - b2) * e, h).astype(stats_dtype),
                est,
                state.hessian,
            )
            return h, state.num_nonfinite + (1 - ok.astype(jnp.int32))

        if update_interval == 1:
            hessian, num_nonfinite = refresh(None)
        else:
            hessian, num_nonfinite = jax.lax.cond(
                state.count % update_interval == 0,
                refresh,
                lambda _: (state.hessian, state.num_nonfinite),
                None,
            )
        if bias_correction:
            # Refreshes that entered the EMA so far (skipped non-finite ones excluded).
            num = state.count // update_interval + 1 - num_nonfinite
            scale = 1 - jnp.asarray(b2, stats_dtype) ** jnp.maximum(num, 1).astype(stats_dtype)
            hessian_used = jax.tree.map(lambda h: (h / scale).astype(stats_dtype), hessian)
        else:
            hessian_used = hessian
        mu = optax.tree.update_moment(
            jax.tree.map(lambda g: g.astype(stats_dtype), updates), state.mu, b1, 1
        )
        mu = jax.tree.map(lambda m: m.astype(stats_dtype), mu)

        def precondition(m, h, g):
            ratio = m / jnp.maximum(gamma * h, eps)
            if clip_threshold is not None:
                ratio = jnp.clip(ratio, -clip_threshold, clip_threshold)
            return ratio.astype(g.dtype)

        new_updates = jax.tree.map(precondition, mu, hessian_used, updates)
        count = optax.safe_increment(state.count)
        # A non-finite gradient skips the step: every statistic is kept (a refresh on the same
        # batch is discarded with it), the step counted once.
        grad_ok = all_finite(updates)
        mu, hessian = jax.tree.map(
            lambda new, old: jnp.where(grad_ok, new, old), (mu, hessian), (state.mu, state.hessian)
        )
        num_nonfinite = jnp.where(grad_ok, num_nonfinite, state.num_nonfinite + 1)
        return new_updates, ScaleBySophiaState(count, mu, hessian, next_key, num_nonfinite)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# sophia's own old positional order: scale_by_sophia's with weight_decay after eps
_LEGACY_ORDER = (*_LEGACY_SCALE_ORDER[:4], "weight_decay", *_LEGACY_SCALE_ORDER[4:])


@keyword_only(legacy_order=_LEGACY_ORDER, renamed=_RENAMED)
def sophia(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    b1: float = 0.965,
    b2: float = 0.99,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    weight_decay_mask: Any = None,
    gamma: float = 0.01,
    clip_threshold: float | None = 1.0,
    update_interval: int | None = None,
    bias_correction: bool = True,
    estimator: str = "hutchinson",
    num_probes: int | None = None,
    probe: str = "gaussian",
    seed: int = 0,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Sophia (Liu et al., 2023): momentum preconditioned by a clipped diagonal Hessian.

    ``sophia = chain(scale_by_sophia, add_decayed_weights(weight_decay, weight_decay_mask),
    scale_by_learning_rate(learning_rate))``; see :func:`scale_by_sophia` for the other
    arguments and the module docstring for the rule and the two estimators. Each
    coordinate moves by at most ``learning_rate * clip_threshold`` (plus the weight decay).

    The default estimator is Hutchinson's, which works on any loss; the paper's recommended
    Gauss-Newton-Bartlett estimator (``estimator="gnb"``) needs the loss tagged with
    :func:`jaxopt2.tag_loss`.

    The arguments ``optax.contrib.sophia`` also has take its names, order and defaults:
    ``b1``, ``b2``, ``eps`` (1e-8), ``weight_decay`` (1e-4), ``weight_decay_mask``,
    ``gamma``, ``clip_threshold`` (None: no clipping) and ``update_interval`` (10). Where
    jaxopt2 deliberately differs:

    * ``learning_rate`` defaults to 1e-3 (optax has no default), so ``sophia()`` keeps
      working.
    * ``update_interval`` defaults to None, meaning 10: a structural argument must not be a
      Python number in the signature, or ``optax.inject_hyperparams(jaxopt2.sophia)`` would
      turn it into an array (see :func:`jaxopt2.inject_hyperparams`).
    * ``estimator`` (``"hutchinson"`` or ``"gnb"``), ``num_probes``, ``probe`` and ``seed``
      instead of optax's ``hessian_diagonal_fn``: the estimate needs the loss (``value_fn``)
      and a key, which jaxopt2 passes through ``update``'s extra arguments, and GNB
      samples labels through the tagged loss, which a separate transformation cannot see.
    * ``bias_correction=True`` divides ``h`` by ``1 - b2^r`` after ``r`` refreshes (optax and
      the paper use the raw EMA; pass False for their rule), and the momentum ``m`` is not
      bias-corrected (as in the paper; optax divides it by ``1 - b1^t``).
    * ``stats_dtype`` sets the dtype of both ``m`` and ``h`` (optax's ``mu_dtype`` sets ``m``
      only); no ``verbose`` / ``print_win_rate_every_n_steps`` (printing from a jitted step
      is left to the caller).

    Deprecated for one release, with a DeprecationWarning: ``update_every`` (now
    ``update_interval``) and positional arguments after ``learning_rate`` (mapped in their
    old order: ``b1, b2, gamma, eps, weight_decay, clip_threshold, ...``). The defaults of
    ``eps`` (was 1e-12) and ``weight_decay`` (was 0) changed to optax's; pass the old values
    for the old results.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> loss_fn = lambda w, a: 0.5 * jnp.sum(a * w ** 2)
      >>> a = jnp.array([1.0, 10.0, 100.0])
      >>> # clipped steps of at most lr per coordinate: a decaying lr lets it settle
      >>> opt = jaxopt2.sophia(optax.cosine_decay_schedule(0.05, 300), update_interval=1)
      >>> w = jnp.ones(3); state = opt.init(w)
      >>> step = jax.jit(lambda w, s, k: jaxopt2.value_and_update(opt, loss_fn, w, s, a, key=k))
      >>> for i in range(300):
      ...     loss, updates, state = step(w, state, jax.random.PRNGKey(i))
      ...     w = optax.apply_updates(w, updates)
      >>> bool(loss_fn(w, a) < 1e-2)  # from 55.5
      True
    """
    check_learning_rate(learning_rate, "sophia")
    check_number(weight_decay, "weight_decay", low=0.0, schedule=True)
    return optax.chain(
        scale_by_sophia(
            b1=b1,
            b2=b2,
            eps=eps,
            gamma=gamma,
            clip_threshold=clip_threshold,
            update_interval=update_interval,
            bias_correction=bias_correction,
            estimator=estimator,
            num_probes=num_probes,
            probe=probe,
            seed=seed,
            stats_dtype=stats_dtype,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


registry.register(
    "sophia",
    sophia,
    needs_value_fn=True,
    needs_key=True,
    static_args=(
        "bias_correction",
        "estimator",
        "update_interval",
        "weight_decay_mask",
        "num_probes",
        "probe",
        "seed",
        "stats_dtype",
    ),
)
