"""FOSI: a Newton step on the Hessian's extreme eigenspace, a first-order optimizer on the rest.

Every ``approx_every`` steps (steps 0, k, 2k, ...) Lanczos on the Hessian of ``value_fn``
gives the ``k`` largest eigenpairs (and, with ``num_smallest = ℓ > 0``, the ``ℓ`` smallest,
i.e. the most negative ones), ``V`` (``(k + ℓ) × n``, orthonormal rows) and ``Λ``. Each update
splits the gradient ``g`` into ``g₁ = VᵀV g`` and ``g₂ = g - g₁`` and returns

.. math::

   u = -\\alpha\\, Vᵀ |Λ|^{-1} V g \\;+\\; (I - VᵀV)\\, \\mathrm{base}(g_2)

where ``base`` is any optax transformation (default ``optax.adam(learning_rate)``) whose
updates are already signed steps, and ``|Λ|`` is floored at ``eps``. On a quadratic with
``k = n`` and ``α = 1`` this is exactly one Newton step; with ``k < n`` the subspace of the
largest curvatures gets a Newton step and the base optimizer sees a problem whose condition
number is ``λ_{k+1} / λ_min`` instead of ``λ_1 / λ_min``.

What is implemented and how it differs from the paper: the eigenpairs come from one Lanczos
run with full reorthogonalization (:func:`jaxopt2.curvature.lanczos`) on the Hessian of the
current batch, computed in ``stats_dtype`` and reused until the next refresh (the paper also
reuses a stale ``V``); the first refresh is at step 0 (no warm-up phase of base-only steps);
the Newton part uses the current gradient (no momentum on it) and a fixed ``α``. The base
optimizer's state lives inside FOSI's state and only ever sees ``g₂``. A non-finite
eigendecomposition is discarded (the last good ``V``, ``Λ`` kept) and counted.

References:
  H. Sivan, M. Gabel, A. Schuster. "FOSI: Hybrid First and Second Order Optimization."
  ICLR 2024. https://arxiv.org/abs/2302.08484
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxopt2.curvature.estimators import lanczos
from jaxopt2.curvature.products import hessian_operator
from jaxopt2.linalg.tridiagonal import eigh_tridiagonal
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

__all__ = ["ScaleByFosiState", "fosi", "scale_by_fosi"]

_HIGHEST = jax.lax.Precision.HIGHEST


class ScaleByFosiState(NamedTuple):
    """State of :func:`scale_by_fosi` (arrays only).

    Attributes:
      count: number of updates taken (int32).
      eigvecs: ``V``, ``[k + num_smallest, n]`` over the flattened parameters
        (``jax.flatten_util.ravel_pytree`` order), ``stats_dtype``; zeros before the first
        refresh.
      eigvals: ``Λ``, ``[k + num_smallest]``: the largest (descending), then the smallest
        (ascending, the most negative first).
      base_state: the base optimizer's state.
      key: the fallback PRNG key (Lanczos starting vectors), used when ``update`` gets no key.
      num_nonfinite: steps whose gradient was non-finite (eigenpairs and base state kept)
        and refreshes whose eigenpairs were non-finite and were discarded.
    """

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax
    eigvecs: jax.Array
    eigvals: jax.Array
    base_state: optax.OptState
    key: jax.Array
    num_nonfinite: jax.Array


def _lanczos_iters(num_iters: int | None, k: int, ell: int, dim: int) -> int:
    total = k + ell
    if total > dim:
        raise ValueError(
            f"fosi: k + num_smallest = {total} exceeds the number of parameters ({dim})."
        )
    if num_iters is None:
        return min(dim, max(2 * total + 40, 60 if ell == 0 else 100))
    if num_iters < total:
        raise ValueError(f"fosi: num_iters={num_iters} is below k + num_smallest = {total}.")
    return min(num_iters, dim)


def scale_by_fosi(
    base: optax.GradientTransformation,
    alpha: float = 1.0,
    k: int | None = None,
    num_smallest: int | None = None,
    num_iters: int | None = None,
    approx_every: int | None = None,
    eps: float = 1e-6,
    seed: int = 0,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """FOSI's split update: Newton on the extreme eigenspace, `base` on its complement.

    Args:
      base: the first-order optax transformation for the complement (its updates are used
        as they are, so it includes its learning rate and sign: e.g. ``optax.adam(1e-3)``);
        static.
      alpha: the scale of the Newton step on the eigenspace (1: the full Newton step).
      k: the number of largest eigenpairs (static; None: 10).
      num_smallest: the number of smallest (most negative) eigenpairs also given a Newton
        step with ``|λ|`` (static; None: 0, the paper's default).
      num_iters: Lanczos iterations per refresh, at least ``k + num_smallest`` (static;
        default ``min(n, max(2(k + num_smallest) + 40, 60))``, 100 with ``num_smallest``).
      approx_every: recompute the eigenpairs every this many steps (static; None: 20).
      eps: floor of ``|λ|`` in the Newton step.
      seed: seed of the fallback key carried in the state.
      stats_dtype: dtype of Lanczos, ``V`` and ``Λ`` (float32 by default).

    Structural arguments default to None rather than their value so that
    ``optax.inject_hyperparams(fosi)`` leaves them alone (see :func:`jaxopt2.inject_hyperparams`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and the
      extra argument ``value_fn`` (and uses ``key`` when given).
    """
    if not isinstance(base, optax.GradientTransformation):
        raise TypeError(
            f"fosi: base must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), got "
            f"{type(base).__name__}."
        )
    check_number(alpha, "alpha", low=0.0)
    k = static_int(k, "k", 10, who="fosi")
    num_smallest = static_int(num_smallest, "num_smallest", 0, low=0, who="fosi")
    num_iters = static_int(num_iters, "num_iters", None, who="fosi")
    approx_every = static_int(approx_every, "approx_every", 20, who="fosi")
    check_number(eps, "eps", low=0.0, low_inclusive=False)
    check_seed(seed)
    stats_dtype = static_dtype(stats_dtype, who="fosi")
    total = k + num_smallest

    def init_fn(params: optax.Params) -> ScaleByFosiState:
        dim = optax.tree.size(params)
        _lanczos_iters(num_iters, k, num_smallest, dim)
        return ScaleByFosiState(
            count=jnp.zeros([], jnp.int32),
            eigvecs=jnp.zeros((total, dim), stats_dtype),
            eigvals=jnp.ones((total,), stats_dtype),
            base_state=base.init(params),
            key=jax.random.PRNGKey(seed),
            num_nonfinite=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, key=None, **extra):
        del extra
        value_fn = require_value_fn(value_fn, "scale_by_fosi")
        if params is None:
            raise ValueError("scale_by_fosi needs params: call update(grads, state, params).")
        use_key, next_key = resolve_key(key, state.key)
        like = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), stats_dtype), params)
        _, unravel = ravel_pytree(like)
        dim = optax.tree.size(params)
        m = _lanczos_iters(num_iters, k, num_smallest, dim)

        def ravel(tree):
            return ravel_pytree(jax.tree.map(lambda x: x.astype(stats_dtype), tree))[0]

        def refresh(_):
            hvp = hessian_operator(value_fn, params)

            def matvec(x: jax.Array) -> jax.Array:
                v = jax.tree.map(lambda a, p: a.astype(p.dtype), unravel(x), params)
                return ravel(hvp(v))

            alphas, betas, basis = lanczos(matvec, jnp.zeros(dim, stats_dtype), use_key, m)
            values, s = eigh_tridiagonal(alphas, betas)  # ascending
            idx = np.concatenate([np.arange(m - 1, m - 1 - k, -1), np.arange(num_smallest)])
            vecs = jnp.matmul(s[:, idx].T, basis, precision=_HIGHEST)
            vecs = vecs / jnp.linalg.norm(vecs, axis=1, keepdims=True)
            vals = values[idx].astype(stats_dtype)
            ok = jnp.all(jnp.isfinite(vecs)) & jnp.all(jnp.isfinite(vals))
            vecs = jnp.where(ok, vecs.astype(stats_dtype), state.eigvecs)
            vals = jnp.where(ok, vals, state.eigvals)
            return vecs, vals, state.num_nonfinite + (1 - ok.astype(jnp.int32))

        keep = lambda _: (state.eigvecs, state.eigvals, state.num_nonfinite)
        if approx_every == 1:
            eigvecs, eigvals, num_nonfinite = refresh(None)
        else:
            eigvecs, eigvals, num_nonfinite = jax.lax.cond(
                state.count % approx_every == 0, refresh, keep, None
            )

        g = ravel(updates)
        coef = jnp.matmul(eigvecs, g, precision=_HIGHEST)
        g_rest = g - jnp.matmul(coef, eigvecs, precision=_HIGHEST)
        newton = jnp.matmul(coef / jnp.maximum(jnp.abs(eigvals), eps), eigvecs, precision=_HIGHEST)
        rest_tree = jax.tree.map(lambda a, u: a.astype(u.dtype), unravel(g_rest), updates)
        base_updates, base_state = base.update(rest_tree, state.base_state, params)
        b = ravel(base_updates)
        b = b - jnp.matmul(jnp.matmul(eigvecs, b, precision=_HIGHEST), eigvecs, precision=_HIGHEST)
        step = b - alpha * newton
        new_updates = jax.tree.map(lambda a, u: a.astype(u.dtype), unravel(step), updates)
        # A non-finite gradient skips the step: the eigenpairs (a refresh on the same batch is
        # discarded with it) and the base optimizer's state are kept, the step counted once.
        grad_ok = jnp.all(jnp.isfinite(g))
        eigvecs, eigvals, base_state = jax.tree.map(
            lambda new, old: jnp.where(grad_ok, new, old),
            (eigvecs, eigvals, base_state),
            (state.eigvecs, state.eigvals, state.base_state),
        )
        new_state = ScaleByFosiState(
            count=optax.safe_increment(state.count),
            eigvecs=eigvecs,
            eigvals=eigvals,
            base_state=base_state,
            key=next_key,
            num_nonfinite=jnp.where(grad_ok, num_nonfinite, state.num_nonfinite + 1),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@keyword_only()
def fosi(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    base: optax.GradientTransformation | None = None,
    alpha: float = 1.0,
    k: int | None = None,
    num_smallest: int | None = None,
    num_iters: int | None = None,
    approx_every: int | None = None,
    eps: float = 1e-6,
    seed: int = 0,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """FOSI (Sivan et al., 2024): Newton on the top-k Hessian eigenspace, `base` elsewhere.

    Args:
      learning_rate: the learning rate of the default base optimizer, ``optax.adam``; not
        used when `base` is given (set the learning rate inside `base`).
      base: the first-order optax transformation for the complement of the eigenspace
        (static); default ``optax.adam(learning_rate)``.

    See :func:`scale_by_fosi` for the other arguments and the module docstring for the rule.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> a = jnp.array([1.0, 2.0, 100.0, 300.0])
      >>> loss_fn = lambda w, a: 0.5 * jnp.sum(a * w ** 2)
      >>> opt = jaxopt2.fosi(base=optax.sgd(0.4), k=2, num_iters=4)
      >>> w = jnp.ones(4); state = opt.init(w)
      >>> step = jax.jit(lambda w, s, k: jaxopt2.value_and_update(opt, loss_fn, w, s, a, key=k))
      >>> for i in range(30):
      ...     loss, updates, state = step(w, state, jax.random.PRNGKey(i))
      ...     w = optax.apply_updates(w, updates)
      >>> bool(loss < 1e-6)
      True
    """
    check_learning_rate(learning_rate, "fosi", adaptive=base is not None)
    if base is None:
        base = optax.adam(learning_rate)
    return scale_by_fosi(
        base,
        alpha=alpha,
        k=k,
        num_smallest=num_smallest,
        num_iters=num_iters,
        approx_every=approx_every,
        eps=eps,
        seed=seed,
        stats_dtype=stats_dtype,
    )


registry.register(
    "fosi",
    fosi,
    needs_value_fn=True,
    needs_key=True,
    static_args=("base", "k", "num_smallest", "num_iters", "approx_every", "seed", "stats_dtype"),
)
