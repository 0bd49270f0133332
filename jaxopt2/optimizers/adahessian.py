"""AdaHessian: Adam with the squared Hutchinson estimate of the Hessian diagonal.

Update rule (Yao et al., 2021), with ``g_t`` the gradient and ``D_t`` the Hutchinson
estimate of ``diag(H)`` from Rademacher probes ``z``:

.. math::

   D_t &= |\\tfrac{1}{S}\\textstyle\\sum_s z_s \\odot H z_s|
          \\quad\\text{(spatially averaged over conv-kernel windows)} \\\\
   m_t &= b_1 m_{t-1} + (1 - b_1) g_t, \\qquad
   v_t = b_2 v_{t-1} + (1 - b_2) D_t \\odot D_t \\\\
   u_t &= \\frac{m_t / (1 - b_1^t)}{\\big(\\sqrt{v_t / (1 - b_2^t)}\\big)^{k} + \\epsilon}

and the parameter step is ``-learning_rate * (u_t + weight_decay * θ)`` (decoupled weight
decay, as in the authors' implementation).

In the first steps ``v̂`` rests on one or a few Hutchinson samples, so a coordinate whose
estimate happens to be near zero can take a large step (the ``eps`` floor bounds it); a
learning-rate warmup, as the paper uses, or ``num_probes > 1`` smooths this out.

The estimate is :func:`jaxopt2.curvature.estimators.hutchinson_diagonal` (Rademacher probes,
batched as that estimator batches them) of the Hessian of the extra argument ``value_fn``
(``params -> loss`` on the current batch); the probes come from the extra argument ``key``,
falling back to a key carried in the state. :func:`jaxopt2.value_and_update` passes both.

References:
  Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney. "ADAHESSIAN: An Adaptive Second Order
  Optimizer for Machine Learning." AAAI 2021. https://arxiv.org/abs/2006.00719
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt2._tree import all_finite, check_choice
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

__all__ = ["ScaleByAdaHessianState", "adahessian", "scale_by_adahessian"]

SPATIAL_LAYOUTS: tuple[Any, ...] = ("channels_first", "channels_last", None)


class ScaleByAdaHessianState(NamedTuple):
    """State of :func:`scale_by_adahessian` (arrays only).

    Attributes:
      count: number of updates taken (int32).
      mu: first moment of the gradient (``stats_dtype``).
      nu: second moment of the Hessian-diagonal estimate (``stats_dtype``).
      hessian_diag: the latest accepted estimate ``D`` (reused between refreshes).
      key: the fallback PRNG key, used when ``update`` gets no ``key``.
      num_nonfinite: steps whose gradient was non-finite (all statistics kept) and refreshes
        whose estimate was non-finite and was discarded.
    """

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax
    mu: optax.Updates
    nu: optax.Updates
    hessian_diag: optax.Updates
    key: jax.Array
    num_nonfinite: jax.Array


def _spatial_average(d: jax.Array, layout: str | None) -> jax.Array:
    """Average a conv kernel's |D| over its spatial window (the paper's spatial averaging).

    Leaves with fewer than 3 dimensions (biases, dense weights) are returned as they are.
    ``channels_first`` is equinox/PyTorch's ``(out, in, *window)``; ``channels_last`` is
    flax's ``(*window, in, out)``.
    """
    if layout is None or d.ndim < 3:
        return d
    window = d.ndim - 2
    axes = tuple(range(2, d.ndim)) if layout == "channels_first" else tuple(range(window))
    return jnp.broadcast_to(jnp.mean(d, axis=axes, keepdims=True), d.shape)


def scale_by_adahessian(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    hessian_power: float = 1.0,
    num_probes: int | None = None,
    update_every: int | None = None,
    spatial_averaging: str | None = "channels_first",
    seed: int = 0,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Rescale updates by AdaHessian's bias-corrected Hessian-diagonal moments.

    Args:
      b1: decay of the gradient's first moment.
      b2: decay of the second moment of the Hessian-diagonal estimate.
      eps: added to the denominator ``(√v̂)^k`` after the power is taken.
      hessian_power: the exponent ``k`` in (0, 1]; 1 is the paper's default, 0.5 is closer to
        Adam's scaling.
      num_probes: Rademacher probes averaged per Hessian-diagonal estimate (static; None:
        1).
      update_every: refresh the estimate every this many steps and reuse it in between
        (the paper's delayed Hessian update; static; None: 1).
      spatial_averaging: kernel layout for averaging over conv windows (leaves with ndim >= 3):
        ``"channels_first"`` (equinox, PyTorch), ``"channels_last"`` (flax) or None.
      seed: seed of the fallback key carried in the state.
      stats_dtype: dtype of the moments and the estimate (float32 by default, whatever the
        parameter dtype).

    Structural arguments default to None rather than their value so that
    ``optax.inject_hyperparams(adahessian)`` leaves them alone (see
    :func:`jaxopt2.inject_hyperparams`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and the
      extra argument ``value_fn`` (and uses ``key`` when given).
    """
    check_number(b1, "b1", low=0.0, high=1.0, high_inclusive=False)
    check_number(b2, "b2", low=0.0, high=1.0, high_inclusive=False)
    check_number(eps, "eps", low=0.0)
    check_number(hessian_power, "hessian_power", low=0.0, high=1.0, low_inclusive=False)
    num_probes = static_int(num_probes, "num_probes", 1, who="adahessian")
    update_every = static_int(update_every, "update_every", 1, who="adahessian")
    check_seed(seed)
    stats_dtype = static_dtype(stats_dtype, who="adahessian")
    check_choice(spatial_averaging, "spatial_averaging", SPATIAL_LAYOUTS)

    def init_fn(params: optax.Params) -> ScaleByAdaHessianState:
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), stats_dtype), params)
        return ScaleByAdaHessianState(
            count=jnp.zeros([], jnp.int32),
            mu=zeros,
            nu=zeros,
            hessian_diag=zeros,
            key=jax.random.PRNGKey(seed),
            num_nonfinite=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, key=None, **extra):
        del extra
        value_fn = require_value_fn(value_fn, "scale_by_adahessian")
        if params is None:
            raise ValueError("scale_by_adahessian needs params: call update(grads, state, params).")
        use_key, next_key = resolve_key(key, state.key)

        def estimate(_):
            # jaxopt2.curvature's Hutchinson estimator (Rademacher probes, batched as it
            # batches them), in stats_dtype; the Hessian sees the probes in the params' dtypes.
            hessian = hessian_operator(value_fn, params)
            like = jax.tree.map(lambda p: jnp.asarray(p, stats_dtype), params)
            matvec = lambda v: hessian(jax.tree.map(lambda x, p: x.astype(p.dtype), v, params))
            d = hutchinson_diagonal(matvec, like, use_key, num_probes)
            d = jax.tree.map(lambda x: _spatial_average(jnp.abs(x), spatial_averaging), d)
            finite = all_finite(d)
            # A non-finite estimate is discarded: the last good one is kept and counted.
            d = jax.tree.map(lambda new, old: jnp.where(finite, new, old), d, state.hessian_diag)
            return d, state.num_nonfinite + (1 - finite.astype(jnp.int32))

        refresh = state.count % update_every == 0
        if update_every == 1:
            hessian_diag, num_nonfinite = estimate(None)
        else:
            hessian_diag, num_nonfinite = jax.lax.cond(
                refresh, estimate, lambda _: (state.hessian_diag, state.num_nonfinite), None
            )

        count = optax.safe_increment(state.count)
        mu = optax.tree.update_moment(
            jax.tree.map(lambda g: g.astype(stats_dtype), updates), state.mu, b1, 1
        )
        nu = optax.tree.update_moment_per_elem_norm(hessian_diag, state.nu, b2, 2)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        new_updates = jax.tree.map(
            lambda m, v, g: (m / (jnp.sqrt(v) ** hessian_power + eps)).astype(g.dtype),
            mu_hat,
            nu_hat,
            updates,
        )
        # A non-finite gradient skips the step: every statistic is kept, the step counted once.
        grad_ok = all_finite(updates)
        mu, nu, hessian_diag = jax.tree.map(
            lambda new, old: jnp.where(grad_ok, new, old),
            (mu, nu, hessian_diag),
            (state.mu, state.nu, state.hessian_diag),
        )
        num_nonfinite = jnp.where(grad_ok, num_nonfinite, state.num_nonfinite + 1)
        new_state = ScaleByAdaHessianState(count, mu, nu, hessian_diag, next_key, num_nonfinite)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@keyword_only(added=("mask",))
