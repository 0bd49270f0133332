r"""SOAP: Adam run in the eigenbasis of Shampoo's factors.

For a parameter block ``W`` (``r × c``, blocked as Shampoo's are)
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
estimates the factors as KL-SOAP does.

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

from jaxopt2._sharding import gather_rows, shard_rows
from jaxopt2._tree import check_choice
from jaxopt2.optimizers import _kronecker as kr
from jaxopt2.optimizers import registry
from jaxopt2.optimizers._contract import (
    check_learning_rate,
    check_number,
    static_dtype,
    static_int,
)

__all__ = ["ScaleBySoapState", "scale_by_soap", "soap"]

REFRESH_METHODS = ("qr", "eigh")


class ScaleBySoapState(NamedTuple):
    """State of :func:`scale_by_soap` (arrays only).

    Attributes:
      count: updates taken (int32).
      stats: per block group ``(L [n, r, r], R [n, c, c])`` (None for an unpreconditioned side).
      bases: per block group, the eigenbases ``(Q_L [n, r, r], Q_R [n, c, c])`` shaped like
        `stats`, columns sorted by eigenvalue, descending. Built under a device mesh
        (``jax.set_mesh``), every per-group stack (``stats``, ``bases``, the blocks' ``nu``)
        has its ``n`` rounded up to a multiple of the device count and its rows split over the
        devices: each device refreshes, rotates and steps its own blocks (see
        the Shampoo and SOAP guide).
      mu: Adam's first moment, in the parameter basis (like the parameters).
      nu: Adam's second moment: per block group ``[n, r, c]`` in the eigenbasis, then per leaf
        for leaves without blocks (None for leaves with blocks; under a device mesh each is
        laid out like its parameter, see :func:`jaxopt2.state_sharding`).
      num_failed_refreshes: factor bases that came out non-finite and were kept.
      num_nonfinite: steps whose gradient was non-finite (moments and factors unchanged).
    """

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax
    stats: tuple
    bases: tuple
    mu: Any
    nu: tuple
    num_failed_refreshes: jax.Array
    num_nonfinite: jax.Array

    # per-block stacks, split along their rows over a mesh (of nu: the blocks' part)
    sharded_rows = ("stats", "bases", ("nu", 0))  # type: ignore[misc]  # a class attribute
    # one entry per parameter leaf (None for a leaf with blocks): each takes its leaf's sharding
    per_leaf = (("nu", 1),)  # type: ignore[misc]  # a class attribute


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_b2: float | None = None,
    eps: float = 1e-8,
    block_size: int | None = None,
    precondition_every: int | None = None,
    max_precondition_dim: int | None = None,
    one_sided: bool = False,
    refresh: str = "qr",
    statistics: str = "shampoo",
    damping: float = 1e-6,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Adam in the eigenbasis of Shampoo's blocked factors (no learning rate).

    Args:
      b1: decay of the first moment (kept in the parameter basis).
      b2: decay of the second moment (kept in the eigenbasis).
      shampoo_b2: decay of the factor statistics; default ``b2`` (the paper's choice).
      eps: added to ``sqrt(v̂)`` in the denominator.
      block_size: largest block side (static; None: 128).
      precondition_every: refresh the eigenbases every this many steps (static; None: 10).
      max_precondition_dim: a side longer than this is not rotated (static; None: 4096).
      one_sided: rotate only the smaller side of each block (static).
      refresh: ``"qr"`` (one subspace-iteration step from the previous basis, the paper's
        default) or ``"eigh"`` (a full eigendecomposition every refresh) (static).
      statistics: ``"shampoo"`` or ``"kl"`` (KL-SOAP factor estimates) (static).
      damping: relative damping of the eigenvalues KL statistics invert (``"kl"`` only).
      stats_dtype: dtype of factors, bases and moments: a name or a dtype (static).

    Structural arguments default to None rather than their value so that
    ``optax.inject_hyperparams(soap)`` leaves them alone (see :func:`jaxopt2.inject_hyperparams`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    who = "soap"
    block_size = static_int(block_size, "block_size", 128, who=who)
    precondition_every = static_int(precondition_every, "precondition_every", 10, who=who)
    max_precondition_dim = static_int(max_precondition_dim, "max_precondition_dim", 4096, who=who)
    stats_dtype = static_dtype(stats_dtype, who=who)
    check_choice(refresh, "refresh", REFRESH_METHODS)
    check_choice(statistics, "statistics", ("shampoo", "kl"))
    check_number(b1, "b1", low=0.0, high=1.0, high_inclusive=False)
    check_number(
        b2,
        "b2",
        low=0.0,
        high=1.0,
        high_inclusive=False,
        why="b2 = 1 makes Adam's bias correction 1 - b2^t zero.",
    )
    check_number(shampoo_b2, "shampoo_b2", low=0.0, high=1.0, high_inclusive=False, optional=True)
    check_number(eps, "eps", low=0.0)
    check_number(damping, "damping", low=0.0)
    k = precondition_every

    def plan_for(tree) -> kr.Plan:
        return kr.plan_for_tree(tree, block_size, max_precondition_dim, one_sided)

    def init_fn(params):
        plan = plan_for(params)
        leaves = jax.tree.leaves(params)
        nu_blocks = tuple(jnp.zeros((kr.stack_rows(g), g.r, g.c), stats_dtype) for g in plan.groups)
        nu_leaves = tuple(
            jnp.zeros(jnp.shape(p), stats_dtype) if v.matrix is None else None
            for v, p in zip(plan.leaves, leaves, strict=True)
        )
        return ScaleBySoapState(
            count=jnp.zeros([], jnp.int32),
            stats=kr.zero_statistics(plan, stats_dtype),
            bases=kr.identity_factors(plan, stats_dtype),
            mu=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), stats_dtype), params),
            nu=(nu_blocks, nu_leaves),
            num_failed_refreshes=jnp.zeros([], jnp.int32),
            num_nonfinite=jnp.zeros([], jnp.int32),
        )

    def new_bases(plan, stats, bases, t):
        """Refreshed eigenbases (descending columns), per side, and per-row failure flags."""
        real = kr.real_rows(plan)
        # Padding rows get identity factors: finite bases, never used.
        factors = [
            jnp.where(m[:, None, None], s, jnp.eye(s.shape[-1], dtype=s.dtype))
            for s, m in zip(kr.sides(stats), real, strict=True)
        ]

        def full(stack, _):
            _, q, ok = kr.descending_eigh(stack)
            return q, ok

        def power_qr(stack, old):
            # Sort the old columns by their Rayleigh quotients (descending), then one step of
            # subspace iteration. Padded coordinates have the lowest values: they stay last.
            est = jnp.sum(old * kr.mm(stack, old), axis=-2)
            order = jnp.argsort(-est, axis=-1)
            q_sorted = jnp.take_along_axis(old, order[:, None, :], axis=-1)
            q, _ = jnp.linalg.qr(kr.mm(stack, q_sorted))
            return q, jnp.all(jnp.isfinite(q), axis=(-2, -1))

        def owned(factors, old, dims, t):
            """One device: the bases of its own blocks (one batched eigh or QR)."""
            stack = kr.stack_factors(factors, plan.dim, for_eigenvectors=True)
            # the old bases padded to D x D with the identity on the padded coordinates
            prev = jnp.concatenate(
                [
                    jnp.pad(q, ((0, 0), (0, plan.dim - d), (0, plan.dim - d)))
                    + jnp.diag((jnp.arange(plan.dim) >= d).astype(q.dtype))
                    for q, d in zip(old, dims, strict=True)
                ]
            )
            if refresh == "eigh":
                q, ok = full(stack, prev)
            else:
                q, ok = jax.lax.cond(t == 0, full, power_qr, stack, prev)
            sizes = [x.shape[0] for x in factors]
            pieces = zip(
                kr.split_stack(q, sizes), kr.split_stack(ok, sizes), old, dims, strict=True
            )
            new = [
                jnp.where(o[:, None, None], p[:, :d, :d], b).astype(b.dtype)
                for p, o, b, d in pieces
            ]
            return new, [~o for o in kr.split_stack(ok, sizes)]

        new, bad = kr.map_sides(plan, owned, factors, kr.sides(bases), t)
        failed = sum(jnp.sum(b & m) for b, m in zip(bad, real, strict=True))
        return kr.pair_sides(plan, new), failed

    def refresh_step(plan, stats, bases, nu_blocks, failed, t):
        new, bad = new_bases(plan, stats, bases, t)
        # Carry the second moment into the new bases: the diagonal of the rotated covariance.
        rotated = []
        for v, (ol, or_), (nl, nr) in zip(nu_blocks, bases, new, strict=True):
            if ol is not None:
                v = kr.mm(jnp.square(kr.tmm(nl, ol)), v)
            if or_ is not None:
                v = kr.mmt(v, jnp.square(kr.tmm(nr, or_)))
            rotated.append(v)
        return new, tuple(rotated), (failed + bad).astype(jnp.int32)

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

        # Each device holds (under a mesh) and works on the rows of the blocks it owns.
        blocks = kr.pad_blocks(kr.to_blocks(plan, grads, stats_dtype))
        stats, bases = shard_rows(state.stats), shard_rows(state.bases)
        failed = state.num_failed_refreshes
        nu_blocks, nu_leaves = state.nu
        nu_blocks = shard_rows(nu_blocks)
        if plan.num_factors:
            if statistics == "kl":
                prev = 1.0 - factor_decay ** jnp.maximum(t, 1).astype(stats_dtype)
                new = kr.kl_statistics(blocks, stats, bases, t == 0, prev, factor_decay, damping)
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
        mu_blocks = kr.pad_blocks(kr.to_blocks(plan, mu, stats_dtype))
        for g, m, v, (ql, qr) in zip(blocks, mu_blocks, nu_blocks, bases, strict=True):
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
        # Only the steps travel: gathered to rebuild the leaves.
        out = kr.from_blocks(plan, gather_rows(steps), diag)

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
    mask: Any = None,
    block_size: int | None = None,
    precondition_every: int | None = None,
    max_precondition_dim: int | None = None,
    one_sided: bool = False,
    refresh: str = "qr",
    statistics: str = "shampoo",
    damping: float = 1e-6,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """SOAP: ``chain(scale_by_soap, add_decayed_weights, scale_by_learning_rate)``.

    See :func:`scale_by_soap` and the module docstring. The paper's defaults: ``b1 = b2 =
    0.95``, bases refreshed every 10 steps, learning rate about 3e-3.

    Args:
      learning_rate: a number or an optax schedule.
      weight_decay: decoupled weight decay, added to the update before the learning rate
        scales it (the paper uses 0.01 for language models).
      mask: which leaves get the weight decay, as in ``optax.adamw``: a pytree of bools
        with the structure of (a prefix of) the parameters, or a function ``params ->``
        such a tree; None: every leaf (static).

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
    check_learning_rate(learning_rate, "soap")
    check_number(weight_decay, "weight_decay", low=0.0, schedule=True)
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
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


registry.register(
    "soap",
    soap,
    static_args=(
        "mask",
        "block_size",
        "precondition_every",
        "max_precondition_dim",
        "one_sided",
        "refresh",
        "statistics",
        "stats_dtype",
    ),
)
