r"""SOAP: Adam run in the eigenbasis of Shampoo's factors.

For a parameter block ``W`` (``r × c``, blocked as in :mod:`jaxopt2.optimizers.kronecker`)
with gradient ``G_t`` and eigenbases ``Q_L``, ``Q_R`` of the factors ``L``, ``R``:

.. math::

   L_t &= β_s L_{t-1} + (1-β_s) G_t G_tᵀ, \qquad R_t = β_s R_{t-1} + (1-β_s) G_tᵀ G_t \\
   M_t &= β_1 M_{t-1} + (1-β_1) G_t \quad\text{(first moment, in the parameter basis)} \\
   G'_t &= Q_Lᵀ G_t Q_R, \qquad V_t = β_2 V_{t-1} + (1-β_2)\, G'_t \odot G'_t
   \quad\text{(second moment, in the eigenbasis)} \\
   \text{update} &= Q_L \Big[\frac{Q_Lᵀ M_t Q_R / (1-β_1^t)}
                        {\sqrt{V_t / (1-β_2^t)} + ε}\Big] Q_Rᵀ

Every ``precondition_every`` steps the bases are refreshed from the current factors: by one
step of subspace iteration from the previous basis (columns sorted by their Rayleigh
quotients ``diag(Qᵀ L Q)``, descending, then ``Q ← qr(L Q)``, as in the paper), or by a full
``eigh`` (``refresh="eigh"``; the first refresh always is one). On a refresh the second moment
is carried into the new basis as the diagonal of the rotated covariance,
``V ← (O_L ∘ O_L) V (O_R ∘ O_R)ᵀ`` with ``O = Q_newᵀ Q_old`` (exact when ``V`` describes a
covariance that is diagonal in the old basis; a permutation when the basis is only reordered).
Scalars, vectors and leaves too large to precondition get plain Adam. ``statistics="kl"``
estimates the factors as KL-SOAP does (see :func:`jaxopt2.optimizers.kronecker.kl_statistics`).

Deviation from the reference implementation: the first step is taken (in the eigenbasis of
the first gradient's factors) instead of skipped, so ``update`` never returns a zero step.

References:
  Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade. "SOAP: Improving and
  Stabilizing Shampoo using Adam." ICLR 2025. arXiv:2409.11321.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt2._tree import check_choice, check_hyperparameter, check_positive_int
from jaxopt2.optimizers import kronecker as kr
from jaxopt2.optimizers import registry
from jaxopt2.sharding import gather_rows, map_rows, padded_rows

__all__ = ["ScaleBySoapState", "scale_by_soap", "soap"]

REFRESH_METHODS = ("qr", "eigh")


class ScaleBySoapState(NamedTuple):
    """State of :func:`scale_by_soap` (arrays only).

    Attributes:
      count: updates taken (int32).
      stats: per block group ``(L [n, r, r], R [n, c, c])`` (None for an unpreconditioned side).
      bases: eigenbases of every factor, padded to ``D × D``, ``[N, D, D]``; columns sorted by
        eigenvalue, descending. Built under a device mesh (``jax.set_mesh``), ``N`` is rounded
        up to a multiple of its device count with identity rows, and the stack is sharded
        along ``N``: each device refreshes its own rows (see :mod:`jaxopt2.sharding`).
      mu: Adam's first moment, in the parameter basis (like the parameters).
      nu: Adam's second moment: per block group ``[n, r, c]`` in the eigenbasis, then per leaf
        for leaves without blocks (None for leaves with blocks).
      num_failed_refreshes: factor bases that came out non-finite and were kept.
      num_nonfinite: steps whose gradient was non-finite (moments and factors unchanged).
    """

    count: jax.Array
    stats: tuple
    bases: jax.Array
    mu: Any
    nu: tuple
    num_failed_refreshes: jax.Array
    num_nonfinite: jax.Array

    sharded_rows = ("bases",)  # stacked blocks, sharded along their first axis over a mesh


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_b2: float | None = None,
    eps: float = 1e-8,
    block_size: int = 128,
    precondition_every: int = 10,
    max_precondition_dim: int = 4096,
    one_sided: bool = False,
    refresh: str = "qr",
    statistics: str = "shampoo",
    damping: float = 1e-6,
    stats_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
    """Adam in the eigenbasis of Shampoo's blocked factors (no learning rate).

    Args:
      b1: decay of the first moment (kept in the parameter basis).
      b2: decay of the second moment (kept in the eigenbasis).
      shampoo_b2: decay of the factor statistics; default ``b2`` (the paper's choice).
      eps: added to ``sqrt(v̂)`` in the denominator.
      block_size: largest block side (static).
      precondition_every: refresh the eigenbases every this many steps (static).
      max_precondition_dim: a side longer than this is not rotated (static).
      one_sided: rotate only the smaller side of each block (static).
      refresh: ``"qr"`` (one subspace-iteration step from the previous basis, the paper's
        default) or ``"eigh"`` (a full eigendecomposition every refresh) (static).
      statistics: ``"shampoo"`` or ``"kl"`` (KL-SOAP factor estimates) (static).
      damping: relative damping of the eigenvalues KL statistics invert (``"kl"`` only).
      stats_dtype: dtype of factors, bases and moments (static).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    block_size = check_positive_int(block_size, "block_size")
    precondition_every = check_positive_int(precondition_every, "precondition_every")
    max_precondition_dim = check_positive_int(max_precondition_dim, "max_precondition_dim")
    check_choice(refresh, "refresh", REFRESH_METHODS)
    check_choice(statistics, "statistics", ("shampoo", "kl"))
    check_hyperparameter(b1, "b1", low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter(b2, "b2", low=0.0, high=1.0, high_inclusive=False)
    if shampoo_b2 is not None:
        check_hyperparameter(shampoo_b2, "shampoo_b2", low=0.0, high=1.0, high_inclusive=False)
    check_hyperparameter(eps, "eps", low=0.0)
    check_hyperparameter(damping, "damping", low=0.0)
    k = precondition_every

    def plan_for(tree) -> kr.Plan:
        return kr.plan_for_tree(tree, block_size, max_precondition_dim, one_sided)

    def init_fn(params):
        plan = plan_for(params)
        leaves = jax.tree.leaves(params)
        nu_blocks = tuple(jnp.zeros((g.count, g.r, g.c), stats_dtype) for g in plan.groups)
        nu_leaves = tuple(
            jnp.zeros(jnp.shape(p), stats_dtype) if v.matrix is None else None
            for v, p in zip(plan.leaves, leaves, strict=True)
        )
        return ScaleBySoapState(
            count=jnp.zeros([], jnp.int32),
            stats=kr.zero_statistics(plan, stats_dtype),
            bases=kr.identity_stack(padded_rows(plan.num_factors), max(plan.dim, 1), stats_dtype),
            mu=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), stats_dtype), params),
            nu=(nu_blocks, nu_leaves),
            num_failed_refreshes=jnp.zeros([], jnp.int32),
            num_nonfinite=jnp.zeros([], jnp.int32),
        )

    def new_bases(plan, stats, bases, t):
        """Refreshed padded eigenbases (descending columns) and per-factor ok flags."""
        stack = kr.pad_factors(plan, stats, for_eigenvectors=True)
        if bases.shape[0] > stack.shape[0]:  # identity rows up to the sharded stack's length
            extra = kr.identity_stack(bases.shape[0] - stack.shape[0], plan.dim, stack.dtype)
            stack = jnp.concatenate([stack, extra])

        def full(stack):
            _, q, ok = kr.descending_eigh(stack)
            return q, ok

        def power_qr(stack, bases):
            # Sort the old columns by their Rayleigh quotients (descending), then one step of
            # subspace iteration. Padded coordinates have the lowest values: they stay last.
            est = jnp.sum(bases * kr.mm(stack, bases), axis=-2)
            order = jnp.argsort(-est, axis=-1)
            q_sorted = jnp.take_along_axis(bases, order[:, None, :], axis=-1)
            q, _ = jnp.linalg.qr(kr.mm(stack, q_sorted))
            return q, jnp.all(jnp.isfinite(q), axis=(-2, -1))

        if refresh == "eigh":
            return map_rows(full, stack)
        return jax.lax.cond(
            t == 0, lambda: map_rows(full, stack), lambda: map_rows(power_qr, stack, bases)
        )

    def refresh_step(plan, stats, bases, nu_blocks, failed, t):
        q, ok = new_bases(plan, stats, bases, t)
        q = jnp.where(ok[:, None, None], q, bases).astype(bases.dtype)
        # Carry the second moment into the new bases: the diagonal of the rotated covariance.
        rotated = []
        old_q, new_q = gather_rows(bases), gather_rows(q)
        for v, (ol, or_), (nl, nr) in zip(
            nu_blocks, kr.factor_slices(plan, old_q), kr.factor_slices(plan, new_q), strict=True
        ):
            if ol is not None:
                v = kr.mm(jnp.square(kr.tmm(nl, ol)), v)
            if or_ is not None:
                v = kr.mmt(v, jnp.square(kr.tmm(nr, or_)))
            rotated.append(v)
        real = jnp.arange(q.shape[0]) < plan.num_factors
        return q, tuple(rotated), failed + jnp.sum(real & ~ok).astype(jnp.int32)

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        plan = plan_for(updates)
        leaves, treedef = jax.tree.flatten(updates)
        t = state.count
        count = optax.safe_increment(t)
        fcount = count.astype(stats_dtype)
        finite = kr.all_finite(updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        grads = [g.astype(stats_dtype) for g in leaves]
        factor_decay = b2 if shampoo_b2 is None else shampoo_b2

        blocks = kr.to_blocks(plan, grads, stats_dtype)
        stats, bases, failed = state.stats, state.bases, state.num_failed_refreshes
        nu_blocks, nu_leaves = state.nu
        if plan.num_factors:
            if statistics == "kl":
                prev = 1.0 - factor_decay ** jnp.maximum(t, 1).astype(stats_dtype)
                new = kr.kl_statistics(
                    plan, blocks, stats, gather_rows(bases), t == 0, prev, factor_decay, damping
                )
            else:
                new = kr.shampoo_statistics(blocks, stats, factor_decay)
            stats = keep(new, stats)
            bases, nu_blocks, failed = jax.lax.cond(
                (t % k == 0) & finite,
                lambda: refresh_step(plan, stats, bases, nu_blocks, failed, t),
                lambda: (bases, nu_blocks, failed),
            )

        mu = [
            b1 * m + (1.0 - b1) * g for m, g in zip(jax.tree.leaves(state.mu), grads, strict=True)
        ]
        c1, c2 = 1.0 - b1**fcount, 1.0 - b2**fcount

        # Adam in the eigenbasis, block by block.
        new_nu_blocks, steps = [], []
        mu_blocks = kr.to_blocks(plan, mu, stats_dtype)
        for g, m, v, (ql, qr) in zip(
            blocks, mu_blocks, nu_blocks, kr.factor_slices(plan, gather_rows(bases)), strict=True
        ):
            rot = lambda x, ql=ql, qr=qr: kr.precondition(
                x, None if ql is None else jnp.swapaxes(ql, -1, -2), qr
            )
            v = b2 * v + (1.0 - b2) * jnp.square(rot(g))
            step = (rot(m) / c1) / (jnp.sqrt(v / c2) + eps)
            step = step if ql is None else kr.mm(ql, step)
            steps.append(step if qr is None else kr.mmt(step, qr))
            new_nu_blocks.append(v)

        # Plain Adam on leaves without blocks.
        diag, new_nu_leaves = [], []
        for m, g, v in zip(mu, grads, nu_leaves, strict=True):
            if v is None:
                diag.append(m)
                new_nu_leaves.append(None)
                continue
            v = b2 * v + (1.0 - b2) * jnp.square(g)
            diag.append((m / c1) / (jnp.sqrt(v / c2) + eps))
            new_nu_leaves.append(v)
        out = kr.from_blocks(plan, steps, diag)

        new_updates = treedef.unflatten(
            [o.astype(g.dtype) for o, g in zip(out, leaves, strict=True)]
        )
        new_state = ScaleBySoapState(
            count=count,
            stats=stats,
            bases=bases,
            mu=keep(treedef.unflatten(mu), state.mu),
            nu=keep((tuple(new_nu_blocks), tuple(new_nu_leaves)), state.nu),
            num_failed_refreshes=failed,
            num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_b2: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    block_size: int = 128,
    precondition_every: int = 10,
    max_precondition_dim: int = 4096,
    one_sided: bool = False,
    refresh: str = "qr",
    statistics: str = "shampoo",
    damping: float = 1e-6,
    stats_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
    """SOAP: ``chain(scale_by_soap, add_decayed_weights, scale_by_learning_rate)``.

    See :func:`scale_by_soap` and the module docstring. The paper's defaults: ``b1 = b2 =
    0.95``, bases refreshed every 10 steps, learning rate about 3e-3.

    Args:
      learning_rate: a number or an optax schedule.
      weight_decay: decoupled weight decay, added to the update before the learning rate
        scales it (the paper uses 0.01 for language models).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
      >>> w_true = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
      >>> loss_fn = lambda w: 0.5 * jnp.mean((x @ w - x @ w_true) ** 2)
      >>> opt = jaxopt2.soap(0.03, precondition_every=5)
      >>> w = jnp.zeros((8, 4)); state = opt.init(w)
      >>> @jax.jit
      ... def step(w, state):
      ...     updates, state = opt.update(jax.grad(loss_fn)(w), state, w)
      ...     return optax.apply_updates(w, updates), state
      >>> for _ in range(300):
      ...     w, state = step(w, state)
      >>> bool(loss_fn(w) < 1e-3)
      True
    """
    check_hyperparameter(weight_decay, "weight_decay", low=0.0)
    return optax.chain(
        scale_by_soap(
            b1=b1,
            b2=b2,
            shampoo_b2=shampoo_b2,
            eps=eps,
            block_size=block_size,
            precondition_every=precondition_every,
            max_precondition_dim=max_precondition_dim,
            one_sided=one_sided,
            refresh=refresh,
            statistics=statistics,
            damping=damping,
            stats_dtype=stats_dtype,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


registry.register(
    "soap",
    soap,
    static_args=(
        "block_size",
        "precondition_every",
        "max_precondition_dim",
        "one_sided",
        "refresh",
        "statistics",
        "stats_dtype",
    ),
)
