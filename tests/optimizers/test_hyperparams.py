"""Hyperparameters as users pass them: bad values are errors naming the argument at
construction, and ``inject_hyperparams`` (optax's, and jaxopt2's for structural arguments)
works for EVERY registry entry.

``BAD`` is the shared table: for each registry entry, the bad arguments to try and the words
its message must contain (the library's own wording, naming the argument). A registered
optimizer without a row fails ``test_every_entry_has_a_bad_value_row``.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt2
from jaxopt2.optimizers import registry
from tests.optimizers.cases import CASES, train_step

pytestmark = pytest.mark.timeout(240)

NAMES = registry.names()

Row = tuple[dict[str, Any], type[Exception], str]

_LR_VALUE = "learning_rate must be a finite number >= 0"
_LR_TYPE = "learning_rate must be a number or a schedule"


def _lr_rows(*, none_ok: bool = False) -> list[Row]:
    """The learning-rate rows every entry shares: negative, a string, a list, and None
    unless the optimizer sizes its own step."""
    rows: list[Row] = [
        ({"learning_rate": -0.1}, ValueError, _LR_VALUE),
        ({"learning_rate": float("nan")}, ValueError, _LR_VALUE),
        ({"learning_rate": "0.1"}, TypeError, _LR_TYPE),
        ({"learning_rate": [0.1]}, TypeError, _LR_TYPE),
        ({"learning_rate": True}, TypeError, _LR_TYPE),
    ]
    if not none_ok:
        rows.append(({"learning_rate": None}, TypeError, "learning_rate is None"))
    return rows


def _unit(name: str, value: float = 1.0) -> Row:
    return ({name: value}, ValueError, rf"{name} must lie in \[0.0, 1.0\), got {value}")


def _nonneg(name: str, value: float = -1.0) -> Row:
    return ({name: value}, ValueError, rf"{name} must lie in \[0.0, inf\], got {value}")


def _pos(name: str, value: float) -> Row:
    return ({name: value}, ValueError, rf"{name} must lie in \(0.0, inf\], got {value}")


def _posint(name: str, value: Any = 0) -> Row:
    return ({name: value}, ValueError, f"{name} must be a positive integer, got {value!r}")


_DTYPE: list[Row] = [
    ({"stats_dtype": "int32"}, ValueError, "stats_dtype must be a floating dtype"),
    ({"stats_dtype": "no_such_dtype"}, TypeError, "stats_dtype must be a dtype"),
]

BAD: dict[str, list[Row]] = {
    "sgd": [
        *_lr_rows(),
        _unit("momentum"),
        _unit("momentum", -0.5),
        ({"momentum": "0.9"}, TypeError, "momentum must be a number, got str '0.9'"),
    ],
    "adam": [*_lr_rows(), _unit("b1"), _unit("b2"), _nonneg("eps")],
    "adamw": [*_lr_rows(), _unit("b2"), _nonneg("weight_decay")],
    "nadam": [*_lr_rows(), _unit("b1", 1.5), _unit("b2")],
    "lamb": [*_lr_rows(), _unit("b2"), _nonneg("weight_decay")],
    "lion": [*_lr_rows(), _unit("b1"), _unit("b2", -0.1), _nonneg("weight_decay")],
    "rmsprop": [*_lr_rows(), _unit("decay"), _unit("momentum")],
    "adagrad": [*_lr_rows(), _nonneg("eps")],
    # optax.adafactor(learning_rate=None) is a documented descent step (its own default).
    "adafactor": [*_lr_rows(none_ok=True), _unit("momentum"), _nonneg("eps")],
    "muon": [*_lr_rows(), _unit("beta"), _unit("adam_b2"), _nonneg("weight_decay")],
    "schedule_free_adamw": [*_lr_rows(), _unit("b1"), _unit("b2"), _nonneg("weight_decay")],
    "shampoo": [
        *_lr_rows(),
        # b2 = 1: Adam's bias correction 1 - b2^t is 0 (and the statistics stay 0).
        ({"b2": 1.0}, ValueError, r"b2 must lie in \[0.0, 1.0\), got 1.0.*bias correction"),
        _unit("b1"),
        _nonneg("damping"),
        _nonneg("weight_decay"),
        _posint("block_size"),
        _posint("precondition_every", 2.5),
        *_DTYPE,
    ],
    "soap": [
        *_lr_rows(),
        ({"b2": 1.0}, ValueError, r"b2 must lie in \[0.0, 1.0\), got 1.0.*bias correction"),
        _unit("shampoo_b2"),
        _nonneg("damping"),
        _nonneg("weight_decay"),
        _posint("block_size", -1),
        *_DTYPE,
    ],
    "kfac": [
        *_lr_rows(none_ok=True),
        _unit("momentum"),
        _unit("momentum", -0.1),
        ({"learning_rate": 0.1, "momentum": 1.0}, ValueError, r"momentum must lie in \[0.0, 1.0\)"),
        ({"momentum": "0.9"}, TypeError, "momentum must be a number"),
        _pos("damping", -1.0),
        _pos("damping", 0.0),
        _unit("stats_decay"),
        ({"learning_rate": 0.1, "weight_decay": -1.0}, ValueError, r"weight_decay must lie in"),
        ({"weight_decay": 1e-4}, ValueError, "put weight decay into the loss"),
        ({"norm_constraint": 1.0}, ValueError, "norm_constraint needs a learning rate"),
        _posint("invert_every"),
        _posint("stats_every"),
        ({"stats_every": 2, "ekfac": True}, ValueError, "stats_every=2 needs ekfac=False"),
        *_DTYPE,
    ],
    "sophia": [
        *_lr_rows(),
        _unit("b2"),
        _pos("gamma", 0.0),
        _nonneg("weight_decay"),
        _posint("update_interval"),
        ({"seed": -1}, ValueError, "seed must be a non-negative integer"),
    ],
    "hessian_free": [
        *_lr_rows(),
        _pos("damping", -1.0),
        # Multiplicative decays of the damping: 0 would zero it for good.
        ({"damping_decrease": 0.0}, ValueError, r"damping_decrease must lie in \(0.0, 1.0\]"),
        ({"warm_start_decay": -0.1}, ValueError, r"warm_start_decay must lie in \[0.0, 1.0\]"),
        ({"damping_increase": 0.5}, ValueError, r"damping_increase must lie in \[1.0, inf\]"),
        _nonneg("weight_decay"),
        _posint("max_cg_iters"),
    ],
    "oasis": [*_lr_rows(), _unit("b2"), _pos("alpha", 0.0), _nonneg("weight_decay")],
    "adahessian": [
        *_lr_rows(),
        _unit("b2"),
        ({"hessian_power": 0.0}, ValueError, r"hessian_power must lie in \(0.0, 1.0\]"),
        _nonneg("weight_decay"),
        _posint("num_probes"),
    ],
    "fosi": [*_lr_rows(), _nonneg("alpha"), _pos("eps", 0.0), _posint("k")],
    "egn": [*_lr_rows(), _pos("damping", 0.0), _unit("momentum"), _nonneg("weight_decay")],
    "mfac": [
        *_lr_rows(),
        _pos("damping", 0.0),
        _unit("momentum"),
        _nonneg("weight_decay"),
        _posint("num_grads"),
        *_DTYPE,
    ],
}


def _required(name: str) -> dict[str, Any]:
    """The smallest valid arguments of `name` (its required ones)."""
    return {a: 0.1 for a in registry.get(name).required_arguments()}


def test_every_entry_has_a_bad_value_row():
    assert set(BAD) == set(NAMES), (
        f"entries without a BAD row: {sorted(set(NAMES) - set(BAD))}; "
        f"rows for unregistered names: {sorted(set(BAD) - set(NAMES))}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_bad_values_are_errors_naming_the_argument(name):
    entry = registry.get(name)
    args = entry.arguments()
    for kwargs, exc, words in BAD[name]:
        assert set(kwargs) <= set(args), f"{name}: {sorted(kwargs)} are not its arguments"
        try:
            entry.factory(**{**_required(name), **kwargs})
        except exc as err:
            assert re.search(words, str(err)), f"{name}({kwargs}): {err!s} lacks {words!r}"
        else:
            pytest.fail(f"{name}({kwargs}) raised no {exc.__name__}")


@pytest.mark.parametrize("name", NAMES)
def test_arrays_tracers_and_schedules_pass_unchecked(name):
    """Validation reads only concrete numbers: an array or a schedule as learning rate
    builds (inject_hyperparams, vmap over a grid and schedules hand these in)."""
    factory = registry.get(name).factory
    base = _required(name)
    factory(**{**base, "learning_rate": jnp.asarray(-0.1)})  # not checked: an array
    factory(**{**base, "learning_rate": optax.linear_schedule(0.1, 0.0, 10)})

    def build(lr):
        factory(**{**base, "learning_rate": lr})  # lr is a tracer here
        return lr

    jax.vmap(build)(jnp.asarray([0.1, 0.2]))


def test_the_valid_edges_pass():
    """The bounds of the rules themselves: what is allowed still builds, an optimizer."""
    built = [
        jaxopt2.kfac(momentum=0.0),
        jaxopt2.kfac(0.0),  # a zero learning rate: a no-op step, not an error
        jaxopt2.shampoo(0.1, b2=0.0, damping=0.0, graft="sgd"),
        jaxopt2.soap(0.1, stats_dtype=jnp.bfloat16),
        jaxopt2.shampoo(0.1, stats_dtype=np.dtype("float64")),
        registry.get("sgd").factory(0.1, momentum=None),
        jaxopt2.sophia(weight_decay=optax.constant_schedule(1e-4)),  # optax takes a schedule
        registry.get("adamw").factory(0.1, weight_decay=optax.constant_schedule(1e-4)),
        registry.get("adafactor").factory(learning_rate=None),
    ]
    for opt in built:
        assert isinstance(opt, optax.GradientTransformation), opt


# ------------------------------------------------------------------------------------------
# inject_hyperparams.
# ------------------------------------------------------------------------------------------


def _problem(name: str):
    return CASES[name].generic_problem()


def _hparams(name: str) -> dict[str, Any]:
    row = CASES[name]  # the generic problem's arguments (the matrix problem's overrides too)
    return {**(row.inject or row.hparams), **(row.matrix or {})}


def _step_fn(opt, problem):
    @jax.jit
    def step(state):
        return train_step(opt, problem.loss_fn, problem.params, state, 0, problem.batch)[3]

    return step


def _assert_close(a, b, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-5, atol=1e-7, err_msg=what
        )


@pytest.mark.parametrize("name", NAMES)
def test_jaxopt2_inject_hyperparams_keeps_structural_arguments_static(name):
    """jaxopt2.inject_hyperparams(factory)(**row): the row's structural arguments (given
    explicitly, as Python values) stay out of the injected state and are honoured; the
    injected update equals the plain factory's."""
    entry = registry.get(name)
    hparams = _hparams(name)
    problem = _problem(name)
    injected = jaxopt2.inject_hyperparams(entry.factory)(**hparams)
    state = injected.init(problem.params)
    leaked = sorted(set(entry.static_args) & set(state.hyperparams))
    assert not leaked, f"{name}: static arguments injected as arrays: {leaked}"
    assert "learning_rate" in state.hyperparams
    plain = entry.factory(**hparams)
    _assert_close(
        _step_fn(injected, problem)(state),
        _step_fn(plain, problem)(plain.init(problem.params)),
        f"{name}: jaxopt2.inject_hyperparams vs the plain factory",
    )


