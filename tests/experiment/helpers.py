"""Assertions and process helpers shared by the runner's command-line tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def assert_user_error(capsys, rc, *needles: str, code: int | None = 2) -> str:
    """A user error: exit `code` (any failure when None), 1-3 stderr lines naming `needles`,
    no traceback. Returns the captured stderr."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code is None:
        assert rc not in (0, None), err
    else:
        assert rc == code, err
    assert 1 <= len(lines) <= 3, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def cli_env() -> dict[str, str]:
    """The environment of a ``python -m jaxopt2`` child: this checkout first, no x64 flag."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    """``python -m jaxopt2 ARGS`` as a child process (text pipes for stdout and stderr)."""
    return subprocess.Popen(
        [sys.executable, "-m", "jaxopt2", *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def last_step(run_dir: Path) -> int:
    """The step of the last complete row of ``metrics.jsonl`` (0: none yet)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError):
            continue
    return 0


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120):
    """Wait until `proc` has logged `step` (fails if it ends first or stalls)."""
    t0 = time.monotonic()
    while last_step(run_dir) < step:
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout, "run made no progress"
        time.sleep(0.01)
