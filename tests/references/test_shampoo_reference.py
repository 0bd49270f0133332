"""Shampoo and KL-Shampoo against a numpy float64 reference, whole trajectories.

The reference follows Gupta et al. (2018) with the distributed-Shampoo conventions the
docstrings of :mod:`jaxopt2.optimizers.shampoo` state: EMA factors ``L``, ``R`` per block,
inverse roots ``(X + ε λ_max(X) I)^{-e}`` refreshed every ``precondition_every`` steps from
``start_preconditioning_step`` on, the Shampoo direction rescaled to the graft's per-block
Frobenius norm, and an EMA momentum bias-corrected like Adam's first moment (Nesterov: the
new momentum mixed once more with the direction). KL-Shampoo (Lin et al., 2025) estimates
each factor whitened by the inverse of the other, taken in the eigenbasis of the latest
refresh with eigenvalues re-estimated from the bias-corrected statistics.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt2
from tests.references.common import assert_paths_close, library_path

pytestmark = pytest.mark.timeout(120)

LR = 0.05


def _problem(shapes, seed=0):
    """A least-squares loss per leaf with a tanh kink (the curvature changes along the path)."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    targets = {k: rng.normal(size=s) for k, s in shapes.items()}
    scales = {k: rng.uniform(0.5, 2.0, size=s) for k, s in shapes.items()}

    def loss_fn(p):
        return sum(
            jnp.sum(scales[k] * (jnp.tanh(p[k]) - targets[k]) ** 2 + 0.1 * p[k] ** 2)
            for k in shapes
        )

    grad = jax.jit(jax.grad(loss_fn))
    return params, loss_fn, lambda p: {k: np.asarray(v) for k, v in grad(p).items()}


def _blocks(shape, block_size):
    """Row-major ``(row slice, column slice)`` of a matrix leaf's blocks."""
    r, c = shape
    return [
        (slice(i, min(i + block_size, r)), slice(j, min(j + block_size, c)))
        for i in range(0, r, block_size)
        for j in range(0, c, block_size)
    ]


def _inverse_root(x, exponent, damping):
    w, v = np.linalg.eigh(x)
    w = np.maximum(w, 0.0) + damping * w.max()
    return (v * w**-exponent) @ v.T


def _graft(kind, g, nu, step, b2, eps):
    """The diagonal method's direction and its new second moment (step counts from 1)."""
    if kind in ("sgd", "none"):
        return g, nu
    if kind == "adagrad":
        nu = nu + g * g
        return g / (np.sqrt(nu) + eps), nu
    nu = b2 * nu + (1 - b2) * g * g
    denom = nu / (1 - b2**step) if kind == "adam" else nu
    return g / (np.sqrt(denom) + eps), nu


def _kl_inverse_power(q, stat, power, damping):
    """``Q diag(d^power) Qᵀ`` with ``d`` the (damped) diagonal of ``Qᵀ stat Q``."""
    d = np.maximum(np.diag(q.T @ stat @ q), 0.0)
    d = d + max(damping * d.max(), np.finfo(np.float64).tiny)
    return (q * d**power) @ q.T


def factor_statistics(gb, left, right, bases, t, b2, damping, statistics):
    """One step of a block's factor EMAs ``(L, R)``: Shampoo's ``G Gᵀ``, ``Gᵀ G``, or
    KL-Shampoo's ``G R⁻¹ Gᵀ / c``, ``Gᵀ L⁻¹ G / r`` (each side whitened by the other's
    bias-corrected inverse in its stored eigenbasis; scalar inverses with
    ``tr(L) tr(R) = ‖G‖²`` at the first step, when there are no factors yet)."""
    r, c = gb.shape
    if statistics != "kl":
        return b2 * left + (1 - b2) * gb @ gb.T, b2 * right + (1 - b2) * gb.T @ gb
    ql, qr = bases
    if t == 0:
        r_inv = c / np.linalg.norm(gb) * np.eye(c)
        l_inv = r / np.linalg.norm(gb) * np.eye(r)
    else:
        corr = 1 - b2**t
        r_inv = _kl_inverse_power(qr, right / corr, -1.0, damping)
        l_inv = _kl_inverse_power(ql, left / corr, -1.0, damping)
    return (
        b2 * left + (1 - b2) * gb @ r_inv @ gb.T / c,
        b2 * right + (1 - b2) * gb.T @ l_inv @ gb / r,
    )


