"""The modular-arithmetic data and transformer."""

import equinox as eqx
import jax
import numpy as np
import pytest

from jaxopt2.experiment.modular import ModularTransformer, modular_arithmetic_data

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("op,fn", [("add", np.add), ("sub", np.subtract), ("mul", np.multiply)])
def test_data_is_every_equation_once(op, fn):
    p = 7
    xt, yt, xe, ye = modular_arithmetic_data(p, op, train_fraction=0.4, seed=3)
    x = np.concatenate([xt, xe])
    y = np.concatenate([yt, ye])
    assert len(xt) == round(0.4 * p * p) and len(x) == p * p
    assert len({(a, b) for a, b, _ in x}) == p * p
    assert np.all(x[:, 2] == p)
    np.testing.assert_array_equal(y, fn(x[:, 0], x[:, 1]) % p)
    again = modular_arithmetic_data(p, op, train_fraction=0.4, seed=3)
    np.testing.assert_array_equal(again[0], xt)


def test_bad_arguments():
    with pytest.raises(ValueError, match="operation"):
        modular_arithmetic_data(5, "pow")
    with pytest.raises(ValueError, match="train_fraction"):
        modular_arithmetic_data(5, train_fraction=1.0)


def _np_layer_norm(ln, h):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + ln.eps) * np.asarray(ln.weight) + np.asarray(ln.bias)


def _np_linear(lin, h):
    out = h @ np.asarray(lin.weight).T
    return out + np.asarray(lin.bias) if lin.bias is not None else out


def _np_gelu(x):  # jax.nn.gelu's default (tanh) form
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_attention(attn, n, num_heads):
    t, d = n.shape
    q, k, v = (
        _np_linear(lin, n).reshape(t, num_heads, -1)
        for lin in (attn.query_proj, attn.key_proj, attn.value_proj)
    )
    scores = np.einsum("shd,thd->hst", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return _np_linear(attn.output_proj, np.einsum("hst,thd->shd", w, v).reshape(t, d))


def _np_transformer(model, tokens, num_heads):
    """The model written out in numpy, one sequence at a time."""
    h = np.asarray(model.embed.weight)[tokens] + np.asarray(model.pos)[: len(tokens)]
    for b in model.blocks:
        h = h + _np_attention(b.attn, _np_layer_norm(b.ln1, h), num_heads)
        n = _np_layer_norm(b.ln2, h)
        h = h + _np_linear(b.fc2, _np_gelu(_np_linear(b.fc1, n)))
    return _np_linear(model.unembed, _np_layer_norm(model.ln, h[-1]))


def test_model_matches_a_numpy_transformer_and_has_the_dense_layers():
    model = ModularTransformer(
        5, d_model=8, num_heads=2, d_mlp=16, num_layers=2, key=jax.random.PRNGKey(0)
    )
    xt, *_ = modular_arithmetic_data(5)
    logits = jax.vmap(model)(xt[:4])
    assert logits.shape == (4, 5)
    want = np.stack([_np_transformer(model, np.asarray(x), 2) for x in xt[:4]])
    np.testing.assert_allclose(logits, want, rtol=1e-10, atol=1e-12)
    linears = [
        m
        for m in jax.tree.leaves(model, is_leaf=lambda m: isinstance(m, eqx.nn.Linear))
        if isinstance(m, eqx.nn.Linear)
    ]
    assert len(linears) == 13  # per block: q, k, v, o projections, two MLP layers; unembedding
