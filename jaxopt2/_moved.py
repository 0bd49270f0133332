"""Old import paths of modules that became private in 0.2.0: each still imports, with a
DeprecationWarning, as the module it moved to, until 0.3.0."""

from __future__ import annotations

import importlib
import sys
import warnings

# old module -> (new private module, where its public names are now)
MOVED = {
    "jaxopt2.optimizers.kronecker": ("jaxopt2.optimizers._kronecker", None),
    "jaxopt2.optimizers.lowbit": ("jaxopt2.optimizers._lowbit", "jaxopt2.optimizers"),
    "jaxopt2.optimizers.contract": ("jaxopt2.optimizers._contract", "jaxopt2"),
    "jaxopt2.optimizers.kfac.factors": ("jaxopt2.optimizers.kfac._factors", None),
    "jaxopt2.optimizers.kfac.layers": (
        "jaxopt2.optimizers.kfac._layers",
        "jaxopt2.optimizers.kfac",
    ),
    "jaxopt2.optimizers.kfac.optimizer": (
        "jaxopt2.optimizers.kfac._optimizer",
        "jaxopt2.optimizers.kfac",
    ),
    "jaxopt2.optimizers.kfac.tags": ("jaxopt2.optimizers.kfac._tags", "jaxopt2.optimizers.kfac"),
    "jaxopt2.solvers.newton": ("jaxopt2.solvers._newton", "jaxopt2.solvers"),
    "jaxopt2.solvers.trust_region": ("jaxopt2.solvers._trust_region", "jaxopt2.solvers"),
    "jaxopt2.solvers.cubic": ("jaxopt2.solvers._cubic", "jaxopt2.solvers"),
    "jaxopt2.solvers.implicit": ("jaxopt2.solvers._implicit", None),
}


def moved_module(old: str) -> None:
    """Called by the module at the old path while it is being imported: warn, and make the
    import return the new module."""
    new, public = MOVED[old]
    where = f"its public names are in {public}" if public else "it has no public names"
    warnings.warn(
        f"{old} is internal and moved to {new}; the old path goes away in 0.3.0 ({where})",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = importlib.import_module(new)
