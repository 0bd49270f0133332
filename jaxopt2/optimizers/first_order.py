"""First-order optimizers, re-exported from optax (never re-implemented).

``muon`` is ``optax.contrib.muon`` (Newton-Schulz orthogonalized momentum on matrices, Adam on
the other leaves). ``schedule_free_adamw`` is ``optax.contrib.schedule_free_adamw`` (Defazio et
al., 2024: no learning-rate schedule, the iterate is an interpolation of an average); its
entry carries ``optax.contrib.schedule_free_eval_params``, so the runner evaluates and saves
the averaged parameters while its checkpoints keep the training state.

They are registered in :mod:`jaxopt2.optimizers.registry` so the shared checks and the
runner treat them exactly like jaxopt2's own optimizers. They keep optax's behaviour,
including its dtype handling.
"""

from __future__ import annotations

import optax

from jaxopt2.optimizers import registry

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

# Structural (non-numeric) arguments: the runner and the sweep keep these out of traced grids.
_STATIC = {
    "sgd": ("nesterov",),
    "adam": ("nesterov",),
    "adamw": ("nesterov",),
    "adafactor": ("min_dim_size_to_factor", "multiply_by_parameter_scale", "factored"),
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

for _name in __all__:
    registry.register(
        _name,
        globals()[_name],
        static_args=_STATIC.get(_name, ()),
        eval_params=_EVAL_PARAMS.get(_name),
    )
