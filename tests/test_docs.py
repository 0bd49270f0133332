"""The runnable examples in docstrings, the README and the docs pages stay correct."""

import doctest
import importlib
import json
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import jaxopt2

pytestmark = pytest.mark.timeout(300)

_SKIP_PREFIXES = ("jaxopt2.experiment", "jaxopt2.cli", "jaxopt2.__main__")


def _library_modules():
    from jaxopt2._moved import MOVED  # old paths of private modules: each is its new module

    for info in pkgutil.walk_packages(jaxopt2.__path__, "jaxopt2."):
        if not info.name.startswith(_SKIP_PREFIXES) and info.name not in MOVED:
            yield info.name


@pytest.mark.parametrize("name", sorted(_library_modules()))
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_importing_jaxopt2_initializes_no_backend():
    code = (
        "import jaxopt2, jaxopt2.curvature, jaxopt2.optimizers\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge._backends, xla_bridge._backends\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# An executed example is a ```python fence. A block shown but not run is a ```{code-block} python
# (or ```text) fence: the docs' migration pages show other libraries' code that way.
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
_ROOT = pathlib.Path(__file__).resolve().parents[1]
_EXAMPLE_PAGES = sorted(
    p.relative_to(_ROOT).as_posix()
    for p in (_ROOT / "docs").rglob("*.md")
    if "_build" not in p.parts and _PYTHON_BLOCK.search(p.read_text(encoding="utf-8"))
)


def _run_python_blocks(path, tmp_path, timeout):
    """A page's python blocks, concatenated in order, run in one child process."""
    blocks = _PYTHON_BLOCK.findall((_ROOT / path).read_text(encoding="utf-8"))
    script = tmp_path / "examples.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )
    assert out.returncode == 0, f"{path}:\n{out.stderr[-3000:]}"
    return blocks


def test_readme_python_examples_run(tmp_path):
    # The examples build on each other (blocks of one page share one process).
    assert _run_python_blocks("README.md", tmp_path, timeout=240), "README has no python examples"


# The pages' examples share one child process (one interpreter start and one jax import for
# all of them), each page in a fresh namespace and a fresh working directory: a page's blocks
# build on each other, but no page relies on another page's names.
_PAGES_DRIVER = """
import json, os, runpy, sys, traceback
results = {}
for page, script in json.loads(sys.argv[1]):
    os.chdir(os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
        results[page] = None
    except BaseException:
        results[page] = traceback.format_exc()[-3000:]
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def docs_page_results(tmp_path_factory):
    jobs = []
    for page in _EXAMPLE_PAGES:
        blocks = _PYTHON_BLOCK.findall((_ROOT / page).read_text(encoding="utf-8"))
        work = tmp_path_factory.mktemp(page.replace("/", "_").removesuffix(".md"))
        (work / "examples.py").write_text("\n".join(blocks), encoding="utf-8")
        jobs.append((page, str(work / "examples.py")))
    out = subprocess.run(
        [sys.executable, "-c", _PAGES_DRIVER, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULTS "))


@pytest.mark.timeout(660)
@pytest.mark.parametrize("page", _EXAMPLE_PAGES)
def test_docs_python_examples_run(page, docs_page_results):
    error = docs_page_results[page]
    assert error is None, f"{page}:\n{error}"
