"""Packaging: the bundled configs are the repository's configs/, in editable and wheel installs.

``configs/`` is installed as the package ``jaxopt2.configs`` (pyproject.toml's package-dir)
and read with importlib.resources; nothing is generated. The editable install is the one the
tests run in; the wheel is built offline from a copy of the checkout, installed into a
folder of its own and run from another directory. The wheel also carries ``py.typed``, the
version of ``jaxopt2.__version__`` and, without extras, none of the runner's packages.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import jaxopt2
from jaxopt2.cli import _RUNNER_MODULES
from jaxopt2.experiment import config as C
from jaxopt2.experiment.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = {p.stem: p for p in sorted((ROOT / "configs").glob("*.yaml"))}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "jaxopt2").rglob("__init__.py")
    }
    assert listed == on_disk | {"jaxopt2.configs"}


def test_bundled_configs_are_the_files_of_configs():
    # The editable install maps jaxopt2.configs onto the checkout's configs/ folder.
    assert C.bundled_config_names() == sorted(CONFIG_FILES)
    for name, path in CONFIG_FILES.items():
        text, stem, source = C.locate_config(name)
        assert (text, stem, source) == (path.read_text(encoding="utf-8"), name, f"<bundled {name}>")
    assert C.locate_config("quickstart.yaml")[1] == "quickstart"


def test_unknown_config_names_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config file not found: nope \(bundled configs: "):
        C.locate_config("nope")
    with pytest.raises(ConfigError, match="config file not found: sub/quickstart"):
        C.locate_config("sub/quickstart")  # a bundled name only as a bare name


def _cli(args, cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    code = "import jaxopt2, sys; print('jaxopt2 from', jaxopt2.__file__, file=sys.stderr); "
    code += "from jaxopt2.cli import main; raise SystemExit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _check_list_and_run(cwd, pythonpath, package_dir):
    out = _cli(["list"], cwd, pythonpath)
    assert out.returncode == 0, out.stderr
    assert f"jaxopt2 from {package_dir}" in out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("bundled configs"))
    assert line.split(": ", 1)[1].split(", ") == sorted(CONFIG_FILES)
    out = _cli(["run", "quickstart", "steps=2", "log_every=2", "eval_every=2"], cwd, pythonpath)
    assert out.returncode == 0, out.stderr
    assert (cwd / "runs" / "quickstart" / "summary.json").is_file()
    saved = (cwd / "runs" / "quickstart" / "config.yaml").read_text()
    assert "name: digits_classifier" in saved


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_editable_install_runs_bundled_configs_from_another_directory(tmp_path):
    _check_list_and_run(tmp_path, None, ROOT / "jaxopt2")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_ships_the_configs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("jaxopt2", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("jaxopt2-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    assert "jaxopt2/py.typed" in names
    assert meta["Version"] == jaxopt2.__version__
    assert wheel.name.startswith(f"jaxopt2-{jaxopt2.__version__}-")
    core = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    core_names = {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in core}
    assert core_names == {"jax", "jaxlib", "optax", "numpy"}, core
    assert not core_names & {*_RUNNER_MODULES.values(), "chex"}
    site = tmp_path / "site"
    inst = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert inst.returncode == 0, inst.stdout + inst.stderr
    assert (site / "jaxopt2" / "py.typed").is_file()
    shipped = sorted(p.stem for p in (site / "jaxopt2" / "configs").glob("*.yaml"))
    assert shipped == sorted(CONFIG_FILES)
    assert not (site / "jaxopt2" / "experiment" / "_bundled.py").exists()
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    _check_list_and_run(cwd, site, site / "jaxopt2")
