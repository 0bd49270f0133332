"""Matrix-free curvature: products and the estimators built on them.

Notation: ``H`` Hessian of a loss that is a mean over the batch, ``G`` generalized
Gauss-Newton, ``F`` Fisher, ``v`` a vector shaped like the parameters (a pytree), ``λ`` an
eigenvalue. Eigenvalues come sorted descending; eigenvectors come as a pytree shaped like
the parameters with a leading ``k`` axis; every stochastic function takes ``key`` explicitly.
"""

from jaxopt2.curvature.estimators import (
    density_on_grid,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    spectral_density,
    top_k_eigenpairs,
)
from jaxopt2.curvature.linearized import linearize_model, training_jacobian_singular_values
from jaxopt2.curvature.products import fisher_vp, ggn_vp, hessian_operator, hvp, output_loss
from jaxopt2.curvature.tags import SplitLoss, split_loss, tag_loss
from jaxopt2.curvature.taylor import (
    biharmonic,
    directional_derivatives,
    laplacian,
    stde_biharmonic,
    stde_laplacian,
)

__all__ = [
    "SplitLoss",
    "biharmonic",
    "density_on_grid",
    "directional_derivatives",
    "fisher_vp",
    "ggn_vp",
    "hessian_operator",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "hvp",
    "lanczos",
    "laplacian",
    "linearize_model",
    "output_loss",
    "power_iteration",
    "spectral_density",
    "split_loss",
    "stde_biharmonic",
    "stde_laplacian",
    "tag_loss",
    "top_k_eigenpairs",
    "training_jacobian_singular_values",
]
