"""SOAP and KL-SOAP against a numpy float64 reference, whole trajectories.

The reference follows Vyas et al. (2024) with the conventions of
:mod:`jaxopt2.optimizers.soap`'s docstring: EMA factors ``L``, ``R`` per block; Adam's first
moment in the parameter basis and its second moment in the eigenbasis; the bases refreshed
every ``precondition_every`` steps from step 0, the first time by a full eigendecomposition,
later by one step of subspace iteration from the previous basis (columns sorted by their
Rayleigh quotients, descending, then QR of ``L Q``); on a refresh the second moment carried
into the new basis as ``(O_L ∘ O_L) V (O_R ∘ O_R)ᵀ`` with ``O = Q_newᵀ Q_old``. The update is
invariant to the signs of the basis columns (numpy's and jax's QR may pick different ones).
KL-SOAP replaces the factor statistics by KL-Shampoo's (see the Shampoo reference).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt2
from tests.references.common import assert_paths_close, library_path
from tests.references.test_shampoo_reference import _blocks, _problem, factor_statistics

pytestmark = pytest.mark.timeout(120)

LR = 0.05


def _descending_eigenbasis(x):
    return np.linalg.eigh(x)[1][:, ::-1]


def _subspace_step(x, q):
    est = np.diag(q.T @ x @ q)
    q = q[:, np.argsort(-est, kind="stable")]
    return np.linalg.qr(x @ q)[0]


def reference_soap(params, grad_fn, steps, *, block_size, every, b1, b2, eps,
                   statistics="shampoo", damping=0.0, shampoo_b2=None):  # fmt: skip
    """The parameters after each step (a list of dicts), plain numpy float64. The factor
    statistics decay with `shampoo_b2` (default `b2`), the eigenbasis moments with `b2`."""
    factor_decay = b2 if shampoo_b2 is None else shampoo_b2
    p = {k: v.copy() for k, v in params.items()}
    blocks = {k: _blocks(v.shape, block_size) for k, v in p.items() if v.ndim == 2}
    keys = [(k, i) for k in blocks for i in range(len(blocks[k]))]
    shape = {(k, i): p[k][blocks[k][i]].shape for k, i in keys}
    stats = {key: [np.zeros((shape[key][0],) * 2), np.zeros((shape[key][1],) * 2)] for key in keys}
    bases = {key: [np.eye(shape[key][0]), np.eye(shape[key][1])] for key in keys}
    v_eig = {key: np.zeros(shape[key]) for key in keys}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items() if v.ndim != 2}
    path = []
    for t in range(steps):
        n = t + 1
        c1, c2 = 1 - b1**n, 1 - b2**n
        g = grad_fn(p)
        for k in p:
            mu[k] = b1 * mu[k] + (1 - b1) * g[k]
        update = {}
        for k in nu:
            nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
            update[k] = (mu[k] / c1) / (np.sqrt(nu[k] / c2) + eps)
        for k, bl in blocks.items():
            update[k] = np.zeros_like(p[k])
            for i, (rs, cs) in enumerate(bl):
                key = (k, i)
                gb = g[k][rs, cs]
                ql, qr = bases[key]
                left, right = factor_statistics(
                    gb, *stats[key], (ql, qr), t, factor_decay, damping, statistics
                )
                stats[key] = [left, right]
                if t % every == 0:
                    if t == 0:
                        nl, nr = _descending_eigenbasis(left), _descending_eigenbasis(right)
                    else:
                        nl, nr = _subspace_step(left, ql), _subspace_step(right, qr)
                    v_eig[key] = (nl.T @ ql) ** 2 @ v_eig[key] @ ((nr.T @ qr) ** 2).T
                    ql, qr = bases[key] = [nl, nr]
                v_eig[key] = b2 * v_eig[key] + (1 - b2) * (ql.T @ gb @ qr) ** 2
                m = ql.T @ mu[k][rs, cs] @ qr
                step = (m / c1) / (np.sqrt(v_eig[key] / c2) + eps)
                update[k][rs, cs] = ql @ step @ qr.T
        for k in p:
            p[k] = p[k] - LR * update[k]
        path.append({k: v.copy() for k, v in p.items()})
    return path


@pytest.mark.parametrize("shampoo_b2", [None, 0.6])
def test_soap_path_through_an_eigh_refresh_and_two_subspace_steps(shampoo_b2):
    """Five steps, bases refreshed at steps 0 (eigh), 2 and 4 (subspace iteration), blocks
    from two leaves (``v`` is cut into two 3 × 3 blocks) and Adam on the vector. Square
    blocks keep the factors full rank, so every basis is unique up to column signs. With
    ``shampoo_b2`` the factors decay at their own rate (and the later bases differ)."""
    params, loss_fn, grad_fn = _problem({"w": (3, 3), "v": (6, 3), "b": (3,)}, seed=3)
    kw = dict(block_size=3, b1=0.8, b2=0.9, eps=1e-3, shampoo_b2=shampoo_b2)
    want = reference_soap(params, grad_fn, 5, every=2, **kw)
    opt = jaxopt2.soap(LR, precondition_every=2, stats_dtype=jnp.float64, **kw)
    assert_paths_close(library_path(opt, loss_fn, params, 5), want)


def test_kl_soap_path():
    """KL-SOAP's statistics over four steps, bases refreshed at steps 0 and 2."""
    params, loss_fn, grad_fn = _problem({"w": (4, 4), "b": (3,)}, seed=4)
    kw = dict(block_size=4, b1=0.7, b2=0.85, eps=1e-3, damping=1e-3)
    want = reference_soap(params, grad_fn, 4, every=2, statistics="kl", **kw)
    opt = jaxopt2.soap(LR, precondition_every=2, statistics="kl", stats_dtype=jnp.float64, **kw)
    assert_paths_close(library_path(opt, loss_fn, params, 4), want)
