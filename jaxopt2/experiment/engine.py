"""THE training engine: one compiled chunk function over a leading member axis, one host loop.

``jaxopt2 run`` trains an engine of one member, ``jaxopt2 sweep`` one of every grid member,
``jaxopt2 compare`` one per optimizer; ``jaxopt2 spectrum`` reads the checkpoints it writes.

* Members: each is a :class:`~jaxopt2.experiment.setup.Setup` (initial parameters and keys of
  its seed) plus its swept hyperparameter values. All share the task, the data and the
  program's structure; the data key, the optimizer key and the hyperparameters are per-member
  arguments of the program (traced values: one program for the whole grid).
* The program: ``lax.scan`` over ``log_every`` steps of the member step (vmapped over the
  members; a single member runs unbatched, so a run is exactly the plain step). It is compiled
  ahead of time ONCE; a shorter last chunk runs the same program with the surplus steps masked
  off. The training arrays are arguments (never constants); the batch of a step depends only
  on (seed, step), the optimizer gets ``key=fold_in(opt_key, step)``.
* The non-finite policy, one for runs and sweeps: a step whose loss or update is not finite is
  never applied. Under ``nonfinite: stop`` (the default) that member halts: its state freezes
  at its last good step and the step it diverged at is recorded; the other members go on, and
  training stops when every member has halted (a run, one member, then fails with exit
  code 3; its last good checkpoint stays). Under ``nonfinite: skip`` the update is dropped,
  counted, and the member goes on. The step counter is the schedule's (batches, learning
  rate) and is shared by all members.
* The host loop: per chunk one metrics row (every member's loss, norms, learning rate), the
  evaluation every ``eval_every`` steps and at the end, curvature diagnostics every
  ``diagnostics.every`` steps (each on the host's schedule, outside the fused step), orbax
  checkpoints every ``checkpoint.every`` steps and at the end; on resume the metric rows after
  the restored step are dropped. SIGTERM / SIGINT finish the current chunk and save a
  checkpoint (exit code 128 + signum).
* Evaluation parameters: an optimizer whose registry entry has ``eval_params`` (averaged
  parameters, e.g. ``schedule_free_adamw``) is evaluated, and its ``params.npz`` written, at
  ``eval_params(state, params)``; checkpoints keep the training state, so resume is exact.
  Diagnostics and ``jaxopt2 spectrum`` measure the training parameters.
* A device mesh (the config's ``mesh`` section, :mod:`jaxopt2.experiment.distributed`): the
  same program, traced under the mesh and compiled with the layout's shardings (parameters
  and optimizer state as laid out there, each batch split over the ``data`` axis, everything
  else replicated); checkpoints hold the sharded arrays and restore onto the current layout.
  Under ``mesh.feed: host`` (the default of a multi-process job) the chunk takes its steps'
  batches as an argument instead of the training set: the host computes the same orders and
  each process contributes the rows its devices hold (:meth:`Engine.chunk_data`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxopt2.experiment.checkpoint import Checkpointer
from jaxopt2.experiment.config import ResolvedConfig
from jaxopt2.experiment.distributed import Layout, build_mesh, is_writer
from jaxopt2.experiment.errors import UserError
from jaxopt2.experiment.optim import build_optimizer, member_config
from jaxopt2.experiment.rundir import StopSignals, atomic_write, clean, read_metrics
from jaxopt2.experiment.setup import Setup
from jaxopt2.experiment.step import diagnostics_row, epoch_order, train_step

__all__ = ["Engine", "EngineResult", "over_members"]

F32 = jnp.float32
I32 = jnp.int32


def over_members(fn: Callable[..., Any], n_members: int, in_axes: Any = 0) -> Callable[..., Any]:
    """`fn` mapped over the leading member axis of the arguments whose `in_axes` entry is 0
    (None: shared). With one member it runs `fn` unbatched on member 0 and adds the axis back,
    so a run computes exactly the plain, unbatched step."""
    if n_members > 1:
        return jax.vmap(fn, in_axes=in_axes)

    def single(*args):
        axes = in_axes if isinstance(in_axes, tuple | list) else (in_axes,) * len(args)
        picked = [
            jax.tree.map(lambda x: x[0], a) if ax == 0 else a
            for a, ax in zip(args, axes, strict=True)
        ]
        return jax.tree.map(lambda x: jnp.expand_dims(x, 0), fn(*picked))

    return single


def _weak(values: list[float]) -> jax.Array:
    """A vector of hyperparameter values that promotes like Python floats do (weakly typed),
    so a traced value mixes with float32 arrays exactly as the run's Python number does."""
    return jnp.stack([jnp.asarray(float(v)) for v in values])


