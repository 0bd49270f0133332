"""The pure setup of a run: task, model, initial parameters, keys, loss and batch schedule.

:func:`build_setup` turns a resolved config into a :class:`Setup`; nothing here trains, writes
files or compiles. The engine (:mod:`jaxopt2.experiment.engine`) stacks the setups of its
members; ``jaxopt2 spectrum`` reads one to get a run's loss, data and parameters.

Streams: the config's seed gives four independent keys (model init, the data order, the
optimizer's per-step keys, the curvature diagnostics), so the batch of a step depends only on
(seed, step) and a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt2.experiment.config import ResolvedConfig
from jaxopt2.experiment.diagnostics import curvature_metrics
from jaxopt2.experiment.errors import ConfigError
from jaxopt2.experiment.step import batch_at, epoch_order

__all__ = ["Setup", "build_setup"]

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
    """What a run starts from (see :func:`build_setup`)."""

    rc: ResolvedConfig
    task: Any
    static: Any  # the model's non-array part (eqx.partition)
    params: Any  # the initial parameters (the model's inexact arrays)
    data_key: jax.Array
    opt_key: jax.Array
    diag_key: jax.Array
    batch_size: int
    steps_per_epoch: int
    n_params: int
    loss_fn: Callable[..., jax.Array]  # loss_fn(params, *batch)

    @property
    def n_train(self) -> int:
        return self.task.n_train

    @functools.cached_property
    def train_data(self) -> tuple[jax.Array, ...]:
        """The training arrays on the default device (made on first use: a host-fed mesh run
        never puts the whole set on a device)."""
        return tuple(jnp.asarray(a) for a in self.task.train)

    @functools.cached_property
    def eval_data(self) -> tuple[jax.Array, ...] | None:
        """The evaluation arrays on the default device (None: the task has none)."""
        return None if self.task.eval is None else tuple(jnp.asarray(a) for a in self.task.eval)

    @property
    def sampled(self) -> bool:
        """True when steps see minibatches (False: every step sees the whole training set)."""
        return bool(self.task.train) and self.batch_size < self.task.n_train

    def epoch_order(self, step: jax.Array, data_key: jax.Array | None = None) -> jax.Array:
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
            perm = self.epoch_order(step, data_key)
        return batch_at(data, perm, step, self.batch_size, self.steps_per_epoch)

    def eval_metrics(self, params: Any, data: tuple[jax.Array, ...]) -> dict[str, jax.Array]:
        """The task's evaluation metrics of `params` on `data` (float32 scalars)."""
        model = eqx.combine(params, self.static)
        return {k: jnp.asarray(v, F32) for k, v in self.task.eval_metrics(model, *data).items()}

    def diagnostics_metrics(
        self,
        params: Any,
        data: tuple[jax.Array, ...],
        step: jax.Array,
        data_key: jax.Array,
        diag_key: jax.Array,
        *,
        drawn: bool = False,
    ) -> dict[str, jax.Array]:
        """Curvature diagnostics at `params` (config section ``diagnostics``) on the batch of
        `step` from the data stream `data_key` (or the full set), probes from `diag_key`.
        `drawn`: `data` already is that batch (built outside the program)."""
        d = self.rc.run.diagnostics
        full_or_drawn = d.batch == "full" or drawn
        batch = data if full_or_drawn else self.batch(data, step, data_key=data_key)

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

    def check_diagnostics(self) -> None:
        """Refuse a ``diagnostics`` section this model cannot satisfy."""
        d = self.rc.run.diagnostics
        if d.every > 0 and d.top_k > self.n_params:
            raise ConfigError(
                f"diagnostics.top_k ({d.top_k}) exceeds the number of parameters ({self.n_params})"
            )


def build_setup(rc: ResolvedConfig) -> Setup:
    """The setup of `rc`: builds the task and model (a missing data file is reported here)."""
    cfg = rc.run
    key = jax.random.PRNGKey(cfg.seed)
    k_model, data_key, opt_key, diag_key = (jax.random.fold_in(key, i) for i in range(4))
    task = rc.task_spec.build(rc.task, rc.model_name, rc.model, k_model)
    params, static = eqx.partition(task.model, eqx.is_inexact_array)
    n = task.n_train
    batch_size = min(cfg.batch_size, n) if n else 0

    def loss_fn(p, *batch):
        return task.loss(eqx.combine(p, static), *batch)

    return Setup(
        rc=rc,
        task=task,
        static=static,
        params=params,
        data_key=data_key,
        opt_key=opt_key,
        diag_key=diag_key,
        batch_size=batch_size,
        steps_per_epoch=n // batch_size if n else 1,
        n_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        loss_fn=loss_fn,
    )
