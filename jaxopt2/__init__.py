"""jaxopt2: curvature-aware optimizers and Hessian diagnostics for JAX.

Every optimizer is a drop-in ``optax.GradientTransformationExtraArgs``; curvature estimators
are pure functions of matrix-free products. Importing jaxopt2 initializes no jax backend.

(Unrelated to the deprecated ``google/jaxopt`` package.)
"""

from jaxopt2 import cpu, curvature, linalg, optimizers, sharding, solvers
from jaxopt2.curvature.linearized import linearize_model
from jaxopt2.curvature.tags import tag_loss
from jaxopt2.optimizers import (
    ScaleByAdaHessianState,
    ScaleByEgnState,
    ScaleByFosiState,
    ScaleByHessianFreeState,
    ScaleByKfacState,
    ScaleByMfacState,
    ScaleByOasisState,
    ScaleByShampooState,
    ScaleBySoapState,
    ScaleBySophiaState,
    adafactor,
    adagrad,
    adahessian,
    adam,
    adamw,
    egn,
    fosi,
    hessian_free,
    inject_hyperparams,
    kfac,
    kfac_layers,
    lamb,
    lion,
    mfac,
    muon,
    nadam,
    oasis,
    registry,
    rmsprop,
    scale_by_adahessian,
    scale_by_egn,
    scale_by_fosi,
    scale_by_hessian_free,
    scale_by_kfac,
    scale_by_mfac,
    scale_by_oasis,
    scale_by_shampoo,
    scale_by_soap,
    scale_by_sophia,
    schedule_free_adamw,
    sgd,
    shampoo,
    soap,
    sophia,
    tag_conv2d,
    tag_dense,
    value_and_update,
)
from jaxopt2.sharding import state_memory, state_sharding
from jaxopt2.solvers import Solution, least_squares, minimize

# The one version source: pyproject.toml reads this line (statically) for the package metadata.
__version__ = "0.1.0"

__all__ = [
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
    "Solution",
    "__version__",
    "adafactor",
    "adagrad",
    "adahessian",
    "adam",
    "adamw",
    "cpu",
    "curvature",
    "egn",
    "fosi",
    "hessian_free",
    "inject_hyperparams",
    "kfac",
    "kfac_layers",
    "lamb",
    "least_squares",
    "linalg",
    "linearize_model",
    "lion",
    "mfac",
    "minimize",
    "muon",
    "nadam",
    "oasis",
    "optimizers",
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
    "sharding",
    "soap",
    "solvers",
    "sophia",
    "state_memory",
    "state_sharding",
    "tag_conv2d",
    "tag_dense",
    "tag_loss",
    "value_and_update",
]


# Names that moved, kept for one release (0.2.x) with a DeprecationWarning.
_MOVED_NAMES = {
    "apply_cpu_deadlock_workaround": "jaxopt2.cpu",
    "limit_lapack_threads": "jaxopt2.cpu",
}


def __getattr__(name: str):
    if name in _MOVED_NAMES:
        import importlib
        import warnings

        where = _MOVED_NAMES[name]
        warnings.warn(
            f"jaxopt2.{name} moved to {where}.{name}; the old name goes away in 0.3.0",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(where), name)
    raise AttributeError(f"module 'jaxopt2' has no attribute {name!r}")