def _due(step: int, n: int, steps: int, every: int) -> bool:
    """A chunk of `n` steps that ended at `step` reached a multiple of `every` (0: never), or
    training ended."""
    return bool(every) and (step >= steps or step // every > (step - n) // every)


@dataclasses.dataclass
class EngineResult:
    """How :meth:`Engine.train` ended. `status`: complete | interrupted | nonfinite (every
    member halted); `step`: the steps done (for nonfinite: the last good step of the member
    that halted last); `carry`: the final state (leading member axis)."""

    status: str
    signal: int | None
    step: int
    carry: dict[str, Any]
    rows: list[dict[str, Any]]  # the metrics rows (restored ones included)
    train_time: float
    saved_step: int | None
    resumed_from: int | None


class Engine:
    """Members of one program (see the module docstring).

    Args:
      base: the config all members share (its swept fields are replaced per member).
      setups: one :class:`Setup` per member (members of the same seed may share one).
      hyper: ``{"optimizer.<name>": [value per member]}`` (empty for a run).
    """

    def __init__(
        self, base: ResolvedConfig, setups: list[Setup], hyper: dict[str, list[float]] | None = None
    ):
        self.base = base
        self.setups = setups
        s0 = self.setup = setups[0]
        for s in setups[1:]:  # the data must not depend on the seed
            if s is s0:
                continue
            for a, b in zip(s.task.train, s0.task.train, strict=True):
                if a.shape != b.shape or not np.array_equal(a, b):
                    raise UserError("the task's training data depend on the seed; cannot sweep")
        self.n_members = len(setups)
        self.chunk_len = base.run.log_every
        self.skip_mode = base.run.nonfinite == "skip"
        self.diag_every = base.run.diagnostics.every
        if self.diag_every:
            s0.check_diagnostics()
        stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
        self.params0 = stack([s.params for s in setups])
        self.k_data = jnp.stack([s.data_key for s in setups])
        self.k_opt = jnp.stack([s.opt_key for s in setups])
        self.k_diag = jnp.stack([s.diag_key for s in setups])
        self.hyper = {k: _weak(v) for k, v in (hyper or {}).items()}
        self.eval_params_fn = build_optimizer(base).eval_params
        self.trace_count = self.eval_trace_count = self.diag_trace_count = 0
        self.compile_time = 0.0
        self._compiled: dict[str, Any] = {}
        self.mesh = build_mesh(base.run.mesh, s0.batch_size)
        self.layout: Layout | None = None
        self.host_feed = self.fed = self.diag_fed = False
        # None under the host feed when no program takes the whole training arrays.
        self.train_data: tuple[jax.Array, ...] | None
        if self.mesh is None:
            self.train_data, self.eval_data = s0.train_data, s0.eval_data
        else:
            with jax.set_mesh(self.mesh):
                tx = self.optimizer({k: v[0] for k, v in self.hyper.items()}).tx
                first = jax.tree.map(lambda x: x[0], self.params0)
                self.layout = lay = Layout(self.mesh, tx, first)
            feed = base.run.mesh.feed
            self.host_feed = feed == "host" or (feed == "auto" and jax.process_count() > 1)
            keys = self.k_data  # this process's own copy (the host feed draws the orders)
            rep = lay.replicated
            put = lambda t: lay.place(t, jax.tree.map(lambda _: rep, t))
            self.hyper, self.k_data, self.k_opt, self.k_diag = put(
                (self.hyper, self.k_data, self.k_opt, self.k_diag)
            )
            if self.host_feed:
                self._init_host_feed(keys)
            else:
                self.train_data = put(s0.train_data)
                self.eval_data = None if s0.eval_data is None else put(s0.eval_data)
            self.params0 = lay.place(self.params0, lay.members(lay.params1))

    def _init_host_feed(self, keys: jax.Array) -> None:
        """The host feed (``mesh.feed``): batches built on the host from the orders the program
        would draw; whole arrays split by rows over ``data`` and only where needed."""
        s0, lay, m = self.setup, self.layout, self.n_members
        assert lay is not None  # the host feed needs a mesh
        spe, n = s0.steps_per_epoch, s0.n_train
        # the dtypes the device copies would have (float64 data is float32 unless x64 is on)
        host = lambda arrays: tuple(
            np.asarray(a, dtype=jax.dtypes.canonicalize_dtype(np.asarray(a).dtype)) for a in arrays
        )
        self._host_train = host(s0.task.train)
        self.fed = s0.sampled  # the chunk gets its steps' batches
        self.diag_fed = self.fed and self.base.run.diagnostics.batch != "full"
        whole = not self.fed or (self.diag_every and not self.diag_fed)
        self.train_data = lay.full_rows(self._host_train) if whole else None
        self.eval_data = None if s0.task.eval is None else lay.full_rows(host(s0.task.eval))
        self._keys_local = keys
        self._orders = jax.jit(over_members(lambda k, t: epoch_order(k, t, spe, n), m, (0, None)))
        self._perms: dict[int, np.ndarray] = {}

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        """Every member's row order of `epoch` ([members, rows], as the program draws it)."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            t = jnp.asarray(epoch * self.setup.steps_per_epoch, I32)
            self._perms[epoch] = np.asarray(self._orders(self._keys_local, t))
        return self._perms[epoch]

    def batch_rows(self, steps: np.ndarray) -> np.ndarray:
        """The training rows of each step's batch for every member ([steps, members, batch])."""
        s0 = self.setup
        spe, bs = s0.steps_per_epoch, s0.batch_size
        epochs = steps // spe
        out = np.empty((len(steps), self.n_members, bs), np.int32)
        for e in np.unique(epochs):
            at = np.nonzero(epochs == e)[0]
            idx = (steps[at] % spe)[:, None] * bs + np.arange(bs)
            out[at] = np.moveaxis(self._epoch_perm(int(e))[:, idx], 0, 1)
        return out

    def chunk_data(self, step: int) -> tuple[jax.Array, ...]:
        """The chunk's data argument when it starts at `step`: the training arrays, or (host
        feed) the batches of its steps ([steps, members, batch, ...], split over ``data``)."""
        if not self.fed:
            assert self.train_data is not None  # set whenever the chunk is not fed
            return self.train_data
        assert self.layout is not None  # fed: the host feed, which needs a mesh
        rows = self.batch_rows(step + np.arange(self.chunk_len))
        return tuple(self.layout.rows_of(a, rows, 2) for a in self._host_train)

    def diag_data(self, step: int) -> tuple[jax.Array, ...]:
        """The diagnostics' data argument at `step` (host feed: that step's batches)."""
        if not self.diag_fed:
            assert self.train_data is not None  # set whenever diagnostics are on and not fed
            return self.train_data
        assert self.layout is not None  # fed: the host feed, which needs a mesh
        rows = self.batch_rows(np.array([step]))[0]
        return tuple(self.layout.rows_of(a, rows, 1) for a in self._host_train)

    def _data_like(self, data_fn) -> Any:
        """`data_fn`'s arrays as shapes for lowering (host feed: without building a batch)."""
        if not self.host_feed:
            return data_fn(0)
        T, m, bs = self.chunk_len, self.n_members, self.setup.batch_size
        fed_shape = {self.chunk_data: (T, m, bs), self.diag_data: (m, bs)}[data_fn]
        fed = {self.chunk_data: self.fed, self.diag_data: self.diag_fed}[data_fn]
        if not fed:
            return data_fn(0)
        lead = len(fed_shape) - 1
        assert self.layout is not None  # the host feed needs a mesh
        return tuple(
            jax.ShapeDtypeStruct(
                fed_shape + a.shape[1:],
                a.dtype,
                sharding=self.layout.split(len(fed_shape) + a.ndim - 1, lead),
            )
            for a in self._host_train
        )

    def _traced(self):
        """The context the program is traced in: under the mesh when there is one."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _jit(self, fn, in_shardings=None, out_shardings=None, **kw):
        if self.layout is None:
            return jax.jit(fn, **kw)
        return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, **kw)

    # ------------------------------------------------------------------ the program

    def optimizer(self, hyper: dict[str, Any]):
        """The member's built optimizer (`hyper`: its values, traced in the program)."""
        return build_optimizer(member_config(self.base, hyper))

    def init_fn(self, params: Any, hyper: dict[str, jax.Array]) -> dict[str, Any]:
        """The initial state of every member (leading member axis)."""
        m = self.n_members
        init = over_members(lambda p, h: self.optimizer(h).tx.init(p), m)
        return {
            "params": params,
            "opt_state": init(params, hyper),
            "step": jnp.zeros((), I32),
            "halted": jnp.zeros((m,), jnp.bool_),
            "diverged_at": jnp.zeros((m,), I32),  # 1-based step it halted at, 0: never
            "nonfinite": jnp.zeros((m,), I32),
        }

    def chunk_fn(self, carry, hyper, k_data, k_opt, data, n_active):
        """`chunk_len` fused steps of every member (the first `n_active` of them applied)."""
        self.trace_count += 1
        s0, m = self.setup, self.n_members
        spe, n, _bs = s0.steps_per_epoch, s0.n_train, s0.batch_size
        sampled, skip_mode, fed = s0.sampled, self.skip_mode, self.fed
        orders = over_members(lambda k, s: epoch_order(k, s, spe, n), m, (0, None))

        def member(params, opt_state, halted, h, k_o, src, step, active):
            # src: the member's batch (host feed) or its epoch order (batch drawn here)
            opt = self.optimizer(h)
            batch = src if fed else s0.batch(data, step, src) if sampled else data
            if self.layout is not None:
                batch = self.layout.constrain_batch(batch)
            key = jax.random.fold_in(k_o, step)
            loss, updates, new_params, new_opt, finite = train_step(
                opt.tx, s0.loss_fn, params, opt_state, batch, key
            )
            live = active & ~halted
            ok = live & finite

            def pick(new, old):
                return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

            params = pick(new_params, params)
            lr = opt.lr(step) if opt.lr is not None else jnp.nan
            metrics = {
                "loss": loss.astype(F32),
                "grad_norm": new_opt[0].grad_norm.astype(F32),
                "update_norm": optax.tree.norm(updates).astype(F32),
                "param_norm": optax.tree.norm(params).astype(F32),
                "lr": jnp.asarray(lr, F32),
                "bad": live & ~finite,
            }
            return params, pick(new_opt, opt_state), metrics

        step_all = over_members(member, m, (0, 0, 0, 0, 0, 0 if sampled else None, None, None))

        def body(c_perm, xs):
            (c, perm), (i, batch) = c_perm, xs
            step = c["step"]
            active = i < n_active
            if sampled and not fed:  # a new epoch starts: draw every member's order (once)
                perm = jax.lax.cond(
                    step % spe == 0, lambda s: orders(k_data, s), lambda s: perm, step
                )
            src = batch if fed else perm
            params, opt_state, metrics = step_all(
                c["params"], c["opt_state"], c["halted"], hyper, k_opt, src, step, active
            )
            bad = metrics["bad"]
            halt = bad & (not skip_mode)
            out = {
                "params": params,
                "opt_state": opt_state,
                "step": step + active.astype(I32),
                "halted": c["halted"] | halt,
                "diverged_at": jnp.where(halt, step + 1, c["diverged_at"]),
                "nonfinite": c["nonfinite"] + bad.astype(I32),
            }
            return (out, perm), metrics

        perm0 = orders(k_data, carry["step"]) if sampled and not fed else jnp.zeros((0,), I32)
        xs = (jnp.arange(self.chunk_len, dtype=I32), data if fed else None)
        (carry, _), metrics = jax.lax.scan(body, (carry, perm0), xs)
        return carry, metrics

    def eval_fn(self, params: Any, opt_state: Any, data: tuple[jax.Array, ...]):
        """Every member's evaluation metrics, at its evaluation parameters."""
        self.eval_trace_count += 1
        s0, to_eval = self.setup, self.eval_params_fn

        def member(p, st):
            return s0.eval_metrics(to_eval(st, p) if to_eval is not None else p, data)

        return over_members(member, self.n_members)(params, opt_state)

    def diag_fn(self, params, data, step, k_data, k_diag) -> dict[str, jax.Array]:
        """Every member's curvature diagnostics (with its own data and diagnostics keys)."""
        self.diag_trace_count += 1
        s0 = self.setup

        fed = self.diag_fed

        def member(p, kd, kg, batch):
            return s0.diagnostics_metrics(p, batch, step, kd, kg, drawn=fed)

        axes = (0, 0, 0, 0 if fed else None)
        return over_members(member, self.n_members, axes)(params, k_data, k_diag, data)

    def eval_params(self, carry: dict[str, Any]) -> Any:
        """Every member's evaluation parameters (the training ones unless the optimizer has
        averaged parameters)."""
        if self.eval_params_fn is None:
            return carry["params"]
        return jax.jit(over_members(self.eval_params_fn, self.n_members))(
            carry["opt_state"], carry["params"]
        )

    def compile(self) -> None:
        """Compile init, the chunk (and evaluation, diagnostics) once; idempotent."""
        if "chunk" in self._compiled:
            return
        t0 = time.perf_counter()
        c = self._compiled
        self._compile_init()
        with self._traced():
            like = jax.eval_shape(self.init_fn, self.params0, self.hyper)
        lay = self.layout
        cs = lay.carry() if lay is not None else None
        r = lay.replicated if lay is not None else None
        n_active = self._scalar(self.chunk_len)
        shardings = lambda t: None if lay is None else jax.tree.map(lambda x: x.sharding, t)
        data = self._data_like(self.chunk_data)
        with self._traced():
            ins: tuple[Any, ...] | None = (cs, r, r, r, shardings(data), r)
            c["chunk"] = (
                self._jit(self.chunk_fn, ins, (cs, r), donate_argnums=(0,))
                .lower(like, self.hyper, self.k_data, self.k_opt, data, n_active)
                .compile()
            )
            if self.eval_data is not None:
                ev = shardings(self.eval_data)
                ins = None if cs is None else (cs["params"], cs["opt_state"], ev)
                c["eval"] = (
                    self._jit(self.eval_fn, ins, r)
                    .lower(like["params"], like["opt_state"], self.eval_data)
                    .compile()
                )
            if self.diag_every:
                data = self._data_like(self.diag_data)
                ins = None if cs is None else (cs["params"], shardings(data), r, r, r)
                c["diag"] = (
                    self._jit(self.diag_fn, ins, r)
                    .lower(like["params"], data, self._scalar(0), self.k_data, self.k_diag)
                    .compile()
                )
        self.compile_time = time.perf_counter() - t0

    def _scalar(self, value: int) -> jax.Array:
        """An int32 scalar argument (replicated on the mesh)."""
        x = jnp.asarray(value, I32)
        if self.layout is None:
            return x
        return self.layout.place(x, self.layout.replicated)

    def _compile_init(self) -> None:
        if "init" not in self._compiled:
            lay = self.layout
            cs = lay.carry() if lay is not None else None
            ins = None if lay is None else (lay.members(lay.params1), lay.replicated)
            with self._traced():
                self._compiled["init"] = (
                    self._jit(self.init_fn, ins, cs).lower(self.params0, self.hyper).compile()
                )

    def init(self) -> dict[str, Any]:
        """A fresh initial state (its own buffers: the chunk donates its carry)."""
        self._compile_init()
        params = jax.tree.map(lambda x: jnp.array(x, copy=True), self.params0)
        return self._compiled["init"](params, self.hyper)

    def placed(self, carry: dict[str, Any]) -> dict[str, Any]:
        """`carry` laid out as the program expects it (a restored or rebuilt state)."""
        if self.layout is None:
            return carry
        return self.layout.place(carry, self.layout.carry())

    def chunk(
        self, carry: dict[str, Any], n: int, step: int
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """`n` steps of every member from `carry`, which is at `step`."""
        return self._compiled["chunk"](
            carry, self.hyper, self.k_data, self.k_opt, self.chunk_data(step), self._scalar(n)
        )

    def evaluate(self, carry: dict[str, Any]) -> list[dict[str, Any]]:
        """Every member's ``eval_*`` row fields ({} without evaluation data)."""
        if "eval" not in self._compiled:
            return [{} for _ in range(self.n_members)]
        out = jax.device_get(
            self._compiled["eval"](carry["params"], carry["opt_state"], self.eval_data)
        )
        return [
            {f"eval_{k}": clean(float(v[i])) for k, v in out.items()} for i in range(self.n_members)
        ]

    def diagnose(self, params: Any, step: int) -> list[dict[str, Any]]:
        """Every member's diagnostics row fields at `params` (after `step` steps)."""
        if "diag" not in self._compiled:
            return [{} for _ in range(self.n_members)]
        t0 = time.perf_counter()
        out = jax.device_get(
            self._compiled["diag"](
                params, self.diag_data(step), self._scalar(step), self.k_data, self.k_diag
            )
        )
        dt = time.perf_counter() - t0
        top_k = self.base.run.diagnostics.top_k
        rows = [
            diagnostics_row({k: v[i] for k, v in out.items()}, top_k) for i in range(self.n_members)
        ]
        if self.n_members == 1:
            rows[0]["diag_time"] = dt
        return rows

    # ------------------------------------------------------------------ checkpoints

    def saved_state(self, carry: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds: the state; for one member without its member axis (the
        layout of a run's checkpoints: halted, nonfinite, opt_state, params, step)."""
        if self.n_members > 1:
            return carry
        first = lambda t: jax.tree.map(lambda x: x[0], t)
        return {
            "params": first(carry["params"]),
            "opt_state": first(carry["opt_state"]),
            "step": carry["step"],
            "nonfinite": carry["nonfinite"][0],
            "halted": carry["halted"][0],
        }

    def from_saved(self, state: dict[str, Any]) -> dict[str, Any]:
        """The engine state of a checkpoint's (inverse of :meth:`saved_state`)."""
        if self.n_members > 1:
            return state
        add = lambda t: jax.tree.map(lambda x: jnp.expand_dims(jnp.asarray(x), 0), t)
        # a checkpoint is never saved after a member halted: diverged_at is 0
        return {
            "params": add(state["params"]),
            "opt_state": add(state["opt_state"]),
            "step": jnp.asarray(state["step"]),
            "halted": add(state["halted"]),
            "diverged_at": jnp.zeros((1,), I32),
            "nonfinite": add(state["nonfinite"]),
        }

    def restore(self, ckpt: Checkpointer, like: dict[str, Any] | None = None):
        """The newest loadable checkpoint as ``(engine state, meta)``, or None."""
        like = self.init() if like is None else like
        restored = ckpt.restore(self.saved_state(like))
        if restored is None:
            return None
        state, meta = restored
        return self.placed(self.from_saved(state)), meta

    # ------------------------------------------------------------------ the host loop

    def train(
        self,
        run_dir: Path | None,
        *,
        row_fields: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]],
        handle_signals: bool = False,
        progress: bool | None = None,
        desc: str = "",
        postfix: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> EngineResult:
        """Train (or resume from `run_dir`'s checkpoints; None: no files) to ``steps``.

        `row_fields(member_rows, common)` turns the members' fields of one chunk into the
        metrics row (a run writes member 0's scalars, a sweep one list per field).
        """
        base = self.base.run
        steps, m = base.steps, self.n_members
        carry = self.init()
        if self.base.run.steps > 0:
            self.compile()
        step, train_time, rows, resumed_from = 0, 0.0, [], None
        ckpt = None
        if run_dir is not None:
            ckpt = Checkpointer(run_dir / "checkpoints", base.checkpoint.keep)
            restored = self.restore(ckpt, carry)
            if restored is not None:
                carry, meta = restored
                step, train_time = int(meta["step"]), float(meta["train_time"])
                resumed_from = step
                carry = jax.tree.map(lambda x: jnp.array(x, copy=True), carry)  # donated below
            metrics_path = run_dir / "metrics.jsonl"
            rows = read_metrics(metrics_path, max_step=step)  # rows after it: lost work
            if is_writer():
                atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        saved_step = step if resumed_from is not None else None
        status, received = "complete", None
        bar = tqdm(
            total=steps,
            initial=step,
            unit="step",
            file=sys.stderr,
            disable=(None if progress is None else not progress) if step < steps else True,
            desc=desc,
            dynamic_ncols=True,
            leave=False,
        )
        every = base.checkpoint.every
        writes = run_dir is not None and is_writer()
        mf = (
            open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            if writes and run_dir is not None  # writes implies a run_dir
            else None
        )
        # The halted flags after each chunk come back with its metrics (one host transfer per
        # chunk); the flags before a chunk are the previous chunk's.
        halted = np.asarray(jax.device_get(carry["halted"]))
        try:
            with StopSignals(handle_signals) as signals:
                while step < steps and signals.received is None:
                    n = min(self.chunk_len, steps - step)
                    t0 = time.perf_counter()
                    was_halted = halted
                    carry, mt = self.chunk(carry, n, step)
                    mt, halted, diverged_at, nonfinite = jax.device_get(
                        (mt, carry["halted"], carry["diverged_at"], carry["nonfinite"])
                    )
                    halted, diverged_at, nonfinite = (
                        np.asarray(a) for a in (halted, diverged_at, nonfinite)
                    )
                    dt = time.perf_counter() - t0
                    train_time += dt
                    members = [
                        self._member_fields(
                            mt, j, n, step, was_halted[j], diverged_at[j], nonfinite[j]
                        )
                        for j in range(m)
                    ]
                    if halted.all():  # every member halted: stop after the last good step
                        status = "nonfinite"
                        last = int(diverged_at.max())  # the row of the last step computed
                        row = row_fields(
                            members, {"step": last, "time": train_time, "step_time": dt / n}
                        )
                        rows.append(row)
                        if mf is not None:
                            mf.write(json.dumps(row) + "\n")
                            mf.flush()
                        step = last - 1
                        break
                    step += n
                    common = {"step": step, "time": train_time, "step_time": dt / n}
                    alive = ~halted
                    if _due(step, n, steps, base.eval_every) or step >= steps:
                        for j, ev in enumerate(self.evaluate(carry)):
                            members[j].update(ev if alive[j] else dict.fromkeys(ev))
                    if _due(step, n, steps, self.diag_every):
                        for j, dg in enumerate(self.diagnose(carry["params"], step)):
                            members[j].update(dg if alive[j] else dict.fromkeys(dg))
                    row = row_fields(members, common)
                    rows.append(row)
                    if mf is not None:
                        mf.write(json.dumps(row) + "\n")
                        mf.flush()
                    if ckpt is not None and _due(step, n, steps, every):
                        ckpt.save(
                            step, self.saved_state(carry), {"step": step, "train_time": train_time}
                        )
                        saved_step = step
                    bar.update(n)
                    if postfix is not None:
                        bar.set_postfix(**postfix(row), refresh=False)
                received = signals.received
            if status != "nonfinite" and received is not None and step < steps:
                status = "interrupted"
                if ckpt is not None and saved_step != step:
                    ckpt.save(
                        step, self.saved_state(carry), {"step": step, "train_time": train_time}
                    )
                    saved_step = step
        finally:
            bar.close()
            if mf is not None:
                mf.close()
            if ckpt is not None:
                ckpt.close()
        return EngineResult(
            status, received, step, carry, rows, train_time, saved_step, resumed_from
        )

    def _member_fields(self, mt, j, n, step, was_halted, diverged_at, nonfinite) -> dict[str, Any]:
        """Member `j`'s fields of the chunk of `n` steps that started at `step`: the values of
        its last computed step (the diverging one if it halted in this chunk; None if it had
        halted before) and its mean loss over the good steps."""
        if was_halted:
            last, good = None, 0
        elif diverged_at:
            last = good = int(diverged_at) - 1 - step
        else:
            last, good = n - 1, n
        col = lambda k: np.ascontiguousarray(mt[k][:n, j])
        loss = col("loss")
        out = {
            "loss": None if last is None else clean(loss[last]),
            "loss_mean": clean(np.mean(loss[:good])) if good else None,
        }
        for k in ("grad_norm", "update_norm", "param_norm", "lr"):
            out[k] = None if last is None else clean(mt[k][last, j])
        out["nonfinite"] = int(nonfinite)
        out["diverged_at"] = int(diverged_at)
        return out
