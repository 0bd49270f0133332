"""K-FAC: Kronecker-factored curvature for the dense and convolution layers of the user's loss.

``layers.py`` finds the layers (jaxpr discovery, or the explicit tags of ``tags.py``) and
``factors.py`` lays the factors out (grouped by size, owned per device under a mesh) and
inverts them, ``optimizer.py`` holds the optax transformation; the loss tag lives in
:mod:`jaxopt2.curvature.tags`.
"""

from jaxopt2.optimizers.kfac._layers import Discovery, Layer
from jaxopt2.optimizers.kfac._optimizer import (
    ScaleByKfacState,
    kfac,
    kfac_layers,
    leafwise,
    scale_by_kfac,
)
from jaxopt2.optimizers.kfac._tags import tag_conv2d, tag_dense

__all__ = [
    "Discovery",
    "Layer",
    "ScaleByKfacState",
    "kfac",
    "kfac_layers",
    "leafwise",
    "scale_by_kfac",
    "tag_conv2d",
    "tag_dense",
]