_STATIC_INTS = {
    "shampoo": {"block_size": 64},
    "soap": {"precondition_every": 5},
    "kfac": {"invert_every": 3},
    "sophia": {"update_interval": 3},
    "hessian_free": {"max_cg_iters": 3},
    "oasis": {"num_probes": 2},
    "adahessian": {"update_every": 2},
    "fosi": {"k": 3},
    "mfac": {"num_grads": 4},
}


@pytest.mark.parametrize("name", sorted(_STATIC_INTS))
def test_optax_path_with_an_explicit_structural_argument_points_to_jaxopt2(name):
    entry = registry.get(name)
    (arg,) = _STATIC_INTS[name]
    assert arg in entry.static_args
    args = {**_required(name), **_STATIC_INTS[name]}
    with pytest.raises(TypeError, match=rf"{arg} is structural.*jaxopt2.inject_hyperparams"):
        optax.inject_hyperparams(entry.factory)(**args).init(_problem(name).params)
    # The same arguments through jaxopt2's wrapper build and initialize.
    jaxopt2.inject_hyperparams(entry.factory)(**args).init(_problem(name).params)


def test_kfac_momentum_without_learning_rate_fixes_mu_of_the_adaptive_step():
    """kfac(momentum=m) (no learning rate) is the adaptive step δ = α Δ + m δ_prev with α
    from the quadratic model: the first step (no δ_prev) is kfac(momentum=0)'s, and the
    second, less m times the first, is parallel to kfac(momentum=0)'s second step (the same
    Δ: same state, batch and key)."""
    problem = CASES["kfac"].generic_problem()

    @jax.jit
    def two_steps(momentum):  # one compile: the momentum is traced
        opt = jaxopt2.kfac(momentum=momentum)
        params, state, out = problem.params, opt.init(problem.params), []
        for i in range(2):
            _, params, state, u = train_step(opt, problem.loss_fn, params, state, i, problem.batch)
            out.append(jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(u)]))
        return out

    a0, a1 = (np.asarray(u, float) for u in two_steps(jnp.asarray(0.0, jnp.float32)))
    b0, b1 = (np.asarray(u, float) for u in two_steps(jnp.asarray(0.5, jnp.float32)))
    cos = lambda x, y: float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    np.testing.assert_allclose(b0, a0, rtol=1e-6, atol=1e-9)
    assert cos(b1 - 0.5 * b0, a1) > 1 - 1e-6
    # ignored momentum would make b1 parallel to a1 (cos 1 to ~1e-7); measured 0.93 here
    assert cos(b1, a1) < 1 - 1e-3, "the momentum term is missing from the second step"
