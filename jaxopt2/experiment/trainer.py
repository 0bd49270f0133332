"""``jaxopt2 run``: one config trained in its run directory, by the engine as a sweep of one.

:class:`Trainer` builds the run's :class:`~jaxopt2.experiment.setup.Setup` and an
:class:`~jaxopt2.experiment.engine.Engine` of that one member (the compiled program, the host
loop, the non-finite policy and checkpoints are the engine's; see its module docstring), and
writes what a run writes: ``metrics.jsonl`` rows of scalars, ``summary.json``, the plots and
``params.npz`` (at the optimizer's evaluation parameters). A non-finite stop raises
:class:`~jaxopt2.experiment.errors.NonFiniteError` (exit code 3) after the summary is written;
SIGTERM / SIGINT end with 128 + signum after a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TextIO

import jax

from jaxopt2.experiment.config import ResolvedConfig
from jaxopt2.experiment.distributed import barrier, host_values, is_writer
from jaxopt2.experiment.engine import Engine
from jaxopt2.experiment.errors import ConfigError, NonFiniteError
from jaxopt2.experiment.optim import build_optimizer
from jaxopt2.experiment.plots import plot_run, plot_sharpness
from jaxopt2.experiment.rundir import atomic_write, prepare_run_dir, read_metrics, save_params
from jaxopt2.experiment.setup import build_setup

__all__ = ["ConfigError", "RunResult", "Trainer", "format_summary", "run_config"]

_ROW_KEYS = ("loss", "loss_mean", "grad_norm", "update_norm", "param_norm", "lr")


@dataclasses.dataclass
class RunResult:
    """What :meth:`Trainer.train` ended with."""

    status: str  # complete | interrupted | nonfinite
    exit_code: int
    step: int
    summary: dict[str, Any]


def run_row(members: list[dict[str, Any]], common: dict[str, Any]) -> dict[str, Any]:
    """A run's metrics row: the one member's fields as scalars."""
    (m,) = members
    row = {"step": common["step"], **{k: m[k] for k in _ROW_KEYS}}
    row.update(step_time=common["step_time"], time=common["time"], nonfinite=m["nonfinite"])
    skip = set(_ROW_KEYS) | {"nonfinite", "diverged_at"}
    row.update({k: v for k, v in m.items() if k not in skip})
    return row


class Trainer:
    """One run of a resolved config in a run directory.

    Args:
      rc: the validated config.
      run_dir: where config.yaml, metrics.jsonl, summary.json, plots and checkpoints go
        (see :func:`prepare_run_dir`).
      progress: show a tqdm bar (None: only on a terminal).
      stream: where the final summary is printed (None: nowhere; "stdout": sys.stdout at the
        time of the call).
      plots: write PNG plots at the end.
    """

    def __init__(
        self,
        rc: ResolvedConfig,
        run_dir: Path | str,
        *,
        progress: bool | None = None,
        stream: TextIO | Literal["stdout"] | None = "stdout",
        plots: bool = True,
        label: str = "",
    ):
        self.rc = rc
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.stream = sys.stdout if stream == "stdout" else stream
        self.plots = plots
        self.label = label
        self.setup = build_setup(rc)
        self.engine = Engine(rc, [self.setup])
        self.opt = build_optimizer(rc)
        s = self.setup
        self.task, self.loss_fn, self.n_params = s.task, s.loss_fn, s.n_params
        self.batch_size, self.steps_per_epoch = s.batch_size, s.steps_per_epoch
        self.data_key, self.opt_key, self.diag_key = s.data_key, s.opt_key, s.diag_key
        self.batch = s.batch
        self.resumed_from: int | None = None

    @property
    def train_data(self) -> tuple[jax.Array, ...]:
        return self.setup.train_data

    @property
    def eval_data(self) -> tuple[jax.Array, ...] | None:
        return self.setup.eval_data

    @property
    def sampled(self) -> bool:
        return self.setup.sampled

    @property
    def trace_count(self) -> int:
        return self.engine.trace_count

    @property
    def eval_trace_count(self) -> int:
        return self.engine.eval_trace_count

    @property
    def diag_trace_count(self) -> int:
        return self.engine.diag_trace_count

    @property
    def compile_time(self) -> float:
        return self.engine.compile_time

    @property
    def init_carry(self) -> dict[str, Any]:
        """The initial state in the layout of a run's checkpoints (no member axis)."""
        return self.engine.saved_state(self.engine.init())

    def compile(self) -> None:
        """Compile the fused train step (and the evaluation, diagnostics) once; idempotent."""
        self.engine.compile()

    def train(self, handle_signals: bool = False) -> RunResult:
        """Train (or resume) to ``steps``; returns how it ended.

        Raises:
          NonFiniteError: a non-finite loss/update under ``nonfinite: stop``.
        """
        eng = self.engine
        res = eng.train(
            self.run_dir,
            row_fields=run_row,
            handle_signals=handle_signals,
            progress=self.progress,
            desc=self.label or self.rc.optimizer.name,
            postfix=lambda row: {
                "loss": f"{row['loss_mean']:.4g}" if row["loss_mean"] is not None else "nan"
            },
        )
        self.resumed_from = res.resumed_from
        step, saved_step = res.step, res.saved_step
        status, exit_code = res.status, 0
        if status == "nonfinite":
            exit_code = NonFiniteError.exit_code
        elif status == "interrupted":
            assert res.signal is not None  # an interrupted run records its signal
            exit_code = 128 + int(res.signal)
        self.final_carry = eng.saved_state(res.carry)
        if status == "complete":
            final = host_values(jax.tree.map(lambda x: x[0], eng.eval_params(res.carry)))
            if is_writer():
                save_params(self.run_dir, final)
        summary = self.write_summary(status, step, saved_step)
        if status == "nonfinite":
            where = (
                f"last good checkpoint: step {saved_step}"
                if saved_step is not None
                else "no checkpoint was saved"
            )
            raise NonFiniteError(
                f"non-finite loss or update at step {step + 1} (nonfinite: stop); training "
                f"stopped, {where} in {self.run_dir}.\nLower the learning rate, set "
                "optimizer.clip_grad_norm, or set nonfinite=skip."
            )
        if status == "interrupted":
            print(
                f"interrupted by signal {res.signal}: checkpoint saved at step "
                f"{step} in {self.run_dir}; run the same command again to resume.",
                file=sys.stderr,
            )
        return RunResult(status, exit_code, step, summary)

    # ------------------------------------------------------------------ summary

    def write_summary(self, status: str, step: int, saved_step: int | None) -> dict[str, Any]:
        rc = self.rc
        rows = read_metrics(self.run_dir / "metrics.jsonl")
        last = rows[-1] if rows else {}
        evals = [r for r in rows if "eval_loss" in r]
        train_time = float(last.get("time", 0.0))
        summary: dict[str, Any] = {
            "status": status,
            "task": rc.task_spec.name,
            "model": rc.model_name,
            "optimizer": rc.optimizer.name,
            "learning_rate": rc.optimizer.learning_rate,
            "schedule": rc.optimizer.schedule,
            "steps": step,
            "steps_requested": rc.run.steps,
            "batch_size": self.batch_size,
            "num_params": self.n_params,
            "final_loss": last.get("loss"),
            "final_loss_mean": last.get("loss_mean"),
            "train_time_s": train_time,
            "compile_time_s": self.compile_time,
            "mean_step_time_s": train_time / step if step else None,
            "nonfinite_steps": last.get("nonfinite", 0),
            "last_checkpoint_step": saved_step,
            "resumed_from_step": self.resumed_from,
        }
        eng = self.engine
        if eng.mesh is not None:  # the layout it trained on (a resume may use another)
            summary["mesh"] = {
                **{k: int(v) for k, v in eng.mesh.shape.items()},
                "processes": jax.process_count(),
                "feed": "host" if eng.host_feed else "device",
            }
        if evals:
            for k, v in evals[-1].items():
                if k.startswith("eval_"):
                    summary[f"final_{k}"] = v
            losses = [r["eval_loss"] for r in evals if r["eval_loss"] is not None]
            if losses:
                summary["best_eval_loss"] = min(losses)
        sharp = [r for r in rows if r.get("sharpness") is not None]
        if sharp:
            summary["final_sharpness"] = sharp[-1]["sharpness"]
            lr = sharp[-1].get("lr")
            if rc.optimizer.schedule == "constant":
                lr = rc.optimizer.learning_rate
            summary["final_stability_threshold"] = 2.0 / lr if lr else None
        if not is_writer():
            return summary
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.plots and rows:
            title = f"{rc.task_spec.name} / {rc.model_name} / {rc.optimizer.name}"
            plot_run(rows, self.run_dir / "loss.png", title)
            if any(r.get("sharpness") is not None for r in rows):
                plot_sharpness(rows, self.run_dir / "sharpness.png", title)
        if self.stream is not None and status != "nonfinite":
            print(format_summary(summary, self.run_dir), file=self.stream)
        return summary


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "n/a" if v is None else format(v, spec)


