"""``jaxopt2 sweep``: a grid over numeric hyperparameters and seeds, in ONE compiled program.

Command line::

    jaxopt2 sweep CONFIG optimizer.learning_rate=1e-4,1e-3,1e-2 [optimizer.b1=0.9,0.95]
                  [seed=0,1,2] [other.key=value ...] [--run-dir DIR] [--overwrite]

An argument ``key=v1,v2,...`` (a comma in a value that is not a YAML list or mapping) is a
grid axis; ``key=value`` is an ordinary config override. The members are the product of the
hyperparameter axes (the *points*) times the seeds.

How it runs: every member is an ordinary run config, validated like ``jaxopt2 run`` would.
It is trained by the runner's one engine (:mod:`jaxopt2.experiment.engine`): each distinct
seed's :class:`~jaxopt2.experiment.setup.Setup` gives the initial parameters and keys, stacked
along a leading member axis, and one program runs a ``lax.scan`` over ``log_every`` steps of
a ``jax.vmap`` over members of the run's own step, with the optimizer built from the member's
hyperparameters as traced values (learning rate schedules take a traced peak). So a member
computes what ``jaxopt2 run`` computes for its config (same initialization, batches and
keys).

Only numeric hyperparameters can vary inside one program: ``optimizer.learning_rate``,
``optimizer.weight_decay``, ``optimizer.clip_grad_norm``, ``optimizer.min_lr_ratio`` and any
optimizer argument that is not in its registry entry's ``static_args``; plus ``seed``.
Anything else (steps, batch size, model sizes, schedules, static optimizer arguments) changes
the program's structure and is refused with a message.

A member whose loss or update turns non-finite is *diverged* (under ``nonfinite: stop``, the
default): its parameters freeze at the last good step and the step it diverged at is
reported; the others go on (the engine's non-finite policy, the same as a run's: when every
member has diverged, the sweep stops there). Under ``nonfinite: skip`` such updates are
dropped and counted.

Outputs in the run directory: ``config.yaml`` (the resolved config of the first member),
``grid.yaml`` (the axes and seeds), ``results.json`` and ``results.md`` (per member and per
point: mean/std over seeds), ``metrics.jsonl`` (one row per ``log_every`` steps with every
member's loss), ``sweep.png`` (final loss against the learning rate, one line per value of
the other axes with error bars over seeds; and the loss curves), ``params.npz`` (every
member's final parameters stacked along a leading member axis), ``checkpoints/``.

Checkpoints and resume, as for ``jaxopt2 run``: the stacked state of all members is saved
every ``checkpoint.every`` steps and at the end; the same command on the same run directory
resumes from the newest checkpoint (after a kill, SIGTERM or Ctrl-C) and gives the numbers
an uninterrupted sweep gives. SIGTERM / SIGINT save a checkpoint after the current chunk and
exit with 128 + the signal number.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal, TextIO

import jax
import numpy as np
from omegaconf import OmegaConf

from jaxopt2.experiment import sweep_report as R
from jaxopt2.experiment.engine import Engine
from jaxopt2.experiment.errors import UserError
from jaxopt2.experiment.rundir import atomic_write, clean, save_params
from jaxopt2.experiment.setup import Setup, build_setup
from jaxopt2.experiment.sweep_grid import (
    SWEEPABLE_RUNNER_FIELDS,
    Grid,
    SweepPlan,
    parse_sweep_args,
    prepare_sweep,
)
from jaxopt2.experiment.sweep_report import SweepResult

__all__ = [
    "SWEEPABLE_RUNNER_FIELDS",
    "Grid",
    "SweepResult",
    "build_engine",
    "parse_sweep_args",
    "prepare_sweep",
    "run_sweep",
    "sweep",
]


def build_engine(plan: SweepPlan) -> Engine:
    """The engine of every member of `plan` (one setup per distinct seed)."""
    setups: dict[int, Setup] = {}
    for m in plan.members:
        if m.seed not in setups:
            setups[m.seed] = build_setup(m.rc)
    hyper = {k: [m.values[k] for m in plan.members] for k in plan.grid.axes}
    return Engine(plan.base, [setups[m.seed] for m in plan.members], hyper)


def sweep_row(members: list[dict[str, Any]], common: dict[str, Any]) -> dict[str, Any]:
    """A sweep's metrics row: every member's loss and window mean, eval and diagnostics
    fields as lists (None for a diverged member)."""
    row = {
        **common,
        "loss": [m["loss"] for m in members],
        "loss_mean": [m["loss_mean"] for m in members],
        "diverged": sum(1 for m in members if m["diverged_at"]),
    }
    skip = {"loss", "loss_mean", "grad_norm", "update_norm", "param_norm", "lr", "nonfinite"}
    skip |= {"diverged_at", "diag_time"}
    for k in members[0]:
        if k not in skip:
            row[k] = [m.get(k) for m in members]
    return row


_DIAG_FINALS = ("sharpness", "trace", "grad_topk_share")


def run_sweep(
    plan: SweepPlan,
    run_dir: Path | None,
    *,
    progress: bool | None = None,
    stream: TextIO | Literal["stdout"] | None = "stdout",
    plots: bool = True,
    handle_signals: bool = False,
) -> SweepResult:
    """Train every member of `plan` in one program and write the outputs into `run_dir`
    (None: no files, no checkpoints); print a summary to `stream`.

    With a `run_dir`, the state of all members is checkpointed every
    ``checkpoint.every`` steps (rounded up to a chunk of ``log_every``) and at the end, and a
    rerun resumes from the newest checkpoint: the metrics rows after it are dropped and
    recomputed, so a killed sweep continues as if it had not stopped. With `handle_signals`,
    SIGTERM / SIGINT finish the current chunk, save a checkpoint and return exit code
    128 + signum.
    """
    if stream == "stdout":
        stream = sys.stdout
    t_start = time.perf_counter()
    engine = build_engine(plan)
    m_count = engine.n_members
    skip_mode = engine.skip_mode

    def postfix(row: dict[str, Any]) -> dict[str, Any]:
        finite = [v for v in row["loss_mean"] if v is not None]
        return {"best": f"{min(finite):.4g}" if finite else "nan", "diverged": row["diverged"]}

    res = engine.train(
        run_dir,
        row_fields=sweep_row,
        handle_signals=handle_signals,
        progress=progress,
        desc=f"sweep ({m_count} members)",
        postfix=postfix,
    )
    step, train_time, rows, carry = res.step, res.train_time, res.rows, res.carry
    interrupted = res.signal if res.status == "interrupted" else None
    if interrupted is not None:
        where = f"checkpoint saved at step {step} in {run_dir}; run the same command again "
        print(
            f"sweep interrupted by signal {interrupted}: "
            + (where + "to resume." if run_dir is not None else "nothing saved (no run dir)."),
            file=sys.stderr,
        )
        return SweepResult(
            128 + int(interrupted), [], [], None, train_time, engine.compile_time,
            time.perf_counter() - t_start, engine.trace_count, engine.setup.n_params, step,
            res.resumed_from,
        )  # fmt: skip

    best = np.full(m_count, np.inf)
    for r in rows:
        for j, v in enumerate(r["loss_mean"]):
            if v is not None:
                best[j] = min(best[j], v)
    diverged_at = np.asarray(jax.device_get(carry["diverged_at"]))
    nonfinite = np.asarray(jax.device_get(carry["nonfinite"]))
    members = []
    last_row = rows[-1]
    for j, mem in enumerate(plan.members):
        d = int(diverged_at[j])
        diverged = d > 0
        rec: dict[str, Any] = {
            "member": j,
            **{k: v for k, v in mem.values.items()},
            "seed": mem.seed,
            "status": "diverged" if diverged else "complete",
            "diverged": diverged,
            "diverged_step": d if diverged else None,
            "final_loss": None if diverged else last_row["loss"][j],
            "final_loss_mean": None if diverged else last_row["loss_mean"][j],
            "best_loss": clean(float(best[j])) if np.isfinite(best[j]) else None,
        }
        if skip_mode:
            rec["nonfinite_steps"] = int(nonfinite[j])
        if not diverged:
            # the last row already holds the final evaluation (made when the run ended)
            rec.update({k: v[j] for k, v in last_row.items() if k.startswith("eval_")})
            for key in _DIAG_FINALS:
                logged = [r[key][j] for r in rows if r.get(key) is not None]
                if logged:
                    rec[f"final_{key}"] = logged[-1]
        members.append(rec)
    points = R.aggregate(plan, members)
    result = SweepResult(
        0, members, points, R.best_point(points), train_time, engine.compile_time,
        time.perf_counter() - t_start, engine.trace_count, engine.setup.n_params, step,
        res.resumed_from,
    )  # fmt: skip
    if run_dir is not None:
        save_params(run_dir, engine.eval_params(carry))  # stacked: a leading member axis
        R.write_outputs(plan, result, rows, run_dir, plots)
    if stream is not None:
        print(R.format_sweep_summary(plan, result, run_dir), file=stream)
    return result


_CONFIG_HEADER = (
    "# jaxopt2 sweep: the resolved config of the first member; the keys in grid.yaml\n"
    "# are swept (`jaxopt2 run` of this file trains that first member).\n"
)


def prepare_sweep_dir(run_dir: Path, plan: SweepPlan, overwrite: bool = False) -> bool:
    """Create `run_dir` with the sweep's ``config.yaml`` and ``grid.yaml``, or reuse it if it
    holds the same sweep (it then resumes from its checkpoint); a different sweep or a
    non-sweep directory is refused unless `overwrite`. Returns True when reused."""
    cfg_path, grid_path = run_dir / "config.yaml", run_dir / "grid.yaml"
    grid = R.grid_data(plan)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} exists and is not a directory")
    same = False
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if cfg_path.is_file() and grid_path.is_file():
            try:
                same = (
                    OmegaConf.to_container(OmegaConf.load(cfg_path)) == plan.base.data
                    and OmegaConf.to_container(OmegaConf.load(grid_path)) == grid
                )
            except Exception:
                same = False
        if not same and not overwrite:
            what = "holds a different sweep" if grid_path.is_file() else "is not empty and no sweep"
            raise UserError(
                f"run dir {run_dir} {what}.\nPass --overwrite to replace it, or "
                "--run-dir to choose another directory."
            )
        if not same:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not same:
        atomic_write(cfg_path, _CONFIG_HEADER + plan.base.to_yaml())
        atomic_write(grid_path, OmegaConf.to_yaml(OmegaConf.create(grid)))
    return same


def sweep(
    spec: str,
    items: list[str] | tuple[str, ...],
    run_dir: Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    stream: TextIO | Literal["stdout"] | None = "stdout",
    plots: bool = True,
    handle_signals: bool = False,
) -> SweepResult:
    """``jaxopt2 sweep`` in-process: validate, prepare (or resume) the run dir, train, write
    outputs."""
    plan = prepare_sweep(spec, items)
    if run_dir is None:
        run_dir = Path("runs") / f"{plan.stem}-sweep"
    prepare_sweep_dir(run_dir, plan, overwrite=overwrite)
    return run_sweep(
        plan, run_dir, progress=progress, stream=stream, plots=plots, handle_signals=handle_signals
    )
