"""The documentation site builds with warnings as errors, and documents every public name.

The site (docs/) needs the `docs` extra: sphinx, myst-parser and furo, which the `test` extra
includes. One build per session (about 25 s on one core), shared by the tests below.
"""

import importlib
import pathlib
import subprocess
import sys
import time
import types
import zlib

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The public namespaces: every name in their __all__ has an entry in the API reference.
PUBLIC_MODULES = (
    "jaxopt2",
    "jaxopt2.curvature",
    "jaxopt2.optimizers",
    "jaxopt2.optimizers.kfac",
    "jaxopt2.solvers",
    "jaxopt2.linalg",
    "jaxopt2.sharding",
    "jaxopt2.cpu",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Builds the HTML site once: (completed process, output folder, seconds)."""
    for package in ("sphinx", "myst_parser", "furo"):
        pytest.importorskip(package, reason="pip install -e '.[docs]' (the test extra has it)")
    out = tmp_path_factory.mktemp("docs_html")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    start = time.perf_counter()
    proc = subprocess.run(
        [*cmd, str(ROOT / "docs"), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    return proc, out, time.perf_counter() - start


def _inventory(path):
    """Names in a Sphinx objects.inv (version 2): {(domain:role, name)}."""
    data = path.read_bytes()
    lines = data.split(b"\n", 4)
    assert lines[0].startswith(b"# Sphinx inventory version 2"), lines[0]
    assert b"zlib" in lines[3], lines[3]
    entries = set()
    for line in zlib.decompress(lines[4]).decode("utf-8").splitlines():
        name, role = line.split(" ", 2)[:2]
        entries.add((role, name))
    return entries


def _expected_names():
    """Fully qualified names the reference must have: a module's name for a module."""
    names = set()
    for modname in PUBLIC_MODULES:
        module = importlib.import_module(modname)
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                names.add(("py:module", obj.__name__))
            else:
                names.add((None, f"{modname}.{name}"))
    return names


def test_docs_build_without_warnings(site):
    proc, out, seconds = site
    assert proc.returncode == 0, f"sphinx -W failed after {seconds:.0f} s:\n{proc.stderr[-4000:]}"
    assert (out / "index.html").is_file()
    assert (out / "api" / "generated" / "jaxopt2.kfac.html").is_file()


def test_every_public_name_is_documented(site):
    proc, out, _ = site
    assert proc.returncode == 0, proc.stderr[-4000:]
    documented = _inventory(out / "objects.inv")
    python_names = {name for role, name in documented if role.startswith("py:")}
    missing = sorted(
        name
        for role, name in _expected_names()
        if ((role, name) not in documented if role else name not in python_names)
    )
    assert not missing, (
        f"{len(missing)} public name(s) not in the API reference (docs/api/*.rst): {missing}"
    )


def test_guide_images_are_in_the_site(site):
    """The benchmark and study plots are found by the build (relative paths into experiments/)."""
    proc, out, _ = site
    assert proc.returncode == 0, proc.stderr[-4000:]
    images = {p.name for p in (out / "_images").iterdir()}
    for page in ("benchmarks.html", "studies.html", "transformers.html"):
        html = (out / page).read_text(encoding="utf-8")
        assert "_images/" in html, page
    assert {"bench_kfac.png", "edge_of_stability.png", "lm_shootout.png"} <= images, images