def adahessian(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    weight_decay: float = 0.0,
    mask: Any = None,
    hessian_power: float = 1.0,
    num_probes: int | None = None,
    update_every: int | None = None,
    spatial_averaging: str | None = "channels_first",
    seed: int = 0,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """AdaHessian (Yao et al., 2021): Adam whose second moment tracks ``diag(H)²``.

    ``adahessian = chain(scale_by_adahessian, add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``; see :func:`scale_by_adahessian` for the other
    arguments and the module docstring for the update rule.

    Args:
      learning_rate: a number or an optax schedule.
      weight_decay: decoupled weight decay, added to the preconditioned update before the
        learning rate scales it.
      mask: which leaves get the weight decay, as in ``optax.adamw``: a pytree of bools
        with the structure of (a prefix of) the parameters, or a function ``params ->``
        such a tree; None: every leaf (static).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> loss_fn = lambda w, a: 0.5 * jnp.sum(a * w ** 2)
      >>> a = jnp.array([1.0, 10.0, 100.0])
      >>> opt = jaxopt2.adahessian(learning_rate=0.1)
      >>> w = jnp.ones(3); state = opt.init(w)
      >>> step = jax.jit(lambda w, s, k: jaxopt2.value_and_update(opt, loss_fn, w, s, a, key=k))
      >>> for i in range(100):
      ...     loss, updates, state = step(w, state, jax.random.PRNGKey(i))
      ...     w = optax.apply_updates(w, updates)
      >>> bool(loss < 1e-3)
      True
    """
    check_learning_rate(learning_rate, "adahessian")
    check_number(weight_decay, "weight_decay", low=0.0, schedule=True)
    return optax.chain(
        scale_by_adahessian(
            b1=b1,
            b2=b2,
            eps=eps,
            hessian_power=hessian_power,
            num_probes=num_probes,
            update_every=update_every,
            spatial_averaging=spatial_averaging,
            seed=seed,
            stats_dtype=stats_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


registry.register(
    "adahessian",
    adahessian,
    needs_value_fn=True,
    needs_key=True,
    static_args=("mask", "num_probes", "update_every", "spatial_averaging", "seed", "stats_dtype"),
)
