"""Drop-in proofs: every registry entry trains an equinox model and a flax.nnx model through
those libraries' standard loops, with the optimizer passed in unchanged.

The loss tags its logits (:func:`jaxopt2.tag_loss`, an identity for optimizers that don't
look for it), so optimizers that need a tagged loss (K-FAC) run the same loops.

Curvature optimizers get ``value_fn`` (a function of the *parameter pytree the optimizer
sees*, rebuilt into a model with the library's own combine/merge) and ``key`` as extra
arguments of ``update``; first-order ones receive and ignore them.

flax 0.12: ``nnx.Optimizer.update(model, grads, **kwargs)`` forwards ``kwargs`` (through
``nnx.as_pure``, which leaves functions and arrays as they are) to ``tx.update`` and calls it
with ``params = nnx.as_pure(nnx.state(model, wrt))``: a ``State`` of raw arrays. So our
``value_fn`` takes such a State and merges it back with the graph definition and the
non-trained state.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxopt2
from jaxopt2.optimizers import registry
from tests.optimizers import cases, zoo
from tests.optimizers.cases import CASES

pytestmark = pytest.mark.timeout(240)

NAMES = registry.names()
STEPS = 60
DECREASE = 0.5  # final loss <= half the initial loss


def _optimizer(name: str) -> optax.GradientTransformationExtraArgs:
    if name not in CASES:
        pytest.fail(f"{name!r} has no row in tests/optimizers/cases.py CASES: add one.")
    row = CASES[name]
    # The zoo's MLP settings: these models are MLPs on the same data.
    mlp = row.zoo["mlp_tagged" if row.tagged else "mlp"]
    return registry.get(name).factory(**{**row.hparams, **mlp.hparams})


def _data() -> tuple[jax.Array, jax.Array]:
    x, labels = zoo._mlp_data()
    return jnp.asarray(x, jnp.float32), jnp.asarray(labels, jnp.int32)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits = jaxopt2.tag_loss("softmax_cross_entropy", logits, labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _check_decrease(name: str, losses: list[float], what: str) -> None:
    assert np.all(np.isfinite(losses)), f"{name} ({what}): non-finite loss {losses}"
    assert losses[-1] <= DECREASE * losses[0], (
        f"{name} ({what}): loss {losses[0]:.4g} -> {losses[-1]:.4g} in {STEPS} steps "
        f"(need <= {DECREASE} x start)"
    )


@pytest.mark.parametrize("name", NAMES)
def test_equinox_loop(name):
    opt = _optimizer(name)
    x, labels = _data()
    model = eqx.nn.MLP(
        in_size=4,
        out_size=3,
        width_size=16,
        depth=1,
        activation=jnp.tanh,
        key=jax.random.PRNGKey(0),
        dtype=jnp.float32,
    )

    def loss_fn(model, x, labels):
        return _cross_entropy(jax.vmap(model)(x), labels)

    traces = []

    @eqx.filter_jit
    def step(model, opt_state, x, labels, key):
        traces.append(1)
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, labels)
        params, static = eqx.partition(model, eqx.is_array)
        value_fn = lambda p: loss_fn(eqx.combine(p, static), x, labels)
        updates, opt_state = opt.update(grads, opt_state, params, value_fn=value_fn, key=key)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss

    opt_state = opt.init(eqx.filter(model, eqx.is_array))
    losses = []
    for i in range(STEPS):
        model, opt_state, loss = step(model, opt_state, x, labels, cases.step_key(i))
        losses.append(float(loss))
    losses.append(float(loss_fn(model, x, labels)))
    assert len(traces) == 1, f"{name}: the equinox step was traced {len(traces)} times"
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}
    _check_decrease(name, losses, "equinox")


class _NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 16, rngs=rngs, param_dtype=jnp.float32)
        self.out = nnx.Linear(16, 3, rngs=rngs, param_dtype=jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


@pytest.mark.parametrize("name", NAMES)
def test_flax_nnx_optimizer(name):
    opt = _optimizer(name)
    x, labels = _data()
    model = _NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
    assert optimizer.tx is opt

    def loss_fn(model, x, labels):
        return _cross_entropy(model(x), labels)

    traces = []

    @nnx.jit
    def step(model, optimizer, x, labels, key):
        traces.append(1)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, labels)
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)

        def value_fn(params):  # params: the State of raw arrays nnx.Optimizer passes to tx
            return loss_fn(nnx.merge(graphdef, params, rest), x, labels)

        optimizer.update(model, grads, value_fn=value_fn, key=key)
        return loss

    losses = []
    for i in range(STEPS):
        losses.append(float(step(model, optimizer, x, labels, cases.step_key(i))))
    losses.append(float(loss_fn(model, x, labels)))
    assert len(traces) == 1, f"{name}: the nnx step was traced {len(traces)} times"
    assert int(optimizer.step[...]) == STEPS
    _check_decrease(name, losses, "flax.nnx")
