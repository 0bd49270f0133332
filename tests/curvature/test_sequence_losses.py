"""Sequence losses (language-model logits ``[B, T, V]``) and masked tokens in the loss tag.

A tag on ``[B, T, V]`` logits is ``B·T`` rows, and its curvature must be that of the loss the
user computes (the mean over every token; ``Σ w·ℓ / Σ w`` with weights): the same as the tag
on the flattened ``[B·T, V]`` logits for every consumer (K-FAC, Sophia's GNB estimator,
Hessian-free, the curvature products), and with a 0/1 mask the same as the flattened tag with
the masked rows removed. References are dense float64 matrices of the user's own loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jaxopt2
from jaxopt2.curvature import fisher_vp, ggn_vp, output_loss, split_loss
from jaxopt2.optimizers.kfac import kfac, kfac_layers
from jaxopt2.optimizers.newton import scale_by_hessian_free
from jaxopt2.optimizers.sophia import sophia_estimate

B, T, D, V = 2, 3, 4, 5
MASK = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # padded tail of each sequence
KEEP = MASK.reshape(-1) > 0


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "emb": jax.random.normal(k[0], (V, D)),
        "w": jax.random.normal(k[1], (D, D)) / 2,
        "b": 0.1 * jnp.ones(D),
        "head": jax.random.normal(k[2], (D, V)),
    }


def _data():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    return jax.random.randint(k1, (B, T), 0, V), jax.random.randint(k2, (B, T), 0, V)


def _logits(p, ids):  # an embedding lookup, a dense layer on [..., D], a head
    return jnp.tanh(p["emb"][ids] @ p["w"] + p["b"]) @ p["head"]


def _loss(p, ids, y, weights=None):
    """The user's loss: the mean over every token, or Σ w·ℓ / Σ w."""
    kw = {} if weights is None else {"weights": weights}  # the three-argument form stays
    logits = jaxopt2.tag_loss("softmax_cross_entropy", _logits(p, ids), y, **kw)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.mean(ce) if weights is None else jnp.sum(weights * ce) / jnp.sum(weights)


def _flat(ids, y, keep=None):
    ids, y = ids.reshape(-1), y.reshape(-1)
    return (ids, y) if keep is None else (ids[keep], y[keep])


def _kfac_directions(opt, loss_fn, batch, steps=3):
    p = _params()
    state = opt.init(p)

    @jax.jit
    def step(p, state, key):
        return jaxopt2.value_and_update(opt, loss_fn, p, state, *batch, key=key)

    out = []
    for i in range(steps):
        _, u, state = step(p, state, jax.random.PRNGKey(10 + i))
        out.append(ravel_pytree(u)[0])
        p = optax.apply_updates(p, u)
    return out