def reference_shampoo(params, grad_fn, steps, *, block_size, every, start, b1, b2, eps,
                      damping, graft, nesterov, statistics="shampoo"):  # fmt: skip
    """The parameters after each step (a list of dicts), plain numpy float64."""
    e = 0.5 if statistics == "kl" else 0.25
    p = {k: v.copy() for k, v in params.items()}
    blocks = {k: _blocks(v.shape, block_size) for k, v in p.items() if v.ndim == 2}
    stats = {(k, i): [0.0, 0.0] for k in blocks for i in range(len(blocks[k]))}
    # Shampoo: inverse roots; KL: eigenbases (the identity until the first refresh)
    roots = {
        key: [np.eye(blocks[key[0]][key[1]][0].stop - blocks[key[0]][key[1]][0].start),
              np.eye(blocks[key[0]][key[1]][1].stop - blocks[key[0]][key[1]][1].start)]
        for key in stats
    }  # fmt: skip
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    path = []
    for t in range(steps):
        n = t + 1
        g = grad_fn(p)
        direction = {}
        for k in p:
            direction[k], nu[k] = _graft(graft, g[k], nu[k], n, b2, eps)
        refresh = t >= start and (t - start) % every == 0
        for k, bl in blocks.items():
            pre = np.zeros_like(g[k])
            for i, (rs, cs) in enumerate(bl):
                gb = g[k][rs, cs]
                left, right = factor_statistics(
                    gb, *stats[(k, i)], roots.get((k, i)), t, b2, damping, statistics
                )
                stats[(k, i)] = [left, right]
                if refresh:
                    if statistics == "kl":
                        roots[(k, i)] = [np.linalg.eigh(left)[1], np.linalg.eigh(right)[1]]
                    else:
                        roots[(k, i)] = [
                            _inverse_root(left, e, damping),
                            _inverse_root(right, e, damping),
                        ]
                ml, mr = roots[(k, i)]
                if statistics == "kl":
                    corr = 1 - b2**n
                    ml = _kl_inverse_power(ml, left / corr, -0.5, damping)
                    mr = _kl_inverse_power(mr, right / corr, -0.5, damping)
                blk = ml @ gb @ mr
                if graft != "none":
                    blk = blk * np.linalg.norm(direction[k][rs, cs]) / np.linalg.norm(blk)
                pre[rs, cs] = blk
            if t >= start:
                direction[k] = pre
        for k in p:
            mu[k] = b1 * mu[k] + (1 - b1) * direction[k]
            out = b1 * mu[k] + (1 - b1) * direction[k] if nesterov else mu[k]
            p[k] = p[k] - LR * out / (1 - b1**n)
        path.append({k: v.copy() for k, v in p.items()})
    return path


SHAPES = {"w": (5, 4), "v": (6, 3), "b": (4,)}


@pytest.mark.parametrize(
    "graft, nesterov, every, start",
    [
        ("adam", True, 2, 2),
        ("rmsprop", False, 3, 1),
        ("adagrad", True, 2, 2),
        ("sgd", False, 2, 2),
        ("none", True, 3, 1),
    ],
)
def test_shampoo_path_with_momentum_grafting_and_refreshes(graft, nesterov, every, start):
    """Five steps with b1 > 0 (its bias correction, Nesterov or not), every graft, blocks of
    two shapes (``v`` is cut 4 + 2 rows), graft-only steps before the start, refreshes and
    steps on stale roots in between (every 2 from step 2: refreshes at steps 2 and 4; every 3
    from step 1: at steps 1 and 4, counting from 0)."""
    params, loss_fn, grad_fn = _problem(SHAPES, seed=every)
    kw = dict(block_size=4, b1=0.8, b2=0.9, eps=1e-3, damping=1e-2, graft=graft,
              nesterov=nesterov)  # fmt: skip
    want = reference_shampoo(params, grad_fn, 5, every=every, start=start, **kw)
    opt = jaxopt2.shampoo(
        LR, precondition_every=every, start_preconditioning_step=start, stats_dtype=jnp.float64,
        **kw,
    )  # fmt: skip
    assert_paths_close(library_path(opt, loss_fn, params, 5), want)


def test_kl_shampoo_path():
    """KL statistics over four steps: the first with scalar inverses, then whitened in the
    identity basis (before the first refresh) and in refreshed eigenbases (steps 1 and 3,
    counting from 0). The factors are full rank at every refresh (a 3 × 3 and a 2 × 3 block),
    so the eigenbases are unique up to signs; the 2 × 3 block tells ``r`` from ``c``.
    KL-Shampoo's default graft is ``"none"``: the raw KL direction."""
    params, loss_fn, grad_fn = _problem({"w": (3, 3), "v": (2, 3), "b": (3,)}, seed=2)
    kw = dict(block_size=3, b1=0.6, b2=0.8, eps=1e-3, damping=1e-3)
    want = reference_shampoo(
        params, grad_fn, 4, every=2, start=1, statistics="kl", graft="none", nesterov=False, **kw
    )
    opt = jaxopt2.shampoo(
        LR, precondition_every=2, start_preconditioning_step=1, statistics="kl",
        stats_dtype=jnp.float64, **kw,
    )  # fmt: skip
    assert_paths_close(library_path(opt, loss_fn, params, 4), want)
