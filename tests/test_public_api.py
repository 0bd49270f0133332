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
    "jaxopt2.cpu",
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
        "kfac._optimizer",
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


# ------------------------------------------------------------------------------------------
# Paths and names that moved in 0.2.0 keep working for one release, with a warning.
# ------------------------------------------------------------------------------------------


def test_every_module_of_the_library_is_private_or_lists_its_public_names():
    """A module either has a private name (``_x.py``, or sits in the runner) or an
    ``__all__``; old paths of modules made private are the deprecated aliases below."""
    import pkgutil

    from jaxopt2._moved import MOVED

    for info in pkgutil.walk_packages(jaxopt2.__path__, "jaxopt2."):
        parts = info.name.split(".")
        if info.name in MOVED or any(p.startswith("_") for p in parts[1:]):
            continue
        if parts[1] in ("experiment", "cli"):
            continue  # the runner: its own documentation, not the library's API
        module = importlib.import_module(info.name)
        assert hasattr(module, "__all__"), info.name


from jaxopt2._moved import MOVED  # noqa: E402


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_warn_and_give_the_private_module(old):
    import sys

    sys.modules.pop(old, None)
    new, public = MOVED[old]
    with pytest.warns(DeprecationWarning, match=f"{old} is internal and moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    if public is not None:
        importlib.import_module(public)  # the place the warning points to exists


@pytest.mark.parametrize("name", ["apply_cpu_deadlock_workaround", "limit_lapack_threads"])
def test_cpu_workarounds_moved_to_jaxopt2_cpu(name):
    with pytest.warns(DeprecationWarning, match=f"jaxopt2.{name} moved to jaxopt2.cpu.{name}"):
        old = getattr(jaxopt2, name)
    assert old is getattr(jaxopt2.cpu, name)
    assert name not in jaxopt2.__all__ and name in jaxopt2.cpu.__all__
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        jaxopt2.no_such_name  # noqa: B018


@pytest.mark.parametrize("name", ["gather_rows", "partial_sums", "splits"])
def test_sharding_row_helpers_moved_to_a_private_module(name):
    from jaxopt2 import _sharding

    with pytest.warns(DeprecationWarning, match=f"jaxopt2.sharding.{name} is internal"):
        old = getattr(jaxopt2.sharding, name)
    assert old is getattr(_sharding, name) and name not in jaxopt2.sharding.__all__
    with pytest.raises(AttributeError, match=r"'jaxopt2\.sharding' has no attribute 'nope'"):
        jaxopt2.sharding.nope  # noqa: B018
