"""Optimizers: every one an ``optax.GradientTransformationExtraArgs``, all in one registry."""

from jaxopt2.optimizers import registry
from jaxopt2.optimizers._contract import value_and_update
from jaxopt2.optimizers._lowbit import QuantizedBasis
from jaxopt2.optimizers.adahessian import ScaleByAdaHessianState, adahessian, scale_by_adahessian
from jaxopt2.optimizers.egn import ScaleByEgnState, egn, scale_by_egn
from jaxopt2.optimizers.first_order import (
    adafactor,
    adagrad,
    adam,
    adamw,
    lamb,
    lion,
    muon,
    nadam,
    rmsprop,
    schedule_free_adamw,
    sgd,
)
from jaxopt2.optimizers.fosi import ScaleByFosiState, fosi, scale_by_fosi
from jaxopt2.optimizers.kfac import (
    ScaleByKfacState,
    kfac,
    kfac_layers,
    scale_by_kfac,
    tag_conv2d,
    tag_dense,
)
from jaxopt2.optimizers.mfac import ScaleByMfacState, mfac, scale_by_mfac
from jaxopt2.optimizers.newton import ScaleByHessianFreeState, hessian_free, scale_by_hessian_free
from jaxopt2.optimizers.oasis import ScaleByOasisState, oasis, scale_by_oasis
from jaxopt2.optimizers.registry import inject_hyperparams
from jaxopt2.optimizers.shampoo import ScaleByShampooState, scale_by_shampoo, shampoo
from jaxopt2.optimizers.soap import ScaleBySoapState, scale_by_soap, soap
from jaxopt2.optimizers.sophia import ScaleBySophiaState, scale_by_sophia, sophia

__all__ = [
    "QuantizedBasis",
    "ScaleByAdaHessianState",
    "ScaleByEgnState",
    "ScaleByFosiState",
    "ScaleByHessianFreeState",
    "ScaleByKfacState",
    "ScaleByMfacState",
    "ScaleByOasisState",
    "ScaleByShampooState",
    "ScaleBySoapState",
    "ScaleBySophiaState",
    "adafactor",
    "adagrad",
    "adahessian",
    "adam",
    "adamw",
    "egn",
    "fosi",
    "hessian_free",
    "inject_hyperparams",
    "kfac",
    "kfac_layers",
    "lamb",
    "lion",
    "mfac",
    "muon",
    "nadam",
    "oasis",
    "registry",
    "rmsprop",
    "scale_by_adahessian",
    "scale_by_egn",
    "scale_by_fosi",
    "scale_by_hessian_free",
    "scale_by_kfac",
    "scale_by_mfac",
    "scale_by_oasis",
    "scale_by_shampoo",
    "scale_by_soap",
    "scale_by_sophia",
    "schedule_free_adamw",
    "sgd",
    "shampoo",
    "soap",
    "sophia",
    "tag_conv2d",
    "tag_dense",
    "value_and_update",
]
