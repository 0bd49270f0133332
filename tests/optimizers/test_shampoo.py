"""Shampoo against dense float64 references, its graft, its variants and its failure policy."""

import itertools
import math
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt2
from jaxopt2.optimizers import _kronecker as kr
from tests.hang_check import run_without_xla_flag
from tests.optimizers.nonfinite import check_nonfinite_step_keeps_state

pytestmark = pytest.mark.timeout(240)


# ------------------------------------------------------------------------------------------
# A naive reference: loops over blocks, numpy eigh in float64.
# ------------------------------------------------------------------------------------------


def _matrix_view(shape):
    dims = [d for d in shape if d != 1]
    if len(dims) < 2:
        return None
    splits = [(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, len(dims))]
    return min(splits, key=max)  # the first most balanced split


def _root(x, p, damping):
    w, v = np.linalg.eigh(x)
    w = np.maximum(w, 0.0) + damping * w.max()
    return (v * w ** (-1.0 / p)) @ v.T


def _reference_steps(grads_per_step, block_size, b2, damping, p=4):
    """Shampoo updates with SGD grafting, no momentum, roots refreshed every step from step 0.

    Returns the update of the last step, per leaf (dict like the gradients).
    """
    stats = {}
    for grads in grads_per_step:
        out = {}
        for name, g in grads.items():
            view = _matrix_view(g.shape)
            if view is None:
                out[name] = g  # SGD graft on scalars and vectors
                continue
            m = g.reshape(view)
            u = np.zeros_like(m)
            for i, j in itertools.product(
                range(0, view[0], block_size), range(0, view[1], block_size)
            ):
                blk = m[i : i + block_size, j : j + block_size]
                left, right = stats.get((name, i, j), (0.0, 0.0))
                left = b2 * left + (1 - b2) * blk @ blk.T
                right = b2 * right + (1 - b2) * blk.T @ blk
                stats[(name, i, j)] = (left, right)
                pre = _root(left, p, damping) @ blk @ _root(right, p, damping)
                u[i : i + block_size, j : j + block_size] = (
                    pre * np.linalg.norm(blk) / np.linalg.norm(pre)
                )
            out[name] = u.reshape(g.shape)
    return out


SHAPES = {
    "scalar": (),
    "vector": (5,),
    "matrix": (11, 6),  # blocks of 4: full, right edge, bottom edge, corner
    "rank3": (3, 1, 5, 7),  # a size-1 dim dropped, viewed 15 x 7
    "rank4": (2, 3, 4, 5),  # viewed 6 x 20
}


def _grads(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def test_matrix_view_and_blocks_round_trip_for_ranks_0_to_4():
    shapes = [(), (7,), (1, 9), (11, 6), (130, 270), (3, 1, 5, 7), (2, 3, 4, 5), (3, 3, 16, 32)]
    plan = kr.make_plan(shapes, block_size=64, max_precondition_dim=1000)
    assert [v.matrix for v in plan.leaves] == [_matrix_view(s) for s in shapes]
    assert plan.leaves[3].matrix == (11, 6) and plan.leaves[7].matrix == (144, 32)
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(rng.standard_normal(s)) for s in shapes]
    blocks = kr.to_blocks(plan, leaves, jnp.float64)
    assert sum(b.shape[0] for b in blocks) == plan.num_blocks
    # 130 x 270 in blocks of 64: 3 block rows (64, 64, 2) x 5 block columns (64 x 4, 14).
    assert sum(r.n_rows * r.n_cols for r in plan.leaves[4].regions) == 15
    back = kr.from_blocks(plan, blocks, leaves)
    for x, y in zip(leaves, back, strict=True):
        assert x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Block contents, not just the round trip: the first block of the 130 x 270 leaf.
    first = blocks[plan.leaves[4].regions[0].group][plan.leaves[4].regions[0].offset]
    np.testing.assert_array_equal(np.asarray(first), np.asarray(leaves[4])[:64, :64])


