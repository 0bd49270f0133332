"""``jaxopt2 sweep``: a grid over numeric hyperparameters and seeds, in ONE compiled program.

Command line::

    jaxopt2 sweep CONFIG optimizer.learning_rate=1e-4,1e-3,1e-2 [optimizer.b1=0.9,0.95]
                  [seed=0,1,2] [other.key=value ...] [--run-dir DIR] [--overwrite]

An argument ``key=v1,v2,...`` (a comma in a value that is not a YAML list or mapping) is a
grid axis; ``key=value`` is an ordinary config override. The members are the product of the
hyperparameter axes (the *points*) times the seeds.

How it runs: every member is an ordinary run config, validated like ``jaxopt2 run`` would.
Their parameters are initialized on the host exactly as the runner does (one
:class:`~jaxopt2.experiment.trainer.Trainer` per distinct seed), stacked along a leading
member axis, and trained by one program: a ``lax.scan`` over ``log_every`` steps of a
``jax.vmap`` over members of the runner's own step (:func:`~.step.epoch_order`,
:func:`~.step.batch_at`, :func:`~.step.train_step`), with the optimizer built by
:func:`~.optim.build_optimizer` from the member's hyperparameters as traced values (learning
rate schedules take a traced peak). The data key, the optimizer key and the hyperparameters
are explicit per-member arguments; the step counter is shared. So a member computes what
``jaxopt2 run`` computes for its config (same initialization, batches and keys).

Only numeric hyperparameters can vary inside one program: ``optimizer.learning_rate``,
``optimizer.weight_decay``, ``optimizer.clip_grad_norm``, ``optimizer.min_lr_ratio`` and any
optimizer argument that is not in its registry entry's ``static_args``; plus ``seed``.
Anything else (steps, batch size, model sizes, schedules, static optimizer arguments) changes
the program's structure and is refused with a message.

A member whose loss or update turns non-finite is *diverged* (under ``nonfinite: stop``, the
default): its parameters freeze at the last good step and the step it diverged at is
reported; the others go on. Under ``nonfinite: skip`` such updates are dropped and counted.

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

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from jaxopt2.experiment import sweep_report as R
from jaxopt2.experiment.config import ResolvedConfig
from jaxopt2.experiment.errors import UserError
from jaxopt2.experiment.rundir import StopSignals, clean
from jaxopt2.experiment.sweep_grid import (
    SWEEPABLE_RUNNER_FIELDS,
    Grid,
    SweepPlan,
    parse_sweep_args,
    prepare_sweep,
)

__all__ = [
    "SWEEPABLE_RUNNER_FIELDS",
    "Grid",
    "SweepResult",
    "parse_sweep_args",
    "prepare_sweep",
    "run_sweep",
    "sweep",
]

F32 = jnp.float32
I32 = jnp.int32

# ----------------------------------------------------------------------------- the program


def _member_config(base: ResolvedConfig, hyper: dict[str, Any]) -> ResolvedConfig:
    """`base` with the swept optimizer values replaced (by traced values, in the program)."""
    runner: dict[str, Any] = {}
    args = dict(base.optimizer_args)
    for key, v in hyper.items():
        name = key.partition(".")[2]
        if name in SWEEPABLE_RUNNER_FIELDS:
            runner[name] = v
        else:
            args[name] = v
    return dataclasses.replace(
        base, optimizer=dataclasses.replace(base.optimizer, **runner), optimizer_args=args
    )


def _weak(values: list[float]) -> jax.Array:
    """A vector of hyperparameter values that promotes like Python floats do (weakly typed),
    so a traced value mixes with float32 arrays exactly as the run's Python number does."""
    return jnp.stack([jnp.asarray(float(v)) for v in values])


