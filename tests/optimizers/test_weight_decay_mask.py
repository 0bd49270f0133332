"""Every registry entry with a weight decay takes a mask (optax's spelling for that factory):
a masked-out leaf gets no decay, the others get all of it.

One row per entry with a weight decay; a new entry with a ``weight_decay`` argument and no
row fails ``test_every_entry_with_weight_decay_has_a_row``.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt2.optimizers import registry
from tests.optimizers.cases import CASES, train_step

pytestmark = pytest.mark.timeout(240)

# name -> (weight-decay argument, mask argument, a decay, the value meaning "no decay",
# extra arguments of this test)
ROWS: dict[str, tuple[str, str, float, Any, dict[str, Any]]] = {
    "adahessian": ("weight_decay", "mask", 0.5, 0.0, {}),
    "hessian_free": ("weight_decay", "mask", 0.5, 0.0, {}),
    "oasis": ("weight_decay", "mask", 0.5, 0.0, {}),
    "mfac": ("weight_decay", "mask", 0.5, 0.0, {}),
    "egn": ("weight_decay", "mask", 0.5, 0.0, {}),
    "shampoo": ("weight_decay", "mask", 0.5, 0.0, {}),
    "soap": ("weight_decay", "mask", 0.5, 0.0, {}),
    "sophia": ("weight_decay", "weight_decay_mask", 0.5, 0.0, {}),
    # K-FAC's weight decay needs a learning rate (the adaptive step has none of its own)
    "kfac": ("weight_decay", "mask", 0.5, None, {"learning_rate": 0.1}),
    # optax's own
    "adamw": ("weight_decay", "mask", 0.5, 0.0, {}),
    "lion": ("weight_decay", "mask", 0.5, 0.0, {}),
    "lamb": ("weight_decay", "mask", 0.5, 0.0, {}),
    "adafactor": ("weight_decay_rate", "weight_decay_mask", 0.5, None, {}),
    "muon": ("weight_decay", "weight_decay_mask", 0.5, 0.0, {}),
}
# The leaf to mask out, where not the first: muon's weight decay is that of its matrices
# (the vector "b" goes to Adam, decayed by adam_weight_decay).
MASKED_LEAF = {"muon": "w1"}
# optax.contrib.schedule_free_adamw has a weight decay but no mask (optax's signature).
NO_MASK = ("schedule_free_adamw",)


def test_every_entry_with_weight_decay_has_a_row():
    with_decay = {
        name
        for name in registry.names()
        if {"weight_decay", "weight_decay_rate"} & set(registry.get(name).arguments())
    }
    assert with_decay == set(ROWS) | set(NO_MASK)
    for name, (_, mask, *_) in ROWS.items():
        assert mask in registry.get(name).static_args, name
        kind = inspect.signature(registry.get(name).factory).parameters[mask].kind
        assert kind is not inspect.Parameter.POSITIONAL_ONLY


def _problem(name: str):
    """The row's generic problem, with at least two leaves (a single array is doubled)."""
    problem = CASES[name].generic_problem()
    if isinstance(problem.params, dict):
        # A leaf that starts at zero shows no weight decay on the first step: start it at 0.1.
        params = jax.tree.map(lambda x: jnp.where(jnp.any(x != 0), x, 0.1), problem.params)
        return params, problem.loss_fn, problem.batch
    params = {"a": problem.params, "b": 0.5 * problem.params}

    def loss_fn(p, *batch):
        return problem.loss_fn(p["a"], *batch) + problem.loss_fn(p["b"], *batch)

    return params, loss_fn, problem.batch


def _updates(name: str, **kwargs: Any) -> Any:
    params, loss_fn, batch = _problem(name)
    opt = registry.get(name).factory(**{**CASES[name].generic, **ROWS[name][4], **kwargs})
    state = opt.init(params)
    step = jax.jit(lambda p, s: train_step(opt, loss_fn, p, s, 0, batch)[3])
    return step(params, state)


@pytest.mark.parametrize("name", sorted(ROWS))
@pytest.mark.parametrize("as_function", [False, True])
def test_a_masked_leaf_gets_no_decay(name, as_function):
    wd_arg, mask_arg, wd, no_wd, _ = ROWS[name]
    params, _, _ = _problem(name)
    keys = sorted(params)
    out = MASKED_LEAF.get(name, keys[0])
    # one leaf masked out (no decay), the others decayed
    mask = {k: k != out for k in keys}
    given = (lambda p: {k: k != out for k in p}) if as_function else mask
    masked = _updates(name, **{wd_arg: wd, mask_arg: given})
    decayed = _updates(name, **{wd_arg: wd})
    plain = _updates(name, **{wd_arg: no_wd})
    for k in keys:
        want = decayed[k] if mask[k] else plain[k]
        np.testing.assert_allclose(masked[k], want, rtol=1e-6, atol=1e-7, err_msg=f"{name}: {k}")
    # the decay is visible on the masked-out leaf without the mask
    assert not jnp.allclose(decayed[out], plain[out]), name
