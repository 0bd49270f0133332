"""The training loop: one compiled function per run, fused steps, exact resume.

* The train step runs inside ``lax.scan`` over ``log_every`` steps (one host call per chunk,
  per-step metrics stacked). It is compiled ahead of time ONCE per run; a shorter last chunk
  runs the same program with the surplus steps masked off.
* The full training arrays are arguments of that program (never constants); each step picks
  its batch inside it: epoch ``e`` is a permutation drawn from ``fold_in(data_key, e)``, so
  the batch of a step depends only on (seed, step) and a resumed run sees the same batches.
* The optimizer gets ``key=fold_in(opt_key, step)`` through :func:`jaxopt2.value_and_update`,
  so optimizers that need ``value_fn`` or ``key`` work unchanged.
* Non-finite loss or updates: ``nonfinite: stop`` freezes the state at the last good step and
  stops the run (the last good checkpoint stays); ``skip`` drops the update and counts it.
* Checkpoints (orbax) at chunk boundaries; on resume, metric rows after the restored step are
  dropped. SIGTERM / SIGINT: finish the current chunk, save a checkpoint, exit with 128 + signum.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt2.experiment.config import ResolvedConfig
from jaxopt2.experiment.errors import ConfigError, NonFiniteError
from jaxopt2.experiment.optim import build_optimizer, global_norm
from jaxopt2.experiment.rundir import (
    StopSignals,
    atomic_write,
    clean,
    prepare_run_dir,
    read_metrics,
    save_params,
)
from jaxopt2.experiment.step import batch_at, diagnostics_row, epoch_order, train_step

__all__ = ["RunResult", "Trainer", "format_summary", "run_config"]

F32 = jnp.float32
I32 = jnp.int32


# ----------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class RunResult:
    """What :meth:`Trainer.train` ended with."""

    status: str  # complete | interrupted | nonfinite
    exit_code: int
    step: int
    summary: dict[str, Any]


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
        stream: TextIO | str | None = "stdout",
        plots: bool = True,
        label: str = "",
    ):
        self.rc = rc
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.stream = sys.stdout if stream == "stdout" else stream
        self.plots = plots
        self.label = label
        self.trace_count = 0
        self.eval_trace_count = 0
        self._signals = StopSignals(False)
        cfg = rc.run
        self.chunk_len = cfg.log_every

        key = jax.random.PRNGKey(cfg.seed)
        # Independent streams: model init, the data order, the optimizer's per-step keys and the
        # curvature diagnostics. data_key and opt_key are public: the sweep stacks them.
        k_model, self.data_key, self.opt_key = (jax.random.fold_in(key, i) for i in range(3))
        self.diag_key = jax.random.fold_in(key, 3)
        task = rc.task_spec.build(rc.task, rc.model_name, rc.model, k_model)
        self.task = task
        params, self._static = eqx.partition(task.model, eqx.is_inexact_array)
        self.opt = build_optimizer(rc)
        self.train_data = tuple(jnp.asarray(a) for a in task.train)
        self.eval_data = None if task.eval is None else tuple(jnp.asarray(a) for a in task.eval)
        n = task.n_train
        self.batch_size = min(cfg.batch_size, n) if n else 0
        self.steps_per_epoch = n // self.batch_size if n else 1
        self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

        def loss_fn(p, *batch):
            return task.loss(eqx.combine(p, self._static), *batch)

        self.loss_fn = loss_fn
        opt_state = self.opt.tx.init(params)
        self.init_carry = {
            "params": params,
            "opt_state": opt_state,
            "step": jnp.zeros((), I32),
            "nonfinite": jnp.zeros((), I32),
            "halted": jnp.zeros((), jnp.bool_),
        }
        self._compiled = None
        self._compiled_eval = None
        self._compiled_diag = None
        self.diag_trace_count = 0
        self.compile_time = 0.0

    # ------------------------------------------------------------------ the jitted program

    @property
    def sampled(self) -> bool:
        """True when steps see minibatches (False: every step sees the whole training set)."""
        return bool(self.train_data) and self.batch_size < self.task.n_train

    def _perm(self, step: jax.Array, data_key: jax.Array | None = None) -> jax.Array:
        """The row order of the epoch that `step` is in (a function of seed and epoch only)."""
        key = self.data_key if data_key is None else data_key
        return epoch_order(key, step, self.steps_per_epoch, self.task.n_train)

    def batch(
        self,
        data: tuple[jax.Array, ...],
        step: jax.Array,
        perm: jax.Array | None = None,
        *,
        data_key: jax.Array | None = None,
    ) -> tuple[jax.Array, ...]:
        """The batch of `step` (`perm`: that epoch's order, if already computed; `data_key`:
        another seed's data stream instead of this run's)."""
        if not self.sampled:
            return data
        if perm is None:
            perm = self._perm(step, data_key)
        return batch_at(data, perm, step, self.batch_size, self.steps_per_epoch)

    def _chunk(self, carry: dict[str, Any], data: tuple[jax.Array, ...], n_active: jax.Array):
        self.trace_count += 1
        tx, lr_fn = self.opt.tx, self.opt.lr
        skip_mode = self.rc.run.nonfinite == "skip"

        sampled = self.sampled

        def body(c_perm, i):
            c, perm = c_perm
            step = c["step"]
            active = (i < n_active) & ~c["halted"]
            if sampled:  # a new epoch starts: draw its order (once per epoch, not per step)
                perm = jax.lax.cond(
                    step % self.steps_per_epoch == 0, self._perm, lambda s: perm, step
                )
            batch = self.batch(data, step, perm)
            key = jax.random.fold_in(self.opt_key, step)
            loss, updates, new_params, new_opt, finite = train_step(
                tx, self.loss_fn, c["params"], c["opt_state"], batch, key
            )
            ok = active & finite
            bad = active & ~finite

            def pick(new, old):
                return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

            params = pick(new_params, c["params"])
            advance = active & (finite | skip_mode)
            out = {
                "params": params,
                "opt_state": pick(new_opt, c["opt_state"]),
                "step": step + advance.astype(I32),
                "nonfinite": c["nonfinite"] + bad.astype(I32),
                "halted": c["halted"] | (bad & (not skip_mode)),
            }
            lr = lr_fn(step) if lr_fn is not None else jnp.nan
            metrics = {
                "loss": loss.astype(F32),
                "grad_norm": new_opt[0].grad_norm.astype(F32),
                "update_norm": global_norm(updates),
                "param_norm": global_norm(params),
                "lr": jnp.asarray(lr, F32),
                "active": active,
                "bad": bad,
            }
            return (out, perm), metrics

        perm0 = self._perm(carry["step"]) if sampled else jnp.zeros((0,), I32)
        (carry, _), metrics = jax.lax.scan(
            body, (carry, perm0), jnp.arange(self.chunk_len, dtype=I32)
        )
        return carry, metrics

    def eval_metrics(self, params: Any, data: tuple[jax.Array, ...]) -> dict[str, jax.Array]:
        self.eval_trace_count += 1
        model = eqx.combine(params, self._static)
        return {k: jnp.asarray(v, F32) for k, v in self.task.eval_metrics(model, *data).items()}

    def diagnostics_metrics(
        self,
        params: Any,
        data: tuple[jax.Array, ...],
        step: jax.Array,
        *,
        data_key: jax.Array | None = None,
        diag_key: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Curvature diagnostics at `params` (config section ``diagnostics``), one program.

        It runs on the host's schedule, outside the fused train step, so that step stays the
        same program (and as fast) whether diagnostics are on or off. `data_key` / `diag_key`
        replace this run's streams (a sweep passes each member's).
        """
        from jaxopt2.experiment.diagnostics import curvature_metrics

        self.diag_trace_count += 1
        d = self.rc.run.diagnostics
        batch = data if d.batch == "full" else self.batch(data, step, data_key=data_key)
        diag_key = self.diag_key if diag_key is None else diag_key

        def value_fn(p):
            return self.loss_fn(p, *batch)

        grad = jax.grad(value_fn)(params) if d.grad_share else None
        out = curvature_metrics(
            value_fn,
            params,
            jax.random.fold_in(diag_key, step),
            top_k=d.top_k,
            num_iters=min(d.num_iters, self.n_params),
            trace_probes=d.trace_probes,
            grad=grad,
        )
        return {k: jnp.asarray(v, F32) for k, v in out.items()}

    def diagnose(self, params: Any, step: int) -> dict[str, Any]:
        """The diagnostics row fields at `params` (the state after `step` steps)."""
        if self._compiled_diag is None:
            return {}
        t0 = time.perf_counter()
        out = jax.device_get(self._compiled_diag(params, self.train_data, jnp.asarray(step, I32)))
        row = diagnostics_row(out, self.rc.run.diagnostics.top_k)
        row["diag_time"] = time.perf_counter() - t0
        return row

    def check_diagnostics(self) -> None:
        """Refuse a ``diagnostics`` section this model cannot satisfy."""
        d = self.rc.run.diagnostics
        if d.every > 0 and d.top_k > self.n_params:
            raise ConfigError(
                f"diagnostics.top_k ({d.top_k}) exceeds the number of parameters ({self.n_params})"
            )

    def compile(self) -> None:
        """Compile the fused train step (and the evaluation) once; idempotent."""
        if self._compiled is not None:
            return
        t0 = time.perf_counter()
        jitted = jax.jit(self._chunk, donate_argnums=(0,))
        self._compiled = jitted.lower(
            self.init_carry, self.train_data, jnp.asarray(self.chunk_len, I32)
        ).compile()
        if self.eval_data is not None:
            self._compiled_eval = (
                jax.jit(self.eval_metrics)
                .lower(self.init_carry["params"], self.eval_data)
                .compile()
            )
        d = self.rc.run.diagnostics
        if d.every > 0:
            self.check_diagnostics()
            self._compiled_diag = (
                jax.jit(self.diagnostics_metrics)
                .lower(self.init_carry["params"], self.train_data, jnp.asarray(0, I32))
                .compile()
            )
        self.compile_time = time.perf_counter() - t0

    def evaluate(self, params: Any) -> dict[str, float]:
        if self._compiled_eval is None:
            return {}
        out = jax.device_get(self._compiled_eval(params, self.eval_data))
        return {f"eval_{k}": float(v) for k, v in out.items()}

    # ------------------------------------------------------------------ host loop

    def train(self, handle_signals: bool = False) -> RunResult:
        """Train (or resume) to ``steps``; returns how it ended.

        Raises:
          NonFiniteError: a non-finite loss/update under ``nonfinite: stop``.
        """
        from jaxopt2.experiment.checkpoint import Checkpointer

        ckpt = Checkpointer(self.run_dir / "checkpoints", self.rc.run.checkpoint.keep)
        try:
            with StopSignals(handle_signals) as self._signals:
                return self._train(ckpt)
        finally:
            ckpt.close()

    def _train(self, ckpt: Any) -> RunResult:
        cfg = self.rc.run
        metrics_path = self.run_dir / "metrics.jsonl"
        restored = ckpt.restore(self.init_carry)
        if restored is not None:
            carry, meta = restored
            start, train_time = int(meta["step"]), float(meta["train_time"])
        else:
            carry, start, train_time = self.init_carry, 0, 0.0
        # The program donates its carry: give it fresh buffers (an initial state may hold the
        # same buffer twice, and init_carry must stay valid).
        carry = jax.tree.map(lambda x: jnp.array(x, copy=True), carry)
        # Metric rows after the restored step belong to lost work: drop them.
        rows = read_metrics(metrics_path, max_step=start)
        atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        self.resumed_from = start if restored is not None else None
        saved_step = start if restored is not None else None

        step = start
        status, exit_code = "complete", 0
        bar = None
        if step < cfg.steps:
            self.compile()
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.steps,
                initial=step,
                unit="step",
                file=sys.stderr,
                disable=None if self.progress is None else not self.progress,
                desc=self.label or self.rc.optimizer.name,
                dynamic_ncols=True,
                leave=False,
            )
        mf = open(metrics_path, "a", encoding="utf-8")
        try:
            while step < cfg.steps:
                if self._signals.received is not None:
                    break
                n = min(self.chunk_len, cfg.steps - step)
                t0 = time.perf_counter()
                carry, m = self._compiled(carry, self.train_data, jnp.asarray(n, I32))
                m = jax.device_get(m)
                dt = time.perf_counter() - t0
                train_time += dt
                bad = np.flatnonzero(m["bad"][:n])
                halted = bool(len(bad)) and cfg.nonfinite == "stop"
                last = int(bad[0]) if halted else n - 1
                new_step = step + last + 1
                window = m["loss"][: last + 1]
                row = {
                    "step": new_step,
                    "loss": clean(m["loss"][last]),
                    "loss_mean": clean(np.mean(window)) if not halted else None,
                    "grad_norm": clean(m["grad_norm"][last]),
                    "update_norm": clean(m["update_norm"][last]),
                    "param_norm": clean(m["param_norm"][last]),
                    "lr": clean(m["lr"][last]),
                    "step_time": dt / n,
                    "time": train_time,
                    "nonfinite": int(self._count(carry, "nonfinite")),
                }
                if halted:
                    mf.write(json.dumps(row) + "\n")
                    mf.flush()
                    status, exit_code = "nonfinite", NonFiniteError.exit_code
                    step = new_step - 1
                    break
                step = new_step
                at_end = step >= cfg.steps
                if self.eval_data is not None and (
                    at_end
                    or (cfg.eval_every and step // cfg.eval_every > (step - n) // cfg.eval_every)
                ):
                    row.update(self.evaluate(carry["params"]))
                d_every = cfg.diagnostics.every
                if d_every and (at_end or step // d_every > (step - n) // d_every):
                    row.update(self.diagnose(carry["params"], step))
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                if bar is not None:
                    bar.update(n)
                    bar.set_postfix(
                        loss=f"{row['loss_mean']:.4g}" if row["loss_mean"] is not None else "nan",
                        refresh=False,
                    )
                every = cfg.checkpoint.every
                if at_end or step // every > (step - n) // every:
                    ckpt.save(step, carry, {"step": step, "train_time": train_time})
                    saved_step = step
            if self._signals.received is not None and step < cfg.steps:
                status = "interrupted"
                exit_code = 128 + int(self._signals.received)
                if saved_step != step:
                    ckpt.save(step, carry, {"step": step, "train_time": train_time})
                    saved_step = step
        finally:
            mf.close()
            if bar is not None:
                bar.close()

        if status == "complete":
            save_params(self.run_dir, carry["params"])
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
                f"interrupted by signal {self._signals.received}: checkpoint saved at step "
                f"{step} in {self.run_dir}; run the same command again to resume.",
                file=sys.stderr,
            )
        self.final_carry = carry
        return RunResult(status, exit_code, step, summary)

    @staticmethod
    def _count(carry: dict[str, Any], name: str) -> int:
        return int(jax.device_get(carry[name]))

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
            "resumed_from_step": getattr(self, "resumed_from", None),
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
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.plots and rows:
            from jaxopt2.experiment.plots import plot_run

            title = f"{rc.task_spec.name} / {rc.model_name} / {rc.optimizer.name}"
            plot_run(rows, self.run_dir / "loss.png", title)
            if any(r.get("sharpness") is not None for r in rows):
                from jaxopt2.experiment.plots import plot_sharpness

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
    stream: TextIO | str | None = "stdout",
    label: str = "",
    on_trainer: Callable[[Trainer], None] | None = None,
) -> RunResult:
    """Prepare the run directory and train (resuming when it holds the same config)."""
    # Build the task first: a missing or malformed data file is reported before the run dir
    # (and its config.yaml) exists, so fixing the path does not make it a "different config".
    trainer = Trainer(rc, run_dir, progress=progress, stream=stream, label=label)
    prepare_run_dir(run_dir, rc, overwrite=overwrite)
    if on_trainer is not None:
        on_trainer(trainer)
    return trainer.train(handle_signals=handle_signals)


__all__ += ["ConfigError", "format_summary", "run_config"]
