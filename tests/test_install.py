"""What ``pip install jaxopt2`` brings, and what the README's commands install.

The library needs jax, jaxlib, optax and numpy only; the experiment runner's packages are the
``runner`` extra and chex is a test dependency. The children here run with those packages
blocked (a ``sys.meta_path`` finder, installed before ``import jaxopt2``, that raises
ModuleNotFoundError for them, as a missing package does), from the checkout's root.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from jaxopt2 import cli

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]

# Top-level modules of the runner extra, the test extra's chex, and nothing the library needs.
BLOCKED = ("chex", "equinox", "matplotlib", "omegaconf", "orbax", "sklearn", "tqdm")

_BLOCKER = f"""
import importlib.abc, sys

BLOCKED = {BLOCKED!r}


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "imported before the test"
sys.meta_path.insert(0, _Blocker())
"""


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER + code],
        cwd=ROOT,  # `python -c` puts the working directory first on sys.path: this checkout
        capture_output=True,
        text=True,
        timeout=200,
    )


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def test_library_imports_and_steps_without_runner_packages():
    code = """
import importlib, pkgutil

import jax
import jax.numpy as jnp
import optax

import jaxopt2
from jaxopt2 import curvature, linalg, optimizers, sharding, solvers

runner = ("jaxopt2.experiment", "jaxopt2.cli", "jaxopt2.__main__")
for info in pkgutil.walk_packages(jaxopt2.__path__, "jaxopt2."):
    if not info.name.startswith(runner):
        importlib.import_module(info.name)

params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
loss = lambda p: jnp.sum((jnp.arange(3.0) @ p["w"] + p["b"] - 1.0) ** 2)
opt = jaxopt2.shampoo(1e-3)
state = opt.init(params)
updates, state = jax.jit(opt.update)(jax.grad(loss)(params), state, params)
new = optax.apply_updates(params, updates)
assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
assert float(loss(new)) < float(loss(params))
leaked = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
assert not leaked, leaked
print("ok")
"""
    out = _child(code)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("how", ["cli.main", "python -m jaxopt2"])
def test_command_without_runner_extra_says_what_to_install(how):
    if how == "cli.main":
        code = "from jaxopt2.cli import main\nraise SystemExit(main(['run', 'quickstart']))\n"
    else:
        code = (
            "import runpy\nsys.argv = ['jaxopt2', 'list']\n"
            "runpy.run_module('jaxopt2', run_name='__main__', alter_sys=True)\n"
        )
    out = _child(code)
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "pip install 'jaxopt2[runner]'" in lines[0]
    # Every runner package is blocked, so every one is named.
    for dist in cli._RUNNER_MODULES.values():
        assert dist in lines[0]
    assert out.stdout == ""


def test_runner_extra_and_cli_name_the_same_packages():
    project = _pyproject()["project"]
    runner = {_name(r) for r in project["optional-dependencies"]["runner"]}
    assert runner == set(cli._RUNNER_MODULES.values())
    assert {m.split(".")[0] for m in cli._RUNNER_MODULES} | {"chex"} == set(BLOCKED)
    core = {_name(r) for r in project["dependencies"]}
    assert core == {"jax", "jaxlib", "optax", "numpy"}
    test = project["optional-dependencies"]["test"]
    assert "jaxopt2[runner]" in test and "chex" in {_name(r) for r in test}


def test_readme_commands_install_what_they_run():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    run_cmd, test_cmd = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[:2]
    assert run_cmd == "pip install -e '.[runner]' && jaxopt2 run configs/quickstart.yaml"
    # CI runs exactly the README's test command.
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == test_cmd == "pip install -e '.[test]' && pytest"
