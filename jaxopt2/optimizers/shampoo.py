r"""Shampoo: Kronecker-factored preconditioning per block, grafted onto a diagonal method.

For a parameter block ``W`` (``r × c``, the Shampoo and SOAP guide says how
leaves of any rank become blocks) with gradient ``G_t``:

.. math::

   L_t &= β_2 L_{t-1} + (1 - β_2)\, G_t G_tᵀ, \qquad
   R_t = β_2 R_{t-1} + (1 - β_2)\, G_tᵀ G_t \\
   P_t &= \tilde L^{-e} \, G_t \, \tilde R^{-e}, \qquad
   \tilde X = X + ε\,λ_{max}(X)\,I \quad\text{(roots refreshed every k steps)} \\
   U_t &= P_t \cdot \frac{\lVert A_t \rVert_F}{\lVert P_t \rVert_F}
   \quad\text{(grafting: } A_t \text{ is the diagonal method's step on the block)} \\
   m_t &= β_1 m_{t-1} + (1 - β_1) U_t, \qquad \text{update} = m_t / (1 - β_1^t)

with ``e = 1/4`` by default (two factors), ``1/2`` for the one-sided variant. Scalars, vectors
and leaves too large to precondition take ``A_t`` directly. Until
``start_preconditioning_step`` the update is the graft ``A_t`` everywhere.

``statistics="kl"`` (KL-Shampoo) estimates the factors by KL minimization, each whitened by
the inverse of the other, ``L_t = β_2 L_{t-1} + (1 - β_2)/c \; G_t R^{-1} G_tᵀ`` (and
symmetrically for ``R``), with ``e = 1/2``; its step needs no graft (``graft`` defaults to
``"none"`` then). The inverses come from the latest refresh (``R^{-1} = (R^{-1/2})^2``).

Failure policy. Roots are computed in ``stats_dtype`` (float32) by one batched ``eigh`` (or
coupled Newton). A factor whose root is non-finite or did not converge keeps its previous
root (the identity before the first success) and is counted in ``num_failed_roots``; there
is no float64 retry, because float64 is slow or absent on accelerators and the relative
damping already bounds the condition number at ``1/ε``. A step whose gradient has a non-finite
entry leaves all statistics, moments and roots unchanged (counted in ``num_nonfinite``);
its returned update is non-finite, so wrap with ``optax.apply_if_finite`` to skip it.

References:
  Gupta, Koren, Singer. "Shampoo: Preconditioned Stochastic Tensor Optimization." ICML 2018.
  Anil, Gupta, Koren, Regan, Singer. "Scalable Second Order Optimization for Deep Learning."
  arXiv:2002.09018 (blocking, grafting, relative damping).
  Morwani, Shapira, Vyas, Malach, Kakade, Janson. "A New Perspective on Shampoo's
  Preconditioner." arXiv:2406.17748 (exponent 1/2).
  Lin, Lowe, Dangel, Eschenhagen, Xu, Grosse. "Understanding and Improving Shampoo and SOAP
  via Kullback-Leibler Minimization." arXiv:2509.03378 (KL-Shampoo).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt2._sharding import gather_rows, shard_rows
from jaxopt2._tree import check_choice
from jaxopt2.linalg.roots import inverse_root_spectrum, matrix_inverse_root, symmetric_eigh
from jaxopt2.optimizers import _kronecker as kr
from jaxopt2.optimizers import _lowbit as lowbit
from jaxopt2.optimizers import registry
from jaxopt2.optimizers._contract import (
    check_learning_rate,
    check_number,
    static_array_error,
    static_dtype,
    static_int,
)

__all__ = ["GRAFTS", "ScaleByShampooState", "scale_by_shampoo", "shampoo"]

GRAFTS = ("adam", "rmsprop", "adagrad", "sgd", "none")
STATISTICS = ("shampoo", "kl")
ROOT_METHODS = ("eigh", "newton")


class ScaleByShampooState(NamedTuple):
    """State of :func:`scale_by_shampoo` (arrays only; shapes fixed by the parameters).

    Attributes:
      count: updates taken (int32).
      stats: per block group, ``(L [n, r, r], R [n, c, c])`` (None for a side that is not
        preconditioned), in ``stats_dtype``.
      roots: per block group, the inverse roots ``(L^{-e} [n, r, r], R^{-e} [n, c, c])``
        shaped like `stats` (KL: the eigenbases); with ``precondition_bits < 32`` each is a
        :class:`~jaxopt2.optimizers.QuantizedBasis` of ``D × D`` matrices (``D`` the
        largest factor size). Built under a device mesh (``jax.set_mesh``), every stack's
        ``n`` is the group's block count rounded up to a multiple of the device count and the
        rows are split over the devices: each device refreshes and applies the roots of its
        own blocks (see the sharding guide).
      graft_nu: the diagonal second moment of the graft (None for ``sgd`` / ``none``).
      mu: momentum of the final update.
      num_failed_roots: factor roots that failed (non-finite / not converged) and were kept.
      num_nonfinite: steps whose gradient was non-finite (statistics left unchanged).
    """

    count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count, as in optax
    stats: tuple
    roots: jax.Array
    graft_nu: Any
    mu: Any
    num_failed_roots: jax.Array
    num_nonfinite: jax.Array

    # per-block stacks, split along their rows over a mesh (a class attribute, not a field)
    sharded_rows = ("stats", "roots")  # type: ignore[misc]


def _check_exponent(exponent: Any, root_method: str) -> None:
    if exponent is None:
        return
    if isinstance(exponent, jax.Array):
        raise static_array_error("exponent", exponent, "shampoo", "a Python number")
    check_number(exponent, "exponent", low=0.0, high=1.0, low_inclusive=False)
    if not isinstance(exponent, int | float):
        raise ValueError(f"exponent must be a Python number (static), got {exponent!r}.")
    if root_method == "newton" and abs(1.0 / exponent - round(1.0 / exponent)) > 1e-9:
        raise ValueError(
            f"exponent must be 1/p with an integer p for root_method='newton', got {exponent!r}; "
            "use root_method='eigh' for other exponents."
        )


def graft_step(kind: str, g: jax.Array, nu: jax.Array | None, count, b2, eps):
    """The diagonal method's direction ``A`` and its new second moment (one leaf)."""
    if kind in ("sgd", "none"):
        return g, nu
    assert nu is not None, f"graft {kind!r} keeps a second moment"
    if kind == "adagrad":
        nu = nu + jnp.square(g)
        return g / (jnp.sqrt(nu) + eps), nu
    nu = b2 * nu + (1.0 - b2) * jnp.square(g)
    nu_hat = nu / (1.0 - b2**count) if kind == "adam" else nu
    return g / (jnp.sqrt(nu_hat) + eps), nu


