"""Linear algebra for curvature methods: CG on pytrees, tridiagonal eigensolves, inverse
matrix p-th roots (Shampoo, SOAP, K-FAC preconditioners)."""

from jaxopt2.linalg.cg import CGResult, cg
from jaxopt2.linalg.roots import matrix_inverse_root
from jaxopt2.linalg.tridiagonal import eigh_tridiagonal

__all__ = ["CGResult", "cg", "eigh_tridiagonal", "matrix_inverse_root"]
