"""Every argument after ``learning_rate`` is keyword-only (optax's newer factories do the same).

One row per registry entry. jaxopt2's own factories that used to take positional arguments
still accept them for one release, with a DeprecationWarning naming the argument, and build
the same optimizer as the keyword call; those born keyword-only (shampoo, soap, kfac) refuse
them; optax's re-exports keep optax's own signature (``jaxopt2.adam is optax.adam``).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import jax
import numpy as np
import optax
import pytest

from jaxopt2.optimizers import registry
from tests.optimizers.cases import CASES, train_step

pytestmark = pytest.mark.timeout(240)

# The deprecated positional second argument: its name and a value other than its default.
DEPRECATED: dict[str, tuple[str, Any]] = {
    "adahessian": ("b1", 0.8),
    "fosi": ("base", optax.sgd(0.05)),
    "hessian_free": ("damping", 2.0),
    "oasis": ("b1", 0.5),
    "sophia": ("b1", 0.9),
}
KEYWORD_ONLY = ("egn", "kfac", "mfac", "shampoo", "soap")
OPTAX = (
    "adafactor",
    "adagrad",
    "adam",
    "adamw",
    "lamb",
    "lion",
    "muon",
    "nadam",
    "rmsprop",
    "schedule_free_adamw",
    "sgd",
)


def test_every_entry_has_a_row():
    rows = set(DEPRECATED) | set(KEYWORD_ONLY) | set(OPTAX)
    assert rows == set(registry.names())


@pytest.mark.parametrize("name", sorted(set(DEPRECATED) | set(KEYWORD_ONLY)))
def test_signature_is_keyword_only_after_the_learning_rate(name):
    params = list(inspect.signature(registry.get(name).factory).parameters.values())
    assert params[0].name == "learning_rate"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), name


def _step(opt: optax.GradientTransformation, name: str) -> Any:
    problem = CASES[name].generic_problem()
    state = opt.init(problem.params)
    _, params, state, updates = jax.jit(
        lambda p, s: train_step(opt, problem.loss_fn, p, s, 0, problem.batch)
    )(problem.params, state)
    return params, state, updates


@pytest.mark.parametrize("name", sorted(DEPRECATED))
def test_a_positional_second_argument_warns_and_means_the_same(name):
    factory = registry.get(name).factory
    arg, value = DEPRECATED[name]
    assert inspect.signature(factory).parameters[arg].kind is inspect.Parameter.KEYWORD_ONLY
    hparams = dict(CASES[name].generic)
    lr = hparams.pop("learning_rate")
    message = (
        rf"jaxopt2\.{name}: passing '{arg}' positionally is deprecated; it becomes "
        rf"keyword-only in the next release"
    )
    with pytest.warns(DeprecationWarning, match=message):
        positional = factory(lr, value, **hparams)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        keyword = factory(learning_rate=lr, **{arg: value}, **hparams)
    got, want = _step(positional, name), _step(keyword, name)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("name", KEYWORD_ONLY)
def test_born_keyword_only_entries_refuse_positional_arguments(name):
    with pytest.raises(TypeError):
        registry.get(name).factory(0.1, 0.9)


@pytest.mark.parametrize("name", OPTAX)
def test_optax_re_exports_keep_optax_signature(name):
    import jaxopt2

    own = getattr(jaxopt2, name)
    assert own is getattr(optax, name, None) or own is getattr(optax.contrib, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        registry.get(name).factory(0.1)
