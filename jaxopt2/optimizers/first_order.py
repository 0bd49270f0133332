"""First-order optimizers, re-exported from optax (never re-implemented).

``muon`` is ``optax.contrib.muon`` (Newton-Schulz orthogonalized momentum on matrices, Adam on
the other leaves).

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
}

for _name in __all__:
    registry.register(_name, globals()[_name], static_args=_STATIC.get(_name, ()))