def test_two_steps_match_dense_reference_on_odd_shapes():
    opt = jaxopt2.scale_by_shampoo(
        block_size=4,
        precondition_every=1,
        start_preconditioning_step=0,
        b1=0.0,
        b2=0.9,
        damping=1e-4,
        graft="sgd",
        stats_dtype=jnp.float64,
    )
    g1, g2 = _grads(1), _grads(2)
    params = {k: jnp.zeros(s, jnp.float64) for k, s in SHAPES.items()}
    state = opt.init(params)
    _, state = opt.update({k: jnp.asarray(v) for k, v in g1.items()}, state, params)
    u, state = jax.jit(opt.update)({k: jnp.asarray(v) for k, v in g2.items()}, state, params)
    ref = _reference_steps([g1, g2], block_size=4, b2=0.9, damping=1e-4)
    for name in SHAPES:
        np.testing.assert_allclose(np.asarray(u[name]), ref[name], rtol=1e-9, atol=1e-12)
    # The reference is sensitive to the preconditioner: SGD alone is far from it.
    assert np.linalg.norm(ref["matrix"] - g2["matrix"]) > 0.1 * np.linalg.norm(g2["matrix"])
    assert int(state.num_failed_roots) == 0


def test_exponent_and_one_sided_match_reference():
    g = np.random.default_rng(3).standard_normal((6, 9))
    opt = jaxopt2.scale_by_shampoo(
        block_size=16,
        precondition_every=1,
        start_preconditioning_step=0,
        b1=0.0,
        b2=0.5,
        damping=1e-3,
        graft="sgd",
        one_sided=True,
        stats_dtype=jnp.float64,
    )
    u, _ = opt.update(jnp.asarray(g), opt.init(jnp.zeros((6, 9))), None)
    pre = _root(0.5 * g @ g.T, 2, 1e-3) @ g  # the smaller (left) side, exponent 1/2
    np.testing.assert_allclose(np.asarray(u), pre * np.linalg.norm(g) / np.linalg.norm(pre), 1e-9)


def test_identity_statistics_reduce_to_the_graft():
    """With G ∝ an orthogonal matrix, L and R are ∝ I: Shampoo's direction is G itself, so the
    SGD graft returns G and the Adam graft returns G with the norm of Adam's step."""
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 6)))
    grads = {"w": jnp.asarray(3.0 * q), "b": jnp.asarray(np.linspace(-1.0, 1.0, 6))}
    params = jax.tree.map(jnp.zeros_like, grads)
    common = dict(
        precondition_every=1, start_preconditioning_step=0, b1=0.0, stats_dtype=jnp.float64
    )
    sgd = jaxopt2.scale_by_shampoo(graft="sgd", **common)
    u, _ = sgd.update(grads, sgd.init(params), params)
    np.testing.assert_allclose(u["w"], grads["w"], rtol=1e-9)
    np.testing.assert_allclose(u["b"], grads["b"], rtol=0, atol=0)

    adam_dir, _ = optax.scale_by_adam(b1=0.0, b2=0.999, eps=1e-8).update(
        grads, optax.scale_by_adam(b1=0.0).init(params)
    )
    shampoo_adam = jaxopt2.scale_by_shampoo(graft="adam", b2=0.999, eps=1e-8, **common)
    u, _ = shampoo_adam.update(grads, shampoo_adam.init(params), params)
    w_norm = np.linalg.norm(adam_dir["w"])
    np.testing.assert_allclose(u["w"], grads["w"] * w_norm / np.linalg.norm(grads["w"]), rtol=1e-9)
    np.testing.assert_allclose(u["b"], adam_dir["b"], rtol=1e-12)
    # Adam's own direction differs from G's direction (elementwise scaling): the test can tell.
    assert not np.allclose(adam_dir["w"] / w_norm, grads["w"] / np.linalg.norm(grads["w"]))


# ------------------------------------------------------------------------------------------
# Variants: every one trains a matrix least-squares problem.
# ------------------------------------------------------------------------------------------


def _regression():
    x = jax.random.normal(jax.random.PRNGKey(0), (96, 12))
    x = x * jnp.geomspace(0.2, 3.0, 12)  # ill-conditioned inputs
    w_true = jax.random.normal(jax.random.PRNGKey(1), (12, 5))
    params = {"w": jnp.zeros((12, 5), jnp.float32), "b": jnp.zeros(5, jnp.float32)}
    loss = lambda p, x: 0.5 * jnp.mean(jnp.sum((x @ p["w"] + p["b"] - x @ w_true - 1.0) ** 2, -1))
    return params, loss, x


