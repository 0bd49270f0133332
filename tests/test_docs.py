"""The runnable examples in docstrings and the README stay correct."""

import doctest
import importlib
import pkgutil

import pytest

import jaxopt2

pytestmark = pytest.mark.timeout(300)

_SKIP_PREFIXES = ("jaxopt2.experiment", "jaxopt2.cli", "jaxopt2.__main__")


def _library_modules():
    for info in pkgutil.walk_packages(jaxopt2.__path__, "jaxopt2."):
        if not info.name.startswith(_SKIP_PREFIXES):
            yield info.name


@pytest.mark.parametrize("name", sorted(_library_modules()))
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_importing_jaxopt2_initializes_no_backend():
    import subprocess
    import sys

    code = (
        "import jaxopt2, jaxopt2.curvature, jaxopt2.optimizers\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge._backends, xla_bridge._backends\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_readme_python_examples_run(tmp_path):
    import pathlib
    import re
    import subprocess
    import sys

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    assert blocks, "README has no python examples"
    # The examples build on each other (the curvature one uses the training loop's names).
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(blocks))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
