"""OASIS: a truncated, exponentially averaged Hutchinson diagonal as the preconditioner.

Update rule (Jahani et al., 2022, Algorithm 1 with a fixed learning rate), with ``g_t`` the
gradient and ``z`` Rademacher probes:

.. math::

   D_t &= b_2 D_{t-1} + (1 - b_2)\\, \\tfrac{1}{S}\\textstyle\\sum_s z_s \\odot H z_s
          \\qquad (D_0 = \\text{the first estimate}) \\\\
   \\hat D_t &= \\max(|D_t|, \\alpha) \\quad\\text{(elementwise truncation)} \\\\
   m_t &= b_1 m_{t-1} + (1 - b_1) g_t \\qquad (m_t = g_t \\text{ when } b_1 = 0) \\\\
   u_t &= m_t / \\hat D_t

and the parameter step is ``-learning_rate * (u_t + weight_decay * θ)``. The truncation
``α`` bounds the step of a coordinate whose curvature estimate is near zero (or negative:
its absolute value is used) by ``learning_rate · |m| / α``.

What is implemented and how it differs from the paper: the paper warm-starts ``D_0`` with
Hutchinson samples at the initial point; here ``D_0`` is the first step's estimate from
``init_probes`` probes (on the first batch), after which the EMA runs as in the paper.
The estimate may be refreshed every ``update_every`` steps (reused in between). The paper's adaptive
learning-rate variant (a local Lipschitz estimate in the ``D̂`` norm) is not implemented;
give a schedule instead. The optional momentum ``b1`` (off by default) is the heavy-ball
averaging of the paper's momentum variant. A non-finite estimate is discarded (the last good
``D`` kept) and counted.

References:
  Jahani, Rusakov, Shi, Richtárik, Mahoney, Takáč. "Doubly Adaptive Scaled Algorithm for
  Machine Learning Using Second-Order Information." ICLR 2022.
  https://arxiv.org/abs/2109.05198
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt2._tree import all_finite
from jaxopt2.curvature.estimators import hutchinson_diagonal
from jaxopt2.curvature.products import hessian_operator
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

__all__ = ["ScaleByOasisState", "oasis", "scale_by_oasis"]


class ScaleByOasisState(NamedTuple):
    """State of :func:`scale_by_oasis` (arrays only).

    Attributes:
      count: number of updates taken (int32).
      mu: EMA of the gradient (zero-debiased; unused when ``b1 == 0``), ``stats_dtype``.
      hessian_diag: the EMA ``D`` of the Hutchinson estimates (before truncation).
      key: the fallback PRNG key, used when ``update`` gets no ``key``.
      num_nonfinite: steps whose gradient was non-finite (all statistics kept) and refreshes
        whose estimate was non-finite and was discarded.
    """

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax
    mu: optax.Updates
    hessian_diag: optax.Updates
    key: jax.Array
    num_nonfinite: jax.Array


def scale_by_oasis(
    b1: float = 0.0,
    b2: float = 0.99,
    alpha: float = 1e-3,
    num_probes: int | None = None,
    init_probes: int | None = None,
    update_every: int | None = None,
    seed: int = 0,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Divide the (averaged) gradient by OASIS's truncated Hessian-diagonal EMA.

    Args:
      b1: momentum on the gradient (0: plain gradient, as in the paper's main algorithm);
        the average is bias-corrected like Adam's first moment.
      b2: EMA decay of the Hessian-diagonal estimate (the paper's ``β``).
      alpha: the truncation floor ``α > 0`` of ``|D|``.
      num_probes: Rademacher probes per estimate (static; None: 1).
      init_probes: Rademacher probes of the first estimate ``D_0`` (static; None: 20): the paper's
        warm start, which keeps a noisy single-probe ``D_0`` from dividing by near-zero
        entries while the EMA has only one sample.
      update_every: refresh the estimate every this many steps (static; None: 1).
      seed: seed of the fallback key carried in the state.
      stats_dtype: dtype of the statistics (float32 by default, whatever the parameters').

    Structural arguments default to None rather than their value so that
    ``optax.inject_hyperparams(oasis)`` leaves them alone (see :func:`jaxopt2.inject_hyperparams`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and the
      extra argument ``value_fn`` (and uses ``key`` when given).
    """
    check_number(b1, "b1", low=0.0, high=1.0, high_inclusive=False)
    check_number(b2, "b2", low=0.0, high=1.0, high_inclusive=False)
    check_number(alpha, "alpha", low=0.0, low_inclusive=False)
    num_probes = static_int(num_probes, "num_probes", 1, who="oasis")
    init_probes = static_int(init_probes, "init_probes", 20, who="oasis")
    update_every = static_int(update_every, "update_every", 1, who="oasis")
    check_seed(seed)
    stats_dtype = static_dtype(stats_dtype, who="oasis")

    def init_fn(params: optax.Params) -> ScaleByOasisState:
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), stats_dtype), params)
        return ScaleByOasisState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros,
            hessian_diag=zeros,
            key=jax.random.PRNGKey(seed),
            num_nonfinite=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, key=None, **extra):
        del extra
        value_fn = require_value_fn(value_fn, "scale_by_oasis")
        if params is None:
            raise ValueError("scale_by_oasis needs params: call update(grads, state, params).")
        use_key, next_key = resolve_key(key, state.key)

        def refresh(_):
            operator = hessian_operator(value_fn, params)
            first = state.count == 0

            def estimate(probes: int):
                return lambda _: hutchinson_diagonal(operator, params, use_key, probes)

            if init_probes == num_probes:
                est = estimate(num_probes)(None)
            else:
                est = jax.lax.cond(first, estimate(init_probes), estimate(num_probes), None)
            est = jax.tree.map(lambda x: x.astype(stats_dtype), est)
            ok = all_finite(est)
            d = jax.tree.map(
                lambda e, d: jnp.where(ok, jnp.where(first, e, b2 * d + (1 - b2) * e), d).astype(
                    stats_dtype
                ),
                est,
                state.hessian_diag,
            )
            return d, state.num_nonfinite + (1 - ok.astype(jnp.int32))

        if update_every == 1:
            hessian_diag, num_nonfinite = refresh(None)
        else:
            hessian_diag, num_nonfinite = jax.lax.cond(
                state.count % update_every == 0,
                refresh,
                lambda _: (state.hessian_diag, state.num_nonfinite),
                None,
            )
        count = optax.safe_increment(state.count)
        g32 = jax.tree.map(lambda g: g.astype(stats_dtype), updates)
        mu = jax.tree.map(lambda g, m: (b1 * m + (1 - b1) * g).astype(stats_dtype), g32, state.mu)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        new_updates = jax.tree.map(
            lambda m, d, g: (m / jnp.maximum(jnp.abs(d), alpha)).astype(g.dtype),
            mu_hat,
            hessian_diag,
            updates,
        )
        # A non-finite gradient skips the step: every statistic is kept, the step counted once.
        grad_ok = all_finite(updates)
        mu, hessian_diag = jax.tree.map(
            lambda new, old: jnp.where(grad_ok, new, old),
            (mu, hessian_diag),
            (state.mu, state.hessian_diag),
        )
        num_nonfinite = jnp.where(grad_ok, num_nonfinite, state.num_nonfinite + 1)
        return new_updates, ScaleByOasisState(count, mu, hessian_diag, next_key, num_nonfinite)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@keyword_only(added=("mask",))
