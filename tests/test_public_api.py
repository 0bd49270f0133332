"""The public surface: each public package lists it in ``__all__``; every optimizer state is
importable from ``jaxopt2`` and ``jaxopt2.optimizers``."""

from __future__ import annotations

import importlib
import inspect
import types

import jax.numpy as jnp
import pytest

import jaxopt2
from jaxopt2.optimizers import registry
from tests.optimizers.cases import CASES

PACKAGES = (
    "jaxopt2",
    "jaxopt2.curvature",
    "jaxopt2.linalg",
    "jaxopt2.optimizers",
    "jaxopt2.optimizers.kfac",
    "jaxopt2.sharding",
    "jaxopt2.solvers",
)


@pytest.mark.parametrize("name", PACKAGES)
def test_all_lists_resolvable_public_names(name):
    module = importlib.import_module(name)
    listed = module.__all__
    assert len(listed) == len(set(listed)), name
    assert all(hasattr(module, n) for n in listed), name
    assert not [n for n in listed if n.startswith("_") and n != "__version__"], name


@pytest.mark.parametrize("name", [p for p in PACKAGES if p != "jaxopt2.sharding"])
def test_every_public_attribute_of_a_package_is_listed(name):
    """What a package imports for its users is in ``__all__`` (submodules aside)."""
    module = importlib.import_module(name)
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "annotations"
    }
    assert public <= set(module.__all__), sorted(public - set(module.__all__))


def _state_classes() -> set[type]:
    found = set()
    for module in (
        "adahessian",
        "fosi",
        "kfac.optimizer",
        "newton",
        "oasis",
        "shampoo",
        "soap",
        "sophia",
    ):
        mod = importlib.import_module(f"jaxopt2.optimizers.{module}")
        found |= {
            v
            for n, v in vars(mod).items()
            if inspect.isclass(v) and n.startswith("ScaleBy") and n.endswith("State")
        }
    return found


def test_every_state_class_is_exported():
    states = _state_classes()
    assert len(states) == 8
    for cls in states:
        for module in (jaxopt2, jaxopt2.optimizers):
            assert getattr(module, cls.__name__) is cls
            assert cls.__name__ in module.__all__


OWN = [n for n in registry.names() if registry.get(n).factory.__module__.startswith("jaxopt2")]


@pytest.mark.parametrize("name", OWN)
def test_each_optimizer_state_holds_an_exported_state(name):
    """The state a jaxopt2 factory builds contains one of the exported state classes."""
    problem = CASES[name].generic_problem(jnp.float32)
    opt = registry.get(name).factory(**CASES[name].generic)
    state = opt.init(problem.params)
    leaves = [state]
    kinds = set()
    while leaves:
        node = leaves.pop()
        if isinstance(node, tuple):
            kinds.add(type(node))
            leaves.extend(node)
    exported = {getattr(jaxopt2, n) for n in jaxopt2.__all__ if n.startswith("ScaleBy")}
    assert kinds & exported, (name, kinds)
