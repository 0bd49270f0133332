"""What a task is: the built :class:`Task` (model, data, loss, evaluation metrics), its
registry entry :class:`TaskSpec`, and the softmax-classifier pieces several tasks share.
The registry itself is :data:`jaxopt2.experiment.tasks.TASKS`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt2.curvature.tags import tag_loss

__all__ = ["F32", "Task", "TaskSpec", "classifier_metrics", "softmax_classifier"]

F32 = np.float32


@dataclasses.dataclass
class Task:
    """A built task.

    Attributes:
      model: the initial equinox model (float32 parameters).
      train: training arrays, rows along axis 0 (``()`` for data-free objectives).
      eval: evaluation arrays or ``None`` (no evaluation); ``()`` evaluates without data.
      loss: ``loss(model, *batch) -> scalar``, a mean over the batch.
      eval_metrics: ``eval_metrics(model, *eval) -> dict of scalars`` (``loss`` at least).
    """

    model: eqx.Module
    train: tuple[np.ndarray, ...]
    eval: tuple[np.ndarray, ...] | None
    loss: Callable[..., jax.Array]
    eval_metrics: Callable[..., dict[str, jax.Array]]

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0]) if self.train else 0


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A registered task: config dataclass, the models it accepts (first = default), the task's
    own defaults for those models' fields, and ``build(cfg, model_name, model_cfg, key)``.
    ``needs_files``: the task reads data files the user supplies (no config ships for it)."""

    name: str
    config_cls: type
    models: tuple[str, ...]
    build: Callable[[Any, str, Any, jax.Array], Task]
    description: str
    model_defaults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    needs_files: bool = False


def classifier_metrics(
    model: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array
) -> dict[str, jax.Array]:
    """Mean softmax cross-entropy and accuracy of `model` (a row -> logits) on ``x``, ``y``."""
    logits = jax.vmap(model)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    acc = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
    return {"loss": loss, "accuracy": acc}


def softmax_classifier(
    model: eqx.Module, data: tuple[np.ndarray, ...], eval_data: tuple[np.ndarray, ...]
) -> Task:
    """A task training `model` (rows -> logits) with softmax cross-entropy on integer labels."""

    def loss(model, xb, yb):
        logits = tag_loss("softmax_cross_entropy", jax.vmap(model)(xb), yb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def eval_metrics(model, xb, yb):
        return classifier_metrics(model, xb, yb)

    return Task(model, data, eval_data, loss, eval_metrics)
