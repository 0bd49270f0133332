"""SOAP against a dense float64 reference, its refresh, and its failure policy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt2
from tests.optimizers.nonfinite import check_nonfinite_step_keeps_state

pytestmark = pytest.mark.timeout(240)

# eps large enough that the arbitrary null-space basis of the early rank-deficient factors
# (G is 7x3: GGᵀ has rank 3) contributes ~1e-13, not 1e-7: the reference is then well posed.
B1, B2, EPS = 0.9, 0.8, 1e-3
SHAPES = {"a": (7, 3), "b": (4, 6), "v": (5,)}  # factors 7, 3, 4, 6: padded to 7
# Subspace iteration from a basis with (near-)null columns depends on the order of ties at
# rounding level: the QR refresh is compared where every factor has full rank from step 1.
SQUARE = {"a": (7, 7), "b": (3, 3), "c": (5, 5), "v": (5,)}


def _reference(grads_per_step, refresh="qr"):
    """SOAP with bases refreshed every step (eigh first, then sort + one QR step), in numpy."""
    state, outs = {}, []
    for t, grads in enumerate(grads_per_step, start=1):
        out = {}
        c1, c2 = 1 - B1**t, 1 - B2**t
        for name, g in grads.items():
            s = state.setdefault(name, {"m": np.zeros_like(g), "v": np.zeros_like(g)})
            s["m"] = B1 * s["m"] + (1 - B1) * g
            if g.ndim == 1:
                s["v"] = B2 * s["v"] + (1 - B2) * g**2
                out[name] = (s["m"] / c1) / (np.sqrt(s["v"] / c2) + EPS)
                continue
            s["L"] = B2 * s.get("L", 0.0) + (1 - B2) * g @ g.T
            s["R"] = B2 * s.get("R", 0.0) + (1 - B2) * g.T @ g
            new = []
            for side in ("L", "R"):
                if t == 1 or refresh == "eigh":
                    q = np.linalg.eigh(s[side])[1][:, ::-1]
                else:
                    old = s["Q" + side]
                    order = np.argsort(-np.diag(old.T @ s[side] @ old))
                    q = np.linalg.qr(s[side] @ old[:, order])[0]
                new.append(q)
            if t > 1:
                o_l, o_r = new[0].T @ s["QL"], new[1].T @ s["QR"]
                s["v"] = (o_l**2) @ s["v"] @ (o_r**2).T
            s["QL"], s["QR"] = new
            rot = lambda x, s=s: s["QL"].T @ x @ s["QR"]
            s["v"] = B2 * s["v"] + (1 - B2) * rot(g) ** 2
            step = (rot(s["m"]) / c1) / (np.sqrt(s["v"] / c2) + EPS)
            out[name] = s["QL"] @ step @ s["QR"].T
        outs.append(out)
    return outs


@pytest.mark.parametrize(("refresh", "shapes"), [("qr", SQUARE), ("eigh", SHAPES)])
def test_three_steps_match_dense_reference(refresh, shapes):
    rng = np.random.default_rng(0)
    grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(3)]
    opt = jaxopt2.scale_by_soap(
        b1=B1, b2=B2, eps=EPS, precondition_every=1, refresh=refresh, stats_dtype=jnp.float64
    )
    params = {k: jnp.zeros(s, jnp.float64) for k, s in shapes.items()}
    state = opt.init(params)
    # one (left, right) pair of bases per matrix, each at its own factor size
    sides = [side.shape for side in jax.tree.leaves(state.bases)]
    assert sides == [(1, d, d) for k, s in shapes.items() if len(s) == 2 for d in s]
    update = jax.jit(opt.update)
    ref = _reference(grads, refresh)
    for t, g in enumerate(grads):
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        for name in shapes:
            np.testing.assert_allclose(u[name], ref[t][name], rtol=1e-7, atol=1e-9, err_msg=name)
    # Not Adam: the rotation changes the step.
    adam = optax.scale_by_adam(b1=B1, b2=B2, eps=EPS)
    s = adam.init(params)
    for g in grads:
        a, s = adam.update({k: jnp.asarray(v) for k, v in g.items()}, s)
    assert not np.allclose(a["a"], ref[-1]["a"], atol=1e-3)
    np.testing.assert_allclose(a["v"], ref[-1]["v"], rtol=1e-9)


def test_bases_are_orthonormal_after_refreshes():
    rng = np.random.default_rng(1)
    params = {"w": jnp.zeros((20, 9)), "b": jnp.zeros((9, 3))}
    opt = jaxopt2.scale_by_soap(precondition_every=2, block_size=16)
    state = opt.init(params)
    for _ in range(6):
        grads = jax.tree.map(
            lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params
        )
        _, state = opt.update(grads, state, params)
    for q in jax.tree.leaves(state.bases):  # w: 16x9 and 4x9 blocks; b: 9x3
        q = np.asarray(q, np.float64)
        eye = np.broadcast_to(np.eye(q.shape[-1]), q.shape)
        np.testing.assert_allclose(np.swapaxes(q, -1, -2) @ q, eye, atol=1e-5)
    assert int(state.num_failed_refreshes) == 0


def test_nan_gradient_leaves_the_state_unpoisoned():
    check_nonfinite_step_keeps_state(jaxopt2.scale_by_soap(precondition_every=1), jnp.inf)


@pytest.mark.parametrize(
    "kwargs", [{}, {"statistics": "kl"}, {"refresh": "eigh"}, {"one_sided": True}]
)
def test_variants_solve_a_matrix_regression(kwargs):
    x = jax.random.normal(jax.random.PRNGKey(0), (96, 12)) * jnp.geomspace(0.2, 3.0, 12)
    w_true = jax.random.normal(jax.random.PRNGKey(1), (12, 5))
    loss = lambda w: 0.5 * jnp.mean((x @ w - x @ w_true) ** 2)
    opt = jaxopt2.soap(0.03, precondition_every=5, **kwargs)

    @jax.jit
    def run(w):
        def body(carry, _):
            w, s = carry
            u, s = opt.update(jax.grad(loss)(w), s, w)
            return (optax.apply_updates(w, u), s), None

        (w, _), _ = jax.lax.scan(body, (w, opt.init(w)), None, length=400)
        return loss(w)

    w0 = jnp.zeros((12, 5))
    assert float(run(w0)) < 1e-3 * float(loss(w0)), kwargs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": -1}, "block_size must be a positive integer"),
        ({"precondition_every": 0}, "precondition_every must be a positive integer"),
        ({"refresh": "power"}, "refresh must be one of"),
        ({"b2": 1.0}, r"b2 must lie in \[0.0, 1.0\)"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxopt2.soap(3e-3, **kwargs)