def scale_by_shampoo(
    block_size: int | None = None,
    precondition_every: int | None = None,
    start_preconditioning_step: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    damping: float = 1e-6,
    exponent: float | None = None,
    one_sided: bool = False,
    graft: str | None = None,
    nesterov: bool = False,
    max_precondition_dim: int | None = None,
    stagger: bool = False,
    statistics: str = "shampoo",
    root_method: str = "eigh",
    precondition_bits: int | None = None,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Precondition updates with Shampoo's blocked Kronecker factors (no learning rate).

    Args:
      block_size: largest block side; longer dimensions are split into blocks (static;
        None: 128).
      precondition_every: refresh the inverse roots every this many steps (static; None:
        10).
      start_preconditioning_step: first step that uses (and refreshes) the roots; before it
        the update is the graft. Default: ``precondition_every`` (static).
      b1: momentum of the final update (an EMA, bias-corrected like Adam's first moment).
      b2: decay of the factor statistics and of the graft's second moment.
      eps: added to ``sqrt(nu)`` in the graft's denominator.
      damping: relative damping ``ε`` of the roots: ``ε · λ_max(X)`` is added to the diagonal
        of each factor ``X`` before its inverse root is taken.
      exponent: the root exponent ``e`` (roots ``X^{-e}``), in (0, 1]. Default ``1/4`` for two
        factors, ``1/2`` one-sided or with ``statistics="kl"`` (static).
      one_sided: precondition only the smaller side of each block (with ``e = 1/2`` by
        default: the "new perspective" variant; half the factor memory) (static).
      graft: the diagonal method whose per-block step norm the Shampoo direction takes, and
        which updates scalars and vectors: ``"adam"`` (default), ``"rmsprop"``, ``"adagrad"``,
        ``"sgd"``, or ``"none"`` (the raw Shampoo direction; default with
        ``statistics="kl"``) (static).
      nesterov: Nesterov momentum (static).
      max_precondition_dim: a side of a leaf's matrix view longer than this is not
        preconditioned (static; None: 4096).
      stagger: refresh a ``1/precondition_every`` slice of the factors every step instead of
        all of them every ``precondition_every`` steps, so no step carries the whole refresh;
        preconditioning starts once every slice has been refreshed (static).
      statistics: ``"shampoo"`` or ``"kl"`` (KL-Shampoo; needs ``e = 1/2``) (static).
      root_method: ``"eigh"`` or ``"newton"`` (coupled Newton, integer ``1/e``) (static).
      precondition_bits: 32 (None) stores the roots densely in ``stats_dtype``; 8 or 4 store
        their eigenvectors block-quantized plus a float32 spectrum
        (:class:`~jaxopt2.optimizers.QuantizedBasis`; needs ``root_method="eigh"``). The
        statistics stay in ``stats_dtype`` (static).
      stats_dtype: dtype of the statistics, roots and moments: a name or a dtype (static).

    Structural arguments default to None rather than their value so that
    ``optax.inject_hyperparams(shampoo)`` leaves them alone (see
    :func:`jaxopt2.inject_hyperparams`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    who = "shampoo"
    block_size = static_int(block_size, "block_size", 128, who=who)
    precondition_every = static_int(precondition_every, "precondition_every", 10, who=who)
    start_preconditioning_step = static_int(
        start_preconditioning_step, "start_preconditioning_step", precondition_every, low=0, who=who
    )
    max_precondition_dim = static_int(max_precondition_dim, "max_precondition_dim", 4096, who=who)
    stats_dtype = static_dtype(stats_dtype, who=who)
    check_choice(statistics, "statistics", STATISTICS)
    check_choice(root_method, "root_method", ROOT_METHODS)
    if graft is None:
        graft = "none" if statistics == "kl" else "adam"
    check_choice(graft, "graft", GRAFTS)
    _check_exponent(exponent, root_method)
    bits = precondition_bits = static_int(precondition_bits, "precondition_bits", 32, who=who)
    if bits not in lowbit.BITS:
        raise ValueError(f"precondition_bits must be one of {lowbit.BITS}, got {bits!r}.")
    if bits != 32 and root_method != "eigh":
        raise ValueError(
            "precondition_bits < 32 stores eigenvectors: it needs root_method='eigh', got "
            f"root_method={root_method!r}."
        )
    if statistics == "kl" and exponent not in (None, 0.5):
        raise ValueError(
            f"statistics='kl' uses the exponent 1/2 of KL-Shampoo, got exponent={exponent!r}."
        )
    check_number(b1, "b1", low=0.0, high=1.0, high_inclusive=False)
    check_number(
        b2,
        "b2",
        low=0.0,
        high=1.0,
        high_inclusive=False,
        why="It decays the factor statistics (b2 = 1 keeps them at zero) and the Adam/RMSProp "
        "graft's second moment (b2 = 1 makes Adam's bias correction 1 - b2^t zero).",
    )
    check_number(eps, "eps", low=0.0)
    check_number(damping, "damping", low=0.0)
    if exponent is None:
        exponent = 0.5 if (one_sided or statistics == "kl") else 0.25
    root_order = 1.0 / exponent
    if root_method == "newton":
        root_order = round(root_order)
    start = start_preconditioning_step
    k = precondition_every

    def plan_for(tree) -> kr.Plan:
        return kr.plan_for_tree(tree, block_size, max_precondition_dim, one_sided)

    def initial_roots(plan):
        if bits == 32:
            return kr.identity_factors(plan, stats_dtype)
        eye = kr.identity_factors(plan, stats_dtype, dim=plan.dim)
        return tuple(
            tuple(None if e is None else lowbit.pack(e, jnp.ones(e.shape[:2]), bits) for e in pair)
            for pair in eye
        )

    def init_fn(params):
        plan = plan_for(params)
        like = lambda: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), stats_dtype), params)
        return ScaleByShampooState(
            count=jnp.zeros([], jnp.int32),
            stats=kr.zero_statistics(plan, stats_dtype),
            roots=initial_roots(plan),
            graft_nu=None if graft in ("sgd", "none") else like(),
            mu=like(),
            num_failed_roots=jnp.zeros([], jnp.int32),
            num_nonfinite=jnp.zeros([], jnp.int32),
        )

    def kl_precondition(blocks, stats, bases, correction):
        """``L^{-1/2} G R^{-1/2}`` in the stored eigenbases with re-estimated eigenvalues."""
        out = []
        for g, (left, right), (ql, qr) in zip(blocks, stats, bases, strict=True):
            h = g if ql is None else kr.tmm(ql, g)
            h = h if qr is None else kr.mm(h, qr)
            if ql is not None:
                h = h * kr.eig_power(ql, left / correction, -0.5, damping)[:, :, None]
            if qr is not None:
                h = h * kr.eig_power(qr, right / correction, -0.5, damping)[:, None, :]
            h = h if ql is None else kr.mm(ql, h)
            out.append(h if qr is None else kr.mmt(h, qr))
        return out

    def factor_transform(stack):
        """Preconditioners of a padded ``[M, D, D]`` factor stack (inverse roots for Shampoo,
        eigenbases for KL; low-bit eigenvectors + spectrum with ``precondition_bits < 32``)
        and per-factor ok flags."""
        if statistics == "kl":
            _, q, ok = kr.descending_eigh(stack)
            return (q if bits == 32 else lowbit.pack(q, jnp.zeros(q.shape[:-1]), bits)), ok
        if bits == 32:
            return matrix_inverse_root(stack, root_order, method=root_method, damping=damping)
        w, q = symmetric_eigh(stack)
        spectrum, ok = inverse_root_spectrum(w, root_order, damping)
        return lowbit.pack(q, spectrum, bits), ok & jnp.all(jnp.isfinite(q), axis=(-2, -1))

    def store(piece, d):
        """A side's rows of the transformed stack as kept in the state: dense roots cut back
        to ``d × d``; low-bit ones stay ``D × D`` (cut when they are rebuilt)."""
        return piece[:, :d, :d] if bits == 32 else piece

    def select(ok, new, old):
        if bits == 32:
            return jnp.where(ok[:, None, None], new, old).astype(old.dtype)
        return lowbit.where(ok, new, old)

    def dense(plan, roots):
        """Per group ``(left, right)`` inverse roots (or KL eigenbases) to precondition with."""
        if bits == 32:
            return roots
        rebuild = lowbit.basis if statistics == "kl" else lowbit.reconstruct
        mats = [
            rebuild(x, bits, plan.dim)[:, :d, :d]
            for x, d in zip(kr.sides(roots), kr.side_dims(plan), strict=True)
        ]
        return kr.pair_sides(plan, mats)

    def refresh(plan, stats, roots, failed, t):
        real = kr.real_rows(plan)
        # Padding rows get identity factors: finite roots, never used.
        factors = [
            jnp.where(m[:, None, None], s, jnp.eye(s.shape[-1], dtype=s.dtype))
            for s, m in zip(kr.sides(stats), real, strict=True)
        ]

        def owned(factors, old, dims, t):
            """One device: decompose the factors of its own blocks (one batched eigh)."""
            stack = kr.stack_factors(factors, plan.dim, for_eigenvectors=statistics == "kl")
            m = stack.shape[0]
            fresh = jnp.ones(m, bool)
            if stagger:  # a 1/k slice of this device's factors, in turn
                size = -(-m // k)
                extra = kr.identity_stack(size * k - m, plan.dim, stack.dtype)
                stack = jnp.concatenate([stack, extra]) if size * k > m else stack
                first = ((t - start) % k) * size
                new, ok = factor_transform(jax.lax.dynamic_slice_in_dim(stack, first, size))

                def put(x):
                    full = jnp.zeros((size * k, *x.shape[1:]), x.dtype)
                    return jax.lax.dynamic_update_slice_in_dim(full, x, first, 0)[:m]

                new, ok, fresh = jax.tree.map(put, new), put(ok), put(jnp.ones(size, bool))
            else:
                new, ok = factor_transform(stack)
            sizes = [x.shape[0] for x in factors]
            pieces = zip(
                kr.split_stack(new, sizes),
                kr.split_stack(ok, sizes),
                kr.split_stack(fresh, sizes),
                old,
                dims,
                strict=True,
            )
            out = [select(o & f, store(p, d), prev) for p, o, f, prev, d in pieces]
            bad = [
                f & ~o
                for f, o in zip(
                    kr.split_stack(fresh, sizes), kr.split_stack(ok, sizes), strict=True
                )
            ]
            return out, bad

        new, bad = kr.map_sides(plan, owned, factors, kr.sides(roots), t)
        failed = failed + sum(jnp.sum(b & m) for b, m in zip(bad, real, strict=True))
        return kr.pair_sides(plan, new), failed.astype(jnp.int32)

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        plan = plan_for(updates)
        leaves, treedef = jax.tree.flatten(updates)
        t = state.count
        count = optax.safe_increment(t)
        finite = kr.all_finite(updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        grads = [g.astype(stats_dtype) for g in leaves]

        # Statistics (skipped on a non-finite gradient: the preconditioner stays unpoisoned).
        # Each device holds (under a mesh) and works on the rows of the blocks it owns.
        blocks = kr.pad_blocks(kr.to_blocks(plan, grads, stats_dtype))
        stats, roots = shard_rows(state.stats), shard_rows(state.roots)
        failed = state.num_failed_roots
        fcount = count.astype(stats_dtype)
        stats_correction = 1.0 - b2**fcount  # KL's factors are used bias-corrected
        if plan.num_factors:
            if statistics == "kl":
                prev = 1.0 - b2 ** jnp.maximum(t, 1).astype(stats_dtype)
                bases = dense(plan, roots)
                new = kr.kl_statistics(blocks, stats, bases, t == 0, prev, b2, damping)
            else:
                new = kr.shampoo_statistics(blocks, stats, b2)
            stats = keep(new, stats)
            if stagger:
                do_refresh = (t >= start) & finite
            else:
                do_refresh = (t >= start) & ((t - start) % k == 0) & finite
            roots, failed = jax.lax.cond(
                do_refresh,
                lambda: refresh(plan, stats, roots, failed, t),
                lambda: (roots, failed),
            )

        # The graft's direction on every leaf.
        nus = [None] * len(leaves) if state.graft_nu is None else jax.tree.leaves(state.graft_nu)
        grafted = [
            graft_step(graft, g, nu, fcount, b2, eps) for g, nu in zip(grads, nus, strict=True)
        ]
        directions = [a for a, _ in grafted]
        graft_nu = None
        if state.graft_nu is not None:
            graft_nu = keep(treedef.unflatten([nu for _, nu in grafted]), state.graft_nu)

        # Shampoo's direction on the blocks, with the graft's per-block norm.
        if plan.num_factors:
            graft_blocks = kr.pad_blocks(kr.to_blocks(plan, directions, stats_dtype))
            mats = dense(plan, roots)
            if statistics == "kl":
                raw = kl_precondition(blocks, stats, mats, stats_correction)
            else:
                raw = [
                    kr.precondition(g, lft, rgt) for g, (lft, rgt) in zip(blocks, mats, strict=True)
                ]
            pre = []
            for p, a in zip(raw, graft_blocks, strict=True):
                if graft != "none":
                    pn = kr.block_norms(p)
                    p = p * jnp.where(pn > 0, kr.block_norms(a) / jnp.where(pn > 0, pn, 1), 0)
                pre.append(p)
            # Only the preconditioned blocks travel: gathered to rebuild the leaves.
            shampoo_leaves = kr.from_blocks(plan, gather_rows(pre), directions)
            active = t >= (start + (k - 1 if stagger else 0))
            directions = [
                jnp.where(active, s, a) for s, a in zip(shampoo_leaves, directions, strict=True)
            ]

        # Momentum (EMA, bias-corrected) on the combined direction.
        mu_old = jax.tree.leaves(state.mu)
        mu = [b1 * m + (1.0 - b1) * d for m, d in zip(mu_old, directions, strict=True)]
        if nesterov:
            out = [b1 * m + (1.0 - b1) * d for m, d in zip(mu, directions, strict=True)]
        else:
            out = mu
        correction = 1.0 - b1**fcount
        new_updates = treedef.unflatten(
            [(o / correction).astype(g.dtype) for o, g in zip(out, leaves, strict=True)]
        )
        new_state = ScaleByShampooState(
            count=count,
            stats=stats,
            roots=roots,
            graft_nu=graft_nu,
            mu=keep(treedef.unflatten(mu), state.mu),
            num_failed_roots=failed,
            num_nonfinite=state.num_nonfinite + (~finite).astype(jnp.int32),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    *,
    block_size: int | None = None,
    precondition_every: int | None = None,
    start_preconditioning_step: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    damping: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Any = None,
    exponent: float | None = None,
    one_sided: bool = False,
    graft: str | None = None,
    nesterov: bool = False,
    max_precondition_dim: int | None = None,
    stagger: bool = False,
    statistics: str = "shampoo",
    root_method: str = "eigh",
    precondition_bits: int | None = None,
    stats_dtype: Any = "float32",
) -> optax.GradientTransformationExtraArgs:
    """Shampoo with Adam grafting: ``chain(scale_by_shampoo, add_decayed_weights,
    scale_by_learning_rate)``. See :func:`scale_by_shampoo` and the module docstring.

    Args:
      learning_rate: a number or an optax schedule.
      weight_decay: decoupled weight decay, added to the preconditioned update before the
        learning rate scales it.
      mask: which leaves get the weight decay, as in ``optax.adamw``: a pytree of bools
        with the structure of (a prefix of) the parameters, or a function ``params ->``
        such a tree; None: every leaf (static).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxopt2
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
      >>> w_true = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
      >>> loss_fn = lambda w: 0.5 * jnp.mean((x @ w - x @ w_true) ** 2)
      >>> opt = jaxopt2.shampoo(0.1, precondition_every=5)
      >>> w = jnp.zeros((8, 4)); state = opt.init(w)
      >>> @jax.jit
      ... def step(w, state):
      ...     updates, state = opt.update(jax.grad(loss_fn)(w), state, w)
      ...     return optax.apply_updates(w, updates), state
      >>> for _ in range(200):
      ...     w, state = step(w, state)
      >>> bool(loss_fn(w) < 1e-3)
      True
    """
    check_learning_rate(learning_rate, "shampoo")
    check_number(weight_decay, "weight_decay", low=0.0, schedule=True)
    return optax.chain(
        scale_by_shampoo(
            block_size=block_size,
            precondition_every=precondition_every,
            start_preconditioning_step=start_preconditioning_step,
            b1=b1,
            b2=b2,
            eps=eps,
            damping=damping,
            exponent=exponent,
            one_sided=one_sided,
            graft=graft,
            nesterov=nesterov,
            max_precondition_dim=max_precondition_dim,
            stagger=stagger,
            statistics=statistics,
            root_method=root_method,
            precondition_bits=precondition_bits,
            stats_dtype=stats_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


registry.register(
    "shampoo",
    shampoo,
    static_args=(
        "mask",
        "block_size",
        "precondition_every",
        "start_preconditioning_step",
        "exponent",
        "one_sided",
        "graft",
        "nesterov",
        "max_precondition_dim",
        "stagger",
        "statistics",
        "root_method",
        "precondition_bits",
        "stats_dtype",
    ),
)
