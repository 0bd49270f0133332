"""Linear algebra for curvature methods: CG on pytrees, tridiagonal eigensolves."""

from jaxopt2.linalg.cg import CGResult, cg
from jaxopt2.linalg.tridiagonal import eigh_tridiagonal

__all__ = ["CGResult", "cg", "eigh_tridiagonal"]
