"""Curvature products against dense matrices of a small tanh MLP (float64)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxopt2.curvature import fisher_vp, ggn_vp, hessian_operator, hvp, output_loss

pytestmark = pytest.mark.timeout(120)

SIZES = (8, 32, 32, 3)  # 1443 parameters
N = 48
LOSSES = ("softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error")
# The three losses plus softmax cross-entropy against class probabilities.
CASES = (*LOSSES, "softmax_soft_labels")


def _init(rng):
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
        params[f"w{i}"] = jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a))
        params[f"b{i}"] = jnp.asarray(0.1 * rng.standard_normal(b))
    return params


def _apply(params, x):
    h = x
    for i in range(len(SIZES) - 1):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < len(SIZES) - 2:
            h = jnp.tanh(h)
    return h


@jax.jit
def _dense_matrices(params, x, targets):
    """GGN ``Jᵀ H_f J`` and empirical Fisher ``(1/N) Σ g_n g_nᵀ`` for every case, densely."""
    flat, unravel = ravel_pytree(params)
    outputs = _apply(params, x)
    n, c = outputs.shape
    jac = jax.jit(jax.jacobian(lambda f: _apply(unravel(f), x)))(flat).reshape(n * c, -1)
    dense = {}
    for case, y in targets.items():
        loss = "softmax_cross_entropy" if case == "softmax_soft_labels" else case
        h_out = jax.jit(jax.hessian(lambda o: output_loss(loss, o, y)))(outputs).reshape(
            n * c, n * c
        )
        # Per-example gradients of the un-averaged loss (a batch of one), [N, P].
        example_loss = lambda f, xn, yn: output_loss(loss, _apply(unravel(f), xn[None]), yn[None])
        per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(flat, x, y)
        dense[case] = {"ggn": jac.T @ h_out @ jac, "empirical": per_example.T @ per_example / n}
    loss_fn = lambda f: output_loss(
        "softmax_cross_entropy", _apply(unravel(f), x), targets[CASES[0]]
    )
    return jax.jit(jax.hessian(loss_fn))(flat), dense


@pytest.fixture(scope="module")
def problem():
    """The MLP, its data, and every dense matrix the tests compare against (built once)."""
    rng = np.random.default_rng(0)  # NumPy data: no compilations in the setup
    params = _init(rng)
    x = jnp.asarray(rng.standard_normal((N, SIZES[0])))
    c = SIZES[-1]
    logits = rng.standard_normal((N, c))
    targets = {
        "softmax_cross_entropy": jnp.asarray(rng.integers(0, c, N)),
        "softmax_soft_labels": jnp.asarray(np.exp(logits) / np.exp(logits).sum(1, keepdims=True)),
        "sigmoid_cross_entropy": jnp.asarray(rng.uniform(size=(N, c))),
        "squared_error": jnp.asarray(rng.standard_normal((N, c))),
    }
    hessian, dense = jax.tree.map(np.asarray, _dense_matrices(params, x, targets))
    flat, unravel = ravel_pytree(params)
    vs = jnp.asarray(rng.standard_normal((3, flat.size)))
    return {
        "params": params,
        "model": lambda p: _apply(p, x),
        "targets": targets,
        "unravel": unravel,
        "hessian": hessian,
        "dense": dense,
        "flat_vs": np.asarray(vs),
        "vs": jax.vmap(unravel)(vs),
    }


def _flat_rows(tree):
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree))


def _case(problem, case):
    d = problem["dense"][case]
    return d["loss"], problem["targets"][case], d


def test_hvp_and_hessian_operator_match_dense_hessian(problem):
    params, targets = problem["params"], problem["targets"]["softmax_cross_entropy"]
    fn = lambda p: output_loss("softmax_cross_entropy", problem["model"](p), targets)
    want = problem["flat_vs"] @ problem["hessian"]  # H is symmetric: rows of V H = (H v)ᵀ
    got = jax.jit(jax.vmap(lambda v: hvp(fn, params, v)))(problem["vs"])
    np.testing.assert_allclose(_flat_rows(got), want, rtol=1e-10, atol=1e-10)
    op = hessian_operator(fn, params)
    got = jax.jit(jax.vmap(op))(problem["vs"])
    np.testing.assert_allclose(_flat_rows(got), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_ggn_and_fisher_products_match_dense_matrices(problem, case):
    """ggn_vp == Jᵀ H_f J v; exact fisher_vp == ggn_vp; empirical == per-example outer products."""
    loss = "softmax_cross_entropy" if case == "softmax_soft_labels" else case
    y, dense = problem["targets"][case], problem["dense"][case]
    model, params = problem["model"], problem["params"]

    @jax.jit
    @jax.vmap
    def products(v):
        return (
            ggn_vp(model, lambda o: output_loss(loss, o, y), params, v),
            fisher_vp(model, params, v, loss=loss, kind="exact"),
            fisher_vp(model, params, v, loss=loss, kind="empirical", targets=y),
        )

    ggn, exact, empirical = (_flat_rows(t) for t in products(problem["vs"]))
    want_ggn = problem["flat_vs"] @ dense["ggn"]
    np.testing.assert_allclose(ggn, want_ggn, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(exact, ggn, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(exact, want_ggn, rtol=1e-10, atol=1e-10)
    want_empirical = problem["flat_vs"] @ dense["empirical"]
    np.testing.assert_allclose(empirical, want_empirical, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("loss", LOSSES)
def test_mc_fisher_is_an_unbiased_estimate_of_the_exact_fisher(problem, loss):
    model, params = problem["model"], problem["params"]
    v = jax.tree.map(lambda x: x[0], problem["vs"])
    exact = problem["flat_vs"][0] @ problem["dense"][loss]["ggn"]
    num_keys = 2000
    keys = jax.random.split(jax.random.PRNGKey(7), num_keys)
    samples = jax.jit(
        jax.vmap(
            lambda key: ravel_pytree(fisher_vp(model, params, v, loss=loss, kind="mc", key=key))[0]
        )
    )(keys)
    samples = np.asarray(samples)
    mean = samples.mean(axis=0)
    sem = samples.std(axis=0, ddof=1) / np.sqrt(num_keys)
    # Every coordinate within 5.5 standard errors (1443 coordinates: P(fail) ~ 1e-4)...
    z = np.abs(mean - exact) / (sem + 1e-12)
    assert np.max(z) < 5.5, np.max(z)
    # ... and the whole vector close in norm: the error is the Monte Carlo noise, no bias.
    rel = np.linalg.norm(mean - exact) / np.linalg.norm(exact)
    assert rel < 4 * np.linalg.norm(sem) / np.linalg.norm(exact) + 1e-12, rel
    # A single draw is far from exact (the test would catch a biased estimator).
    single = np.linalg.norm(samples[0] - exact) / np.linalg.norm(exact)
    assert rel < single / 10


def test_hessian_operator_is_linearized_once_and_jits(problem):
    params, targets = problem["params"], problem["targets"]["softmax_cross_entropy"]
    fn = lambda p: output_loss("softmax_cross_entropy", problem["model"](p), targets)

    @jax.jit
    def apply_twice(p, v):
        op = hessian_operator(fn, p)
        return op(op(v))

    v = jax.tree.map(lambda x: x[1], problem["vs"])
    got = ravel_pytree(apply_twice(params, v))[0]
    h = problem["hessian"]
    want = h @ (h @ problem["flat_vs"][1])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


def test_products_reject_bad_inputs(problem):
    params, model = problem["params"], problem["model"]
    fn = lambda p: jnp.sum(model(p) ** 2)
    v = jax.tree.map(jnp.zeros_like, params)
    int_params = jax.tree.map(lambda x: x.astype(jnp.int32), params)
    with pytest.raises(TypeError, match=r"params\['b0'\] has dtype int32; curvature products need"):
        hvp(fn, int_params, v)
    with pytest.raises(TypeError, match=r"params\['b0'\] has dtype int32; curvature products need"):
        hessian_operator(fn, int_params)
    bad_v = {**v, "w0": jnp.zeros((3, 3))}
    shape_msg = r"v\['w0'\] has shape \(3, 3\) but params has shape \(8, 32\) there"
    with pytest.raises(ValueError, match=shape_msg):
        hvp(fn, params, bad_v)
    with pytest.raises(ValueError, match=shape_msg):
        hessian_operator(fn, params)(bad_v)
    with pytest.raises(ValueError, match="v must have the same pytree structure as params"):
        ggn_vp(model, lambda o: jnp.sum(o**2), params, {"w0": v["w0"]})
    with pytest.raises(ValueError, match=r"loss must be one of .*got 'hinge'"):
        fisher_vp(model, params, v, loss="hinge", kind="exact")
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'true'"):
        fisher_vp(model, params, v, loss="squared_error", kind="true")
    with pytest.raises(ValueError, match=r"kind='empirical'\) needs the true targets"):
        fisher_vp(model, params, v, loss="squared_error", kind="empirical")
    with pytest.raises(ValueError, match=r"kind='mc'\) needs a PRNG key"):
        fisher_vp(model, params, v, loss="squared_error", kind="mc")
    with pytest.raises(ValueError, match="targets have batch size 5 but outputs 48"):
        fisher_vp(
            model, params, v, loss="squared_error", kind="empirical", targets=jnp.zeros((5, 3))
        )
    with pytest.raises(ValueError, match=r"loss must be one of .*got 'hinge'"):
        output_loss("hinge", jnp.zeros((2, 3)), jnp.zeros((2, 3)))


def test_output_loss_values_match_the_formulas():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(4, 3, 5))  # batch, position, class: 12 rows (mean over every token)
    labels = rng.integers(0, 5, size=(4, 3))
    probs = rng.dirichlet(np.ones(5), size=(4, 3))
    logp = f - np.log(np.sum(np.exp(f), axis=-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None], axis=-1).sum() / 12
    np.testing.assert_allclose(output_loss("softmax_cross_entropy", f, labels), nll, rtol=1e-12)
    soft = -np.sum(probs * logp) / 12
    np.testing.assert_allclose(output_loss("softmax_cross_entropy", f, probs), soft, rtol=1e-12)
    t = rng.uniform(size=f.shape)
    sig = 1 / (1 + np.exp(-f))
    bce = -np.sum(t * np.log(sig) + (1 - t) * np.log(1 - sig)) / 12
    np.testing.assert_allclose(output_loss("sigmoid_cross_entropy", f, t), bce, rtol=1e-12)
    np.testing.assert_allclose(
        output_loss("squared_error", f, t), 0.5 * np.sum((f - t) ** 2) / 12, rtol=1e-12
    )
