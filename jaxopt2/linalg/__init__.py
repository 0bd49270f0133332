"""Linear algebra for curvature methods: CG on pytrees, tridiagonal eigensolves."""

__all__: list[str] = []
