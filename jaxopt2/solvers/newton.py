"""Deprecated path of :mod:`jaxopt2.solvers._newton` (internal); goes away in 0.3.0."""

from jaxopt2._moved import moved_module

moved_module(__name__)
