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


def test_model_shapes_and_dense_layers():
    model = ModularTransformer(5, d_model=8, num_heads=2, d_mlp=16, key=jax.random.PRNGKey(0))
    xt, *_ = modular_arithmetic_data(5)
    logits = jax.vmap(model)(xt[:4])
    assert logits.shape == (4, 5)
    linears = [
        m
        for m in jax.tree.leaves(model, is_leaf=lambda m: isinstance(m, eqx.nn.Linear))
        if isinstance(m, eqx.nn.Linear)
    ]
    assert len(linears) == 7  # q, k, v, o projections, two MLP layers, unembedding