def test_kfac_sequence_tag_equals_the_flattened_tag():
    """Sampled Fisher (the same key: the same sampled labels), adaptive step, 3 steps."""
    ids, y = _data()
    opt = kfac(invert_every=1, stats_dtype=jnp.float64)
    seq = _kfac_directions(opt, _loss, (ids, y))
    flat = _kfac_directions(opt, _loss, _flat(ids, y))
    for a, b in zip(seq, flat, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_kfac_masked_tag_equals_the_flattened_tag_without_the_masked_rows():
    """Exact Fisher: A, G, the free parameters' diagonal and the quadratic model all weight
    the rows as the loss does (a padded token's inputs leave A too)."""
    ids, y = _data()
    opt = kfac(invert_every=1, fisher="exact", stats_dtype=jnp.float64)
    masked = _kfac_directions(opt, lambda p, i, t: _loss(p, i, t, jnp.asarray(MASK)), (ids, y))
    kept = _kfac_directions(opt, _loss, _flat(ids, y, KEEP))
    for a, b in zip(masked, kept, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_sophia_gnb_sequence_tag_equals_the_flattened_tag():
    ids, y = _data()
    p, key = _params(), jax.random.PRNGKey(3)
    seq = sophia_estimate(lambda q: _loss(q, ids, y), p, key, estimator="gnb")
    fi, fy = _flat(ids, y)
    flat = sophia_estimate(lambda q: _loss(q, fi, fy), p, key, estimator="gnb")
    np.testing.assert_allclose(ravel_pytree(seq)[0], ravel_pytree(flat)[0], rtol=1e-10)


def _dense_ggn(p, ids, y, weights=None):
    """Jᵀ H J of the user's loss in float64: J of the logits, H the Hessian of the loss as a
    function of the logits (written independently of the library)."""
    flat, unravel = ravel_pytree(p)
    logits = lambda q: _logits(unravel(q), ids).reshape(-1)
    jac = jax.jit(jax.jacobian(logits))(flat)

    def of_logits(z):
        ce = optax.softmax_cross_entropy_with_integer_labels(z.reshape(B, T, V), y)
        return jnp.mean(ce) if weights is None else jnp.sum(weights * ce) / jnp.sum(weights)

    hess = jax.jit(jax.hessian(of_logits))(logits(flat))
    return np.asarray(jac.T @ hess @ jac), flat, unravel


def test_sophia_gnb_with_weights_is_unbiased_for_the_weighted_ggn_diagonal():
    """Fractional weights: the rows enter ĝ by √(w/Σw), so E[ĥ] = diag(G). Weights entering ĝ
    linearly (Σw · ĝ²) would give rows weighted by w²/Σw: 1.5 ‖diag(G)‖ away from it here,
    against a Monte-Carlo error of 0.03 ‖diag(G)‖ with these 500 probes."""
    ids, y = _data()
    w = jnp.array([[0.5, 2.0, 1.0], [3.0, 0.0, 1.0]])
    p = _params()
    g, _, _ = _dense_ggn(p, ids, y, w)
    est = sophia_estimate(
        lambda q: _loss(q, ids, y, w), p, jax.random.PRNGKey(4), estimator="gnb", num_probes=500
    )
    est = np.asarray(ravel_pytree(est)[0])
    exact = np.diag(g)
    assert np.linalg.norm(est - exact) < 0.1 * np.linalg.norm(exact)


def _hf_direction(loss_fn, batch):
    p = _params()
    opt = scale_by_hessian_free(curvature="gauss_newton", stats_dtype=jnp.float64)
    value_fn = lambda q: loss_fn(q, *batch)
    u, _ = jax.jit(lambda p, s: opt.update(jax.grad(value_fn)(p), s, p, value_fn=value_fn))(
        p, opt.init(p)
    )
    return ravel_pytree(u)[0]


def test_hessian_free_sequence_and_masked_tags():
    ids, y = _data()
    np.testing.assert_allclose(
        _hf_direction(_loss, (ids, y)), _hf_direction(_loss, _flat(ids, y)), rtol=1e-8
    )
    masked = lambda p, i, t: _loss(p, i, t, jnp.asarray(MASK))
    np.testing.assert_allclose(
        _hf_direction(masked, (ids, y)), _hf_direction(_loss, _flat(ids, y, KEEP)), rtol=1e-8
    )


@pytest.mark.parametrize("weights", [None, MASK], ids=["mean", "mask"])
def test_products_of_the_split_tag_match_the_dense_ggn_of_the_users_loss(weights):
    ids, y = _data()
    p = _params()
    w = None if weights is None else jnp.asarray(weights)
    g, flat, unravel = _dense_ggn(p, ids, y, w)
    split = split_loss(lambda q: _loss(q, ids, y, w), p)
    assert split.outputs.shape == (B, T, V)
    np.testing.assert_allclose(split.value, _loss(p, ids, y, w), rtol=1e-12)
    kw = {} if w is None else {"weights": split.weights}
    loss_of_outputs = lambda o: output_loss(split.loss, o, split.targets, **kw)
    np.testing.assert_allclose(loss_of_outputs(split.outputs), split.value, rtol=1e-12)
    v = unravel(jax.random.normal(jax.random.PRNGKey(5), flat.shape))
    expected = g @ ravel_pytree(v)[0]
    got_ggn = ggn_vp(split.model_fn, loss_of_outputs, p, v)
    got_fisher = fisher_vp(split.model_fn, p, v, loss=split.loss, kind="exact", **kw)
    np.testing.assert_allclose(ravel_pytree(got_ggn)[0], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ravel_pytree(got_fisher)[0], expected, rtol=1e-9, atol=1e-12)


def test_tag_inside_vmap_batches_the_weights():
    ids, y = _data()
    p = _params()

    def per_sequence(q, i, t, m):
        logits = jaxopt2.tag_loss("softmax_cross_entropy", _logits(q, i), t, weights=m)
        return jnp.sum(m * optax.softmax_cross_entropy_with_integer_labels(logits, t))

    total = lambda q: jnp.sum(jax.vmap(per_sequence, (None, 0, 0, 0))(q, ids, y, MASK)) / MASK.sum()
    split = split_loss(total, p)
    assert split.outputs.shape == (B, T, V) and split.weights.shape == (B, T)
    np.testing.assert_allclose(split.value, _loss(p, ids, y, jnp.asarray(MASK)), rtol=1e-12)


def test_targets_or_weights_that_do_not_fit_the_outputs_are_errors():
    logits = jnp.zeros((128, 10))
    with pytest.raises(ValueError, match=r"targets must have the outputs' shape \(128, 10\); "
                                         r"got targets \(128,\)"):  # fmt: skip
        jaxopt2.tag_loss("squared_error", logits, jnp.zeros(128))
    with pytest.raises(ValueError, match=r"targets must have the outputs' shape \(2, 3\); "
                                         r"got targets \(2, 1\)"):  # fmt: skip
        jaxopt2.tag_loss("sigmoid_cross_entropy", jnp.zeros((2, 3)), jnp.zeros((2, 1)))
    seq = jnp.zeros((B, T, V))
    with pytest.raises(ValueError, match=r"integer labels must have the logits' shape without "
                                         r"the class axis, \(2, 3\) for logits \(2, 3, 5\); "
                                         r"got labels \(6,\)"):  # fmt: skip
        jaxopt2.tag_loss("softmax_cross_entropy", seq, jnp.zeros(B * T, jnp.int32))
    with pytest.raises(ValueError, match=r"probability targets must have the logits' shape "
                                         r"\(2, 3, 5\); got targets \(6, 5\)"):  # fmt: skip
        jaxopt2.tag_loss("softmax_cross_entropy", seq, jnp.zeros((B * T, V)))
    labels = jnp.zeros((B, T), jnp.int32)
    with pytest.raises(ValueError, match=r"weights must have one entry per row of the outputs, "
                                         r"shape \(2, 3\) for outputs \(2, 3, 5\)"):  # fmt: skip
        jaxopt2.tag_loss("softmax_cross_entropy", seq, labels, weights=jnp.ones(B * T))
    with pytest.raises(ValueError, match="weights must be nonnegative"):
        jaxopt2.tag_loss("softmax_cross_entropy", seq, labels, weights=-jnp.ones((B, T)))
    # at trace time too: inside jit, and the update of an optimizer reading the tag
    bad = lambda q: jnp.mean(jaxopt2.tag_loss("squared_error", q["w"] @ jnp.ones((4, 3)),
                                              jnp.zeros(4)))  # fmt: skip
    with pytest.raises(ValueError, match=r"targets must have the outputs' shape \(4, 3\)"):
        jax.jit(bad)({"w": jnp.ones((4, 4))})


def test_kfac_layers_names_a_sum_over_tokens_and_a_mask_divided_by_the_row_count(capsys):
    ids, y = _data()
    p = _params()

    def per_sequence_sum(q, i, t):  # Σ over the tokens, mean over the batch only
        return _loss(q, i, t) * T

    kfac_layers(per_sequence_sum, p, ids, y)
    out = capsys.readouterr().out
    assert "the 3 positions per batch row: value_fn sums over the positions" in out
    assert "the mean over all 6 rows (2, 3)" in out and "compute that value" in out

    def masked_over_rows(q, i, t):  # Σ w·ℓ / rows instead of Σ w·ℓ / Σ w
        return _loss(q, i, t, jnp.asarray(MASK)) * MASK.sum() / MASK.size

    kfac_layers(masked_over_rows, p, ids, y)
    out = capsys.readouterr().out
    assert "sum(weights) / rows: the weighted sum is divided by the number of rows" in out

    kfac_layers(_loss, p, ids, y)
    out = capsys.readouterr().out
    assert "likely cause" not in out and "compute that value" not in out
