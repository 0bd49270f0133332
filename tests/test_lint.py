"""The checks a contributor runs before a commit, run by the suite: ruff's lint and format
check on the whole repository, and mypy on the library (zero errors).

Each runs the tool in a child process from the repository root with the configuration in
pyproject.toml, and fails with the tool's own report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=280
    )


def test_ruff_check():
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ruff_format_check():
    out = _run("ruff", "format", "--check", ".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_mypy_library():
    pytest.importorskip("mypy", reason="mypy comes with the test extra")
    out = _run("mypy", "--no-error-summary", "--cache-dir", "/dev/null")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
