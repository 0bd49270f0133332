"""First-order optimizers, re-exported from optax (never re-implemented).

``muon`` is ``optax.contrib.muon`` (Newton-Schulz orthogonalized momentum on matrices, Adam on
the other leaves). ``schedule_free_adamw`` is ``optax.contrib.schedule_free_adamw`` (Defazio et
al., 2024: no learning-rate schedule, the iterate is an interpolation of an average); its
entry carries ``optax.contrib.schedule_free_eval_params``, so the runner evaluates and saves
the averaged parameters while its checkpoints keep the training state.

They are registered in :mod:`jaxopt2.optimizers.registry` so the shared checks and the
runner treat them exactly like jaxopt2's own optimizers. They keep optax's behaviour,
including its dtype handling: ``jaxopt2.adam is optax.adam``. Only their registry entries
(what configs and ``registry.get(name).factory`` build) check the arguments first, with the
rules of jaxopt2's own factories (a learning rate that is negative, a string or
None where optax has no default for it; a decay outside ``[0, 1)``; a negative weight
decay), then call optax's factory unchanged; their signature is optax's.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import optax

from jaxopt2.optimizers import registry
from jaxopt2.optimizers._contract import check_learning_rate, check_number

sgd = optax.sgd
adam = optax.adam
adamw = optax.adamw
nadam = optax.nadam
lion = optax.lion
rmsprop = optax.rmsprop
adagrad = optax.adagrad
adafactor = optax.adafactor
lamb = optax.lamb
muon = optax.contrib.muon
schedule_free_adamw = optax.contrib.schedule_free_adamw

__all__ = [
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
]

# Structural (non-numeric) arguments: the runner and the sweep keep these out of traced grids,
# and jaxopt2.inject_hyperparams out of the injected state (a dtype class or a mask function
# would otherwise be called as a schedule).
_STATIC = {
    "sgd": ("nesterov", "accumulator_dtype"),
    "adam": ("nesterov", "mu_dtype"),
    "adamw": ("nesterov", "mu_dtype", "mask"),
    "nadam": ("nesterov", "mu_dtype"),
    "lion": ("mu_dtype", "mask"),
    "lamb": ("mask",),
    "adafactor": (
        "min_dim_size_to_factor",
        "multiply_by_parameter_scale",
        "factored",
        "dtype_momentum",
        "weight_decay_mask",
    ),
    "muon": (
        "ns_coeffs",
        "ns_steps",
        "weight_decay_mask",
        "mu_dtype",
        "nesterov",
        "adaptive",
        "preconditioning",
        "muon_weight_dimension_numbers",
        "consistent_rms",
    ),
    "schedule_free_adamw": ("warmup_steps", "state_dtype"),
}

# Optimizers whose evaluation parameters differ from their training iterate.
_EVAL_PARAMS = {"schedule_free_adamw": optax.contrib.schedule_free_eval_params}

_UNIT = {"low": 0.0, "high": 1.0, "high_inclusive": False}
_NONNEGATIVE = {"low": 0.0}
# The range of each numeric argument the optax factories share (by name); a callable
# (an optax schedule, where optax accepts one) passes.
_RULES: dict[str, dict[str, Any]] = {
    "b1": _UNIT,
    "b2": _UNIT,
    "adam_b1": _UNIT,
    "adam_b2": _UNIT,
    "beta": _UNIT,
    "decay": _UNIT,
    "momentum": {**_UNIT, "optional": True},
    "eps": _NONNEGATIVE,
    "weight_decay": _NONNEGATIVE,
    "adam_weight_decay": _NONNEGATIVE,
}


def _checked(name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
    """`factory` with its arguments checked first (its signature stays optax's)."""
    signature = inspect.signature(factory)
    lr = signature.parameters.get("learning_rate")
    own_step = lr is not None and lr.default is None  # e.g. adafactor: None is a valid rate

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Any:
        given = signature.bind(*args, **kwargs).arguments
        if "learning_rate" in given:
            check_learning_rate(given["learning_rate"], name, adaptive=own_step)
        for arg, rule in _RULES.items():
            if arg in given and not callable(given[arg]):
                check_number(given[arg], arg, **rule)
        return factory(*args, **kwargs)

    return build


for _name in __all__:
    registry.register(
        _name,
        _checked(_name, globals()[_name]),
        static_args=_STATIC.get(_name, ()),
        eval_params=_EVAL_PARAMS.get(_name),
    )