def _train(opt, steps):
    params, loss, x = _regression()

    @jax.jit
    def run(params, x):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p, x)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
        return loss(params, x), loss(p, x), p, s

    return run(params, x)


VARIANTS = {
    "default": {},
    "stagger": {"stagger": True},
    "one_sided": {"one_sided": True},
    "exponent_half": {"exponent": 0.5},
    "kl": {"statistics": "kl"},
    "newton": {"root_method": "newton"},
    "rmsprop": {"graft": "rmsprop"},
    "adagrad": {"graft": "adagrad", "learning_rate": 0.3},
    "sgd_graft": {"graft": "sgd", "learning_rate": 0.03},
    "nesterov": {"nesterov": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_solve_a_matrix_regression(variant):
    kwargs = {"learning_rate": 0.05, "precondition_every": 5, **VARIANTS[variant]}
    f0, f, _, state = _train(jaxopt2.shampoo(**kwargs), 400)
    assert float(f) < 1e-3 * float(f0), (variant, float(f0), float(f))
    assert int(state[0].num_failed_roots) == 0


def test_eigh_and_newton_roots_give_the_same_training():
    # float64 statistics: in float32 the two roots of the early, nearly rank-deficient
    # factors differ at the 1e-3 level (see test_roots.py), which training then carries.
    common = {"learning_rate": 0.05, "precondition_every": 3, "stats_dtype": jnp.float64}
    *_, p_eigh, _ = _train(jaxopt2.shampoo(**common), 30)
    *_, p_newton, _ = _train(jaxopt2.shampoo(root_method="newton", **common), 30)
    np.testing.assert_allclose(p_newton["w"], p_eigh["w"], rtol=1e-5, atol=1e-6)
    *_, p_sgd, _ = _train(optax.adam(0.05), 30)
    assert not np.allclose(p_sgd["w"], p_eigh["w"], rtol=1e-2, atol=1e-3)


def _root_list(state):
    """Every factor's root as a matrix, in factor order (group by group, left then right)."""
    return [r for side in jax.tree.leaves(state.roots) for r in np.asarray(side)]


def _left(g):
    return g @ g.T


def _right(g):
    return g.T @ g


def _inverse_fourth_root(x):
    """``(x + 1e-6 λ_max I)^{-1/4}`` in float64 (shampoo's default relative damping)."""
    w, v = np.linalg.eigh(x)
    return (v * (w + 1e-6 * w.max()) ** -0.25) @ v.T


def test_stagger_refreshes_a_slice_per_step():
    params = {"a": jnp.zeros((8, 8)), "b": jnp.zeros((8, 4)), "c": jnp.zeros((4, 8))}
    opt = jaxopt2.scale_by_shampoo(
        block_size=8,
        precondition_every=3,
        start_preconditioning_step=1,
        stagger=True,
        stats_dtype=jnp.float64,  # roots of rank-deficient factors compared to 1e-6
    )
    state = opt.init(params)
    # 6 factors (a: 8, 8; b: 8, 4; c: 4, 8), refreshed in 3 slices of 2
    assert [len(r) for r in _root_list(state)] == [8, 8, 8, 4, 4, 8]
    rng = np.random.default_rng(0)
    stats = [np.zeros((d, d)) for d in (8, 8, 8, 4, 4, 8)]  # float64 reference statistics
    expected = [np.eye(d) for d in (8, 8, 8, 4, 4, 8)]
    # Step 0 is before the start; steps 1, 2, 3 refresh factors 0-1, 2-3, 4-5, each from the
    # statistics of its own step; the others keep what they had (identity before their turn).
    slices = {0: (), 1: (0, 1), 2: (2, 3), 3: (4, 5)}
    for step in range(4):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
        _, state = opt.update(grads, state, params)
        factors = [f(np.asarray(grads[k])) for k in "abc" for f in (_left, _right)]
        stats = [0.999 * s + 0.001 * f for s, f in zip(stats, factors, strict=True)]
        for i in slices[step]:
            expected[i] = _inverse_fourth_root(stats[i])
        for i, (root, want) in enumerate(zip(_root_list(state), expected, strict=True)):
            np.testing.assert_allclose(root, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(),
                                       err_msg=f"step {step}, factor {i}")  # fmt: skip
    txt = jax.jit(opt.update).lower(params, state, params).compile().as_text()
    eighs = [line for line in txt.splitlines() if re.search(r"custom_call_target=\"\w*syevd", line)]
    assert len(eighs) == 1 and "(f64[2,8,8]" in eighs[0], eighs  # one slice of 2 factors


# ------------------------------------------------------------------------------------------
# Failure policy.
# ------------------------------------------------------------------------------------------


def test_nan_gradient_leaves_the_preconditioner_unpoisoned():
    opt = jaxopt2.scale_by_shampoo(precondition_every=1, start_preconditioning_step=0)
    check_nonfinite_step_keeps_state(opt, jnp.nan)


def test_failed_root_keeps_previous_and_is_counted():
    opt = jaxopt2.scale_by_shampoo(precondition_every=1, start_preconditioning_step=0)
    params = {"dead": jnp.zeros((4, 4)), "live": jnp.zeros((4, 4))}
    grads = {
        "dead": jnp.zeros((4, 4)),
        "live": jnp.asarray(np.random.default_rng(1).standard_normal((4, 4)), jnp.float32),
    }
    u, state = opt.update(grads, opt.init(params), params)
    # The zero statistics of "dead" have no root: its two factors keep the identity.
    assert int(state.num_failed_roots) == 2
    assert sum(np.allclose(r, np.eye(4)) for r in _root_list(state)) == 2
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    np.testing.assert_array_equal(np.asarray(u["dead"]), 0.0)


# ------------------------------------------------------------------------------------------
# The jax 0.10 CPU deadlock: safe by construction.
# ------------------------------------------------------------------------------------------

MIXED = {
    "w1": (64, 300),  # blocks 64x128 and 64x44: factors 64, 128, 44
    "w2": (200, 32),  # blocks 128x32 and 72x32
    "conv": (3, 3, 8, 16),
    "b": (16,),
}


def test_one_eigh_per_refresh_whatever_the_shapes():
    params = {k: jnp.zeros(s) for k, s in MIXED.items()}
    opt = jaxopt2.shampoo(1e-3, precondition_every=1)
    txt = jax.jit(opt.update).lower(params, opt.init(params), params).compile().as_text()
    assert len(re.findall(r"custom_call_target=\"\w*syevd", txt)) == 1


_HANG_CHECK = textwrap.dedent(
    """
    import jax  # imported before jaxopt2, no XLA_FLAGS: the library must be safe by itself
    import jax.numpy as jnp
    import optax
    import jaxopt2

    shapes = {shapes!r}
    params = {{k: jnp.full(s, 0.1) for k, s in shapes.items()}}
    failed = 0
    for opt in (jaxopt2.shampoo(1e-3, precondition_every=1, start_preconditioning_step=0),
                jaxopt2.soap(1e-3, precondition_every=2)):

        @jax.jit
        def step(params, state, i):
            wave = lambda p: jnp.sin(p * (i + 1.0) + jnp.arange(p.size).reshape(p.shape))
            grads = jax.tree.map(wave, params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        p, state = params, opt.init(params)
        for i in range(20):
            p, state = step(p, state, i)
        jax.block_until_ready(p)
        failed += int(state[0][-2])  # num_failed_roots / num_failed_refreshes
    print("finished", failed)
    """
)


def test_jitted_refresh_does_not_hang_without_the_xla_flag():
    code = _HANG_CHECK.format(shapes=MIXED)
    for out in run_without_xla_flag(code, "a jitted Shampoo/SOAP refresh"):
        assert "finished 0" in out


# ------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"precondition_every": 0}, "precondition_every must be a positive integer"),
        ({"precondition_every": 2.5}, "precondition_every must be a positive integer"),
        ({"exponent": 0.0}, r"exponent must lie in \(0.0, 1.0\]"),
        ({"exponent": 1.5}, r"exponent must lie in \(0.0, 1.0\]"),
        ({"exponent": 0.3, "root_method": "newton"}, "integer p for root_method='newton'"),
        ({"graft": "adamw"}, "graft must be one of"),
        ({"statistics": "kl", "exponent": 0.25}, "statistics='kl' uses the exponent 1/2"),
        ({"root_method": "svd"}, "root_method must be one of"),
        ({"damping": -1.0}, r"damping must lie in \[0.0, inf\]"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxopt2.shampoo(1e-3, **kwargs)