class SweepProgram:
    """The compiled sweep: init (vmapped) and a fused chunk of steps (scan over a vmap)."""

    def __init__(self, plan: SweepPlan):
        from jaxopt2.experiment.trainer import Trainer

        self.plan = plan
        base = plan.base
        # One runner Trainer per seed gives the runner's own initial parameters and keys.
        trainers: dict[int, Trainer] = {}
        for m in plan.members:
            if m.seed not in trainers:
                trainers[m.seed] = Trainer(m.rc, Path("."), progress=False, stream=None)
        t0 = trainers[plan.members[0].seed]
        self.t0 = t0
        self.loss_fn = t0.loss_fn
        self.train_data = t0.train_data
        self.eval_data = t0.eval_data
        self.batch_size = t0.batch_size
        self.steps_per_epoch = t0.steps_per_epoch
        self.n_train = t0.task.n_train
        self.sampled = t0.sampled
        self.n_params = t0.n_params
        self.chunk_len = base.run.log_every
        self.skip_mode = base.run.nonfinite == "skip"
        for t in trainers.values():  # the data must not depend on the seed
            for a, b in zip(t.train_data, t0.train_data, strict=True):
                if a.shape != b.shape or not bool(jnp.array_equal(a, b)):
                    raise UserError("the task's training data depend on the seed; cannot sweep")

        members = plan.members
        stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
        self.params0 = stack([trainers[m.seed].init_carry["params"] for m in members])
        self.k_data = jnp.stack([trainers[m.seed].data_key for m in members])
        self.k_opt = jnp.stack([trainers[m.seed].opt_key for m in members])
        self.k_diag = jnp.stack([trainers[m.seed].diag_key for m in members])
        self.diag_every = base.run.diagnostics.every
        if self.diag_every:
            t0.check_diagnostics()
        self.hyper = {k: _weak([m.values[k] for m in members]) for k in plan.grid.axes}
        self.n_members = len(members)
        self.trace_count = 0
        self.compile_time = 0.0
        self._compiled = None
        self._compiled_init = None
        self._compiled_eval = None
        self._compiled_diag = None
        self.diag_trace_count = 0

    def _tx(self, hyper: dict[str, jax.Array]):
        from jaxopt2.experiment.optim import build_optimizer

        return build_optimizer(_member_config(self.plan.base, hyper)).tx

    def _init(self, params: Any, hyper: dict[str, jax.Array]) -> dict[str, Any]:
        opt_state = jax.vmap(lambda p, h: self._tx(h).init(p))(params, hyper)
        m = self.n_members
        return {
            "params": params,
            "opt_state": opt_state,
            "step": jnp.zeros((), I32),
            "halted": jnp.zeros((m,), jnp.bool_),
            "diverged_at": jnp.zeros((m,), I32),  # 1-based step of divergence, 0: never
            "nonfinite": jnp.zeros((m,), I32),
        }

    def _chunk(self, carry, hyper, k_data, k_opt, data, n_active):
        from jaxopt2.experiment.step import batch_at, epoch_order, train_step

        self.trace_count += 1
        spe, n, bs = self.steps_per_epoch, self.n_train, self.batch_size
        sampled, skip_mode = self.sampled, self.skip_mode
        orders = jax.vmap(epoch_order, in_axes=(0, None, None, None))

        def member(params, opt_state, halted, h, k_o, perm, step, active):
            tx = self._tx(h)
            batch = batch_at(data, perm, step, bs, spe) if sampled else data
            key = jax.random.fold_in(k_o, step)
            loss, _, new_params, new_opt, finite = train_step(
                tx, self.loss_fn, params, opt_state, batch, key
            )
            live = active & ~halted
            ok = live & finite

            def pick(new, old):
                return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

            return pick(new_params, params), pick(new_opt, opt_state), loss, live & ~finite

        def body(c_perm, i):
            c, perm = c_perm
            step = c["step"]
            active = i < n_active
            if sampled:  # a new epoch starts: draw every member's order (shared step)
                perm = jax.lax.cond(
                    step % spe == 0, lambda s: orders(k_data, s, spe, n), lambda s: perm, step
                )
            params, opt_state, loss, bad = jax.vmap(
                member, in_axes=(0, 0, 0, 0, 0, 0 if sampled else None, None, None)
            )(c["params"], c["opt_state"], c["halted"], hyper, k_opt, perm, step, active)
            first_bad = bad & ~c["halted"] & (c["diverged_at"] == 0)
            out = {
                "params": params,
                "opt_state": opt_state,
                "step": step + active.astype(I32),
                "halted": c["halted"] | (bad & (not skip_mode)),
                "diverged_at": jnp.where(first_bad, step + 1, c["diverged_at"]),
                "nonfinite": c["nonfinite"] + bad.astype(I32),
            }
            return (out, perm), {"loss": loss.astype(F32), "bad": bad}

        if sampled:
            perm0 = orders(k_data, carry["step"], spe, n)
        else:
            perm0 = jnp.zeros((0,), I32)
        (carry, _), metrics = jax.lax.scan(
            body, (carry, perm0), jnp.arange(self.chunk_len, dtype=I32)
        )
        return carry, metrics

    def _eval(self, params: Any, data: tuple[jax.Array, ...]) -> dict[str, jax.Array]:
        return jax.vmap(self.t0.eval_metrics, in_axes=(0, None))(params, data)

    def _diagnostics(self, params, data, step, k_data, k_diag) -> dict[str, jax.Array]:
        """Every member's curvature diagnostics (the runner's, with the member's own data and
        diagnostics keys), one vmapped program."""
        self.diag_trace_count += 1

        def member(p, kd, kg):
            return self.t0.diagnostics_metrics(p, data, step, data_key=kd, diag_key=kg)

        return jax.vmap(member)(params, k_data, k_diag)

    def compile(self) -> None:
        if self._compiled is not None:
            return
        t0 = time.perf_counter()
        self._compiled_init = jax.jit(self._init).lower(self.params0, self.hyper).compile()
        carry = jax.eval_shape(self._init, self.params0, self.hyper)
        self._compiled = (
            jax.jit(self._chunk, donate_argnums=(0,))
            .lower(
                carry,
                self.hyper,
                self.k_data,
                self.k_opt,
                self.train_data,
                jnp.asarray(self.chunk_len, I32),
            )
            .compile()
        )
        if self.eval_data is not None:
            self._compiled_eval = jax.jit(self._eval).lower(self.params0, self.eval_data).compile()
        if self.diag_every:
            self._compiled_diag = (
                jax.jit(self._diagnostics)
                .lower(self.params0, self.train_data, jnp.asarray(0, I32), self.k_data, self.k_diag)
                .compile()
            )
        self.compile_time = time.perf_counter() - t0

    def init(self) -> dict[str, Any]:
        self.compile()
        params = jax.tree.map(lambda x: jnp.array(x, copy=True), self.params0)
        return self._compiled_init(params, self.hyper)

    def chunk(self, carry: dict[str, Any], n: int) -> tuple[dict[str, Any], dict[str, Any]]:
        return self._compiled(
            carry, self.hyper, self.k_data, self.k_opt, self.train_data, jnp.asarray(n, I32)
        )

    def evaluate(self, params: Any) -> list[dict[str, float]]:
        if self._compiled_eval is None:
            return [{} for _ in range(self.n_members)]
        out = jax.device_get(self._compiled_eval(params, self.eval_data))
        return [
            {f"eval_{k}": clean(float(v[i])) for k, v in out.items()} for i in range(self.n_members)
        ]

    def diagnose(self, params: Any, step: int) -> list[dict[str, Any]]:
        """Every member's diagnostics row fields at `params` (after `step` steps)."""
        from jaxopt2.experiment.step import diagnostics_row

        if self._compiled_diag is None:
            return [{} for _ in range(self.n_members)]
        out = jax.device_get(
            self._compiled_diag(
                params, self.train_data, jnp.asarray(step, I32), self.k_data, self.k_diag
            )
        )
        top_k = self.plan.base.run.diagnostics.top_k
        return [
            diagnostics_row({k: v[i] for k, v in out.items()}, top_k) for i in range(self.n_members)
        ]


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class SweepResult:
    """How a sweep ended. `exit_code` 0: complete; 128 + signum: interrupted (a checkpoint
    holds the state; members, points and best are then empty)."""

    exit_code: int
    members: list[dict[str, Any]]
    points: list[dict[str, Any]]
    best: dict[str, Any] | None
    train_time_s: float
    compile_time_s: float
    wall_time_s: float
    traces: int  # how often the training program was traced (1: one program)
    num_params: int = 0  # of one member
    steps: int = 0  # the steps done (the shared step counter)
    resumed_from: int | None = None  # the checkpoint step it resumed from