def oasis(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    *,
    b1: float = 0.0,
    b2: float = 0.99,
    alpha: float = 1e-3,
    weight_decay: float = 0.0,
    mask: Any = None,
    num_probes: int | None = None,
    init_probes: int | None = None,
    update_every: int | None = None,
    seed: int = 0,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """OASIS (Jahani et al., 2022): gradient steps scaled by a truncated diagonal Hessian EMA.

    ``oasis = chain(scale_by_oasis, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``, the weight decay on the leaves `mask` selects
    (as in ``optax.adamw``: a pytree of bools like the parameters or a function of them;
    None: every leaf); see :func:`scale_by_oasis` for the other arguments and the module
    docstring for the rule. With ``learning_rate`` 1 and an exact diagonal the step is a
    diagonal Newton step.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> loss_fn = lambda w, a: 0.5 * jnp.sum(a * w ** 2)
      >>> a = jnp.array([1.0, 10.0, 100.0])
      >>> opt = jaxopt2.oasis(learning_rate=0.5)
      >>> w = jnp.ones(3); state = opt.init(w)
      >>> step = jax.jit(lambda w, s, k: jaxopt2.value_and_update(opt, loss_fn, w, s, a, key=k))
      >>> for i in range(40):
      ...     loss, updates, state = step(w, state, jax.random.PRNGKey(i))
      ...     w = optax.apply_updates(w, updates)
      >>> bool(loss < 1e-6)
      True
    """
    check_learning_rate(learning_rate, "oasis")
    check_number(weight_decay, "weight_decay", low=0.0, schedule=True)
    return optax.chain(
        scale_by_oasis(
            b1=b1,
            b2=b2,
            alpha=alpha,
            num_probes=num_probes,
            init_probes=init_probes,
            update_every=update_every,
            seed=seed,
            stats_dtype=stats_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


registry.register(
    "oasis",
    oasis,
    needs_value_fn=True,
    needs_key=True,
    static_args=("mask", "num_probes", "init_probes", "update_every", "seed", "stats_dtype"),
)
