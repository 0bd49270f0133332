"""K-FAC: Kronecker-factored curvature for dense layers found in the user's loss.

``layers.py`` finds the layers (jaxpr discovery) and ``optimizer.py`` holds the optax
transformation; the loss tag lives in :mod:`jaxopt2.curvature.tags`.
"""

from jaxopt2.optimizers.kfac.layers import DenseLayer, Discovery
from jaxopt2.optimizers.kfac.optimizer import ScaleByKfacState, kfac, kfac_layers, scale_by_kfac

__all__ = ["DenseLayer", "Discovery", "ScaleByKfacState", "kfac", "kfac_layers", "scale_by_kfac"]
