"""Optimizers: every one an ``optax.GradientTransformationExtraArgs``, all in one registry."""

from jaxopt2.optimizers import registry
from jaxopt2.optimizers.adahessian import adahessian, scale_by_adahessian
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
    "adahessian",
    "adam",
    "adamw",
    "lamb",
    "lion",
    "nadam",
    "registry",
    "rmsprop",
    "scale_by_adahessian",
    "sgd",
    "value_and_update",
]