def format_summary(s: dict[str, Any], run_dir: Path) -> str:
    lr = s.get("learning_rate")
    head = f"{s['task']} / {s['model']} / {s['optimizer']}"
    if lr is not None:
        head += f" (lr {lr:g}, {s['schedule']})"
    lines = [f"jaxopt2 run: {head} — {s['status']}"]
    steps = f"{s['steps']}/{s['steps_requested']}"
    if s.get("resumed_from_step"):
        steps += f" (resumed from step {s['resumed_from_step']})"
    lines.append(f"  steps       {steps}, batch {s['batch_size']}, {s['num_params']} params")
    lines.append(
        f"  train loss  {_fmt(s['final_loss'])} (last-window mean {_fmt(s['final_loss_mean'])})"
    )
    ev = [
        f"{k[len('final_eval_') :]} {_fmt(v)}" for k, v in s.items() if k.startswith("final_eval_")
    ]
    if ev:
        lines.append("  eval        " + ", ".join(ev))
    if s.get("final_sharpness") is not None:
        thr = s.get("final_stability_threshold")
        lines.append(
            f"  sharpness   {_fmt(s['final_sharpness'])}"
            + (f" (2/lr = {_fmt(thr)})" if thr is not None else "")
        )
    if s.get("nonfinite_steps"):
        lines.append(f"  non-finite  {s['nonfinite_steps']} steps skipped")
    mst = s.get("mean_step_time_s")
    timing = f"{s['train_time_s']:.2f} s training"
    if s.get("compile_time_s"):
        timing += f" + {s['compile_time_s']:.2f} s compile"
    if mst:
        timing += f"; {mst * 1e3:.3f} ms/step ({1 / mst:.0f} steps/s)"
    lines.append(f"  time        {timing}")
    lines.append(f"  run dir     {run_dir}  (summary.json, metrics.jsonl, loss.png, checkpoints/)")
    return "\n".join(lines)


def run_config(
    rc: ResolvedConfig,
    run_dir: Path,
    *,
    overwrite: bool = False,
    handle_signals: bool = False,
    progress: bool | None = None,
    stream: TextIO | Literal["stdout"] | None = "stdout",
    label: str = "",
    on_trainer: Callable[[Trainer], None] | None = None,
) -> RunResult:
    """Prepare the run directory and train (resuming when it holds the same config)."""
    # Build the task first: a missing or malformed data file is reported before the run dir
    # (and its config.yaml) exists, so fixing the path does not make it a "different config".
    if not is_writer():  # one process of a job writes the run dir; the others train along
        stream, progress = None, False
    trainer = Trainer(rc, run_dir, progress=progress, stream=stream, label=label)
    if is_writer():
        prepare_run_dir(run_dir, rc, overwrite=overwrite)
    barrier("run dir prepared")
    if on_trainer is not None:
        on_trainer(trainer)
    return trainer.train(handle_signals=handle_signals)
