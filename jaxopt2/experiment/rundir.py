"""Run directories: creating / checking them, atomic file writes, the metrics file.

A run directory holds ``config.yaml`` (the resolved config: a rerun with the same config
resumes, a different one is refused), ``metrics.jsonl`` (one JSON row per chunk of steps;
a torn last line from a kill is ignored), and whatever the runner writes next to them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import OmegaConf

from jaxopt2.experiment.config import ResolvedConfig
from jaxopt2.experiment.errors import UserError

__all__ = [
    "StopSignals",
    "atomic_write",
    "clean",
    "load_params",
    "prepare_run_dir",
    "read_metrics",
    "save_params",
]


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(new) + [k for k in old if k not in new]:
            d = _first_difference(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
            if d:
                return d
        return None
    if old != new:
        return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"
    return None


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a kill leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_run_dir(run_dir: Path, rc: ResolvedConfig, overwrite: bool = False) -> bool:
    """Create or check a run directory; True if it holds this same config (resume).

    Raises:
      UserError: the directory holds a different config (without `overwrite`) or is not a
        run directory.
    """
    cfg_path = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} exists and is not a directory")
    if run_dir.is_dir() and cfg_path.is_file():
        try:
            saved = OmegaConf.to_container(OmegaConf.load(cfg_path))
        except Exception:
            saved = None
        if saved == rc.data:
            return True
        without_mesh = lambda d: {k: v for k, v in d.items() if k != "mesh"}
        if isinstance(saved, dict) and without_mesh(saved) == without_mesh(rc.data):
            atomic_write(cfg_path, rc.to_yaml())  # the same run on another device layout
            return True
        if not overwrite:
            diff = _first_difference(saved, rc.data) if isinstance(saved, dict) else None
            raise UserError(
                f"run dir {run_dir} holds a run with a different config"
                + (f" ({diff})" if diff else "")
                + ".\nPass --overwrite to replace it, or --run-dir to choose another directory."
            )
        shutil.rmtree(run_dir)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(
            f"run dir {run_dir} exists, is not empty and has no config.yaml (not a jaxopt2 "
            "run);\nchoose another --run-dir."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(cfg_path, rc.to_yaml())
    return False


def read_metrics(path: Path, max_step: int | None = None) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a torn last line is ignored), optionally up to `max_step`."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            if max_step is None or row["step"] <= max_step:
                rows.append(row)
    return rows


def clean(v: Any) -> Any:
    """A JSON-ready Python scalar: NumPy numbers converted, non-finite floats as None."""
    if isinstance(v, float | np.floating):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def save_params(run_dir: Path, params: Any) -> None:
    """``params.npz`` in `run_dir`: one array per leaf, named by its pytree path (``w1``,
    ``layers[0].weight``, ...), written atomically."""

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    # Any values: mypy checks **arrays against np.savez's allow_pickle: bool as well.
    arrays: dict[str, Any] = {jax.tree_util.keystr(p).lstrip("."): np.asarray(v) for p, v in flat}
    tmp = run_dir / ".params.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, run_dir / "params.npz")


def load_params(path: Path, like: Any, member: int | None = None) -> Any:
    """The parameters in a ``params.npz`` written by :func:`save_params`, as a pytree shaped
    like `like` (host arrays; row `member` of a sweep's stacked file)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    with np.load(path) as z:
        leaves = [z[jax.tree_util.keystr(p).lstrip(".")] for p, _ in flat]
    return jax.tree.unflatten(treedef, [x if member is None else x[member] for x in leaves])


class StopSignals:
    """While installed (`enabled`), SIGTERM / SIGINT are recorded in ``received`` instead of
    killing the process: a training loop stops after its current chunk and checkpoints."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.received: int | None = None
        self._old: dict[signal.Signals, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        del frame
        self.received = signum

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