def _metrics_row(
    loss: np.ndarray, diverged_at: np.ndarray, step: int, n: int, skip_mode: bool
) -> tuple[list[float | None], list[float | None]]:
    """Every member's last-step loss and window mean over the chunk that ended at `step`
    (`loss` is ``(n, members)``); a diverged member counts only its steps before divergence."""
    losses, means = [], []
    for j in range(loss.shape[1]):
        d = int(diverged_at[j])
        column = np.ascontiguousarray(loss[:, j])
        if d > 0 and not skip_mode:
            window = column[: max(0, d - 1 - (step - n))]
            last = None
        else:  # the runner's window mean (float32, like its metrics rows)
            window = column
            last = clean(float(column[-1]))
        means.append(clean(float(np.mean(window))) if len(window) else None)
        losses.append(last)
    return losses, means


_DIAG_FINALS = ("sharpness", "trace", "grad_topk_share")


def _due(step: int, n: int, steps: int, every: int) -> bool:
    """A chunk of `n` steps that ended at `step` reached a multiple of `every` (0: never), or
    the run ended (the runner's rule for evaluations and diagnostics)."""
    return bool(every) and (step >= steps or step // every > (step - n) // every)


def _per_member(records: list[dict[str, Any]], alive: np.ndarray) -> dict[str, list[Any]]:
    """``[{k: v}, ...]`` per member -> ``{k: [v, ...]}``; None for diverged members."""
    keys = [k for k in records[0]] if records else []
    return {k: [r[k] if ok else None for r, ok in zip(records, alive, strict=True)] for k in keys}


def run_sweep(
    plan: SweepPlan,
    run_dir: Path | None,
    *,
    progress: bool | None = None,
    stream: TextIO | str | None = "stdout",
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
    from tqdm.auto import tqdm

    from jaxopt2.experiment.checkpoint import Checkpointer
    from jaxopt2.experiment.rundir import atomic_write, read_metrics

    if stream == "stdout":
        stream = sys.stdout
    t_start = time.perf_counter()
    prog = SweepProgram(plan)
    base = plan.base
    steps, m_count = base.run.steps, prog.n_members
    carry = prog.init()

    step, train_time, rows, resumed_from = 0, 0.0, [], None
    ckpt = None
    if run_dir is not None:
        ckpt = Checkpointer(run_dir / "checkpoints", base.run.checkpoint.keep)
        restored = ckpt.restore(carry)
        if restored is not None:
            carry, meta = restored
            step, train_time = int(meta["step"]), float(meta["train_time"])
            resumed_from = step
            carry = jax.tree.map(lambda x: jnp.array(x, copy=True), carry)  # donated below
        metrics_path = run_dir / "metrics.jsonl"
        rows = read_metrics(metrics_path, max_step=step)
        atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    saved_step = step if resumed_from is not None else None
    best = np.full(m_count, np.inf)
    for r in rows:
        for j, v in enumerate(r["loss_mean"]):
            if v is not None:
                best[j] = min(best[j], v)

    bar = tqdm(
        total=steps,
        initial=step,
        unit="step",
        file=sys.stderr,
        disable=None if progress is None else not progress,
        desc=f"sweep ({m_count} members)",
        dynamic_ncols=True,
        leave=False,
    )
    diverged_at = np.asarray(jax.device_get(carry["diverged_at"]))
    every = base.run.checkpoint.every
    mf = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if run_dir is not None else None
    try:
        with StopSignals(handle_signals) as signals:
            while step < steps and signals.received is None:
                n = min(prog.chunk_len, steps - step)
                t0 = time.perf_counter()
                carry, m = prog.chunk(carry, n)
                m = jax.device_get(m)
                diverged_at = np.asarray(jax.device_get(carry["diverged_at"]))
                dt = time.perf_counter() - t0
                train_time += dt
                step += n
                loss = np.asarray(m["loss"][:n], np.float32)  # (n, members), as the runner's
                losses, means = _metrics_row(loss, diverged_at, step, n, prog.skip_mode)
                for j, v in enumerate(means):
                    if v is not None:
                        best[j] = min(best[j], v)
                row = {
                    "step": step,
                    "time": train_time,
                    "step_time": dt / n,
                    "loss": losses,
                    "loss_mean": means,
                    "diverged": int(np.sum(diverged_at > 0)),
                }
                alive = (diverged_at == 0) | prog.skip_mode
                if step >= steps or _due(step, n, steps, base.run.eval_every):
                    row.update(_per_member(prog.evaluate(carry["params"]), alive))
                if _due(step, n, steps, prog.diag_every):
                    row.update(_per_member(prog.diagnose(carry["params"], step), alive))
                rows.append(row)
                if mf is not None:
                    mf.write(json.dumps(row) + "\n")
                    mf.flush()
                if ckpt is not None and (step >= steps or step // every > (step - n) // every):
                    ckpt.save(step, carry, {"step": step, "train_time": train_time})
                    saved_step = step
                finite_means = [v for v in means if v is not None]
                bar.update(n)
                bar.set_postfix(
                    best=f"{min(finite_means):.4g}" if finite_means else "nan",
                    diverged=row["diverged"],
                    refresh=False,
                )
            interrupted = signals.received
        if interrupted is not None and step < steps and ckpt is not None and saved_step != step:
            ckpt.save(step, carry, {"step": step, "train_time": train_time})
    finally:
        bar.close()
        if mf is not None:
            mf.close()
        if ckpt is not None:
            ckpt.close()

    if interrupted is not None and step < steps:
        where = f"checkpoint saved at step {step} in {run_dir}; run the same command again "
        print(
            f"sweep interrupted by signal {interrupted}: "
            + (where + "to resume." if run_dir is not None else "nothing saved (no run dir)."),
            file=sys.stderr,
        )
        return SweepResult(
            128 + int(interrupted), [], [], None, train_time, prog.compile_time,
            time.perf_counter() - t_start, prog.trace_count, prog.n_params, step, resumed_from,
        )  # fmt: skip

    nonfinite = np.asarray(jax.device_get(carry["nonfinite"]))
    members = []
    last_row = rows[-1]
    for j, mem in enumerate(plan.members):
        d = int(diverged_at[j])
        diverged = d > 0 and not prog.skip_mode
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
        if prog.skip_mode:
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
        0, members, points, R.best_point(points), train_time, prog.compile_time,
        time.perf_counter() - t_start, prog.trace_count, prog.n_params, step, resumed_from,
    )  # fmt: skip
    if run_dir is not None:
        from jaxopt2.experiment.rundir import save_params

        save_params(run_dir, carry["params"])  # stacked: a leading member axis
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
    from jaxopt2.experiment.rundir import atomic_write

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
    stream: TextIO | str | None = "stdout",
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
