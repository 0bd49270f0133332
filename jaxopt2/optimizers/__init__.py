"""Optimizers: every one an ``optax.GradientTransformationExtraArgs``, all in one registry."""

from jaxopt2.optimizers import registry
from jaxopt2.optimizers.contract import value_and_update
from jaxopt2.optimizers.first_order import (
    adafactor,
    adagrad,
    adam,
    adamw,
    lamb,
    lion,
    nadam,
    rmsprop,
    sgd,
)

__all__ = [
    "adafactor",
    "adagrad",
    "adam",
    "adamw",
    "lamb",
    "lion",
    "nadam",
    "registry",
    "rmsprop",
    "sgd",
    "value_and_update",
]
