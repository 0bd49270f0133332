"""Optimizers built from a resolved config, through the registry.

The built transformation is ``chain(observe_grad_norm, [clip], optimizer, [weight decay])``:

* ``observe_grad_norm`` stores the incoming gradient's global norm in its state (so the
  training step can log it although :func:`jaxopt2.value_and_update` keeps the gradient);
* ``clip_by_global_norm`` when ``optimizer.clip_grad_norm`` is set;
* the registry factory called with the config's arguments and the learning rate (a float, or
  an optax schedule when ``optimizer.schedule`` is not constant);
* decoupled weight decay ``-lr(t) * weight_decay * params`` when ``optimizer.weight_decay`` is
  set and the factory has no ``weight_decay`` argument of its own (if it has one, the value is
  passed to it).

:func:`member_config` puts (possibly traced) hyperparameter values into a config, so one
program builds every member's optimizer of a sweep; :func:`uses_own_step_size` is the rule
that an optimizer whose factory's ``learning_rate`` defaults to None (K-FAC) keeps its
adaptive step unless a learning rate is named for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt2.experiment.config import OptimizerConfig, ResolvedConfig
from jaxopt2.experiment.errors import ConfigError
from jaxopt2.optimizers import registry

__all__ = [
    "SWEEPABLE_RUNNER_FIELDS",
    "BuiltOptimizer",
    "build_optimizer",
    "make_schedule",
    "member_config",
    "uses_own_step_size",
]

# The runner's own optimizer fields that a sweep may vary (the others are optimizer arguments).
SWEEPABLE_RUNNER_FIELDS = ("learning_rate", "weight_decay", "clip_grad_norm", "min_lr_ratio")


class GradNormState(NamedTuple):
    grad_norm: jax.Array


class DecayState(NamedTuple):
    # The field shadows tuple.count on purpose (optax's states name their step counter so).
    count: jax.Array  # type: ignore[assignment]


def observe_grad_norm() -> optax.GradientTransformationExtraArgs:
    """Identity on the updates; keeps their global norm (the raw gradient's) in the state."""

    def init(params):
        del params
        return GradNormState(jnp.zeros((), jnp.float32))

    def update(updates, state, params=None, **extra):
        del state, params, extra
        return updates, GradNormState(optax.tree.norm(updates).astype(jnp.float32))

    return optax.GradientTransformationExtraArgs(init, update)


def decoupled_weight_decay(
    weight_decay: float, lr: Callable[[jax.Array], jax.Array]
) -> optax.GradientTransformationExtraArgs:
    """``updates - lr(count) * weight_decay * params`` (AdamW-style, after the optimizer)."""

    def init(params):
        del params
        return DecayState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra):
        del extra
        if params is None:
            raise ValueError("decoupled weight decay needs params")
        rate = lr(state.count) * weight_decay
        updates = jax.tree.map(lambda u, p: u - (rate * p).astype(u.dtype), updates, params)
        return updates, DecayState(state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)


def _number(value: Any) -> Any:
    """``float(value)``; a jax value (a traced sweep hyperparameter) passes through as is."""
    return value if isinstance(value, jax.Array) else float(value)


def make_schedule(cfg: OptimizerConfig, steps: int) -> Callable[[jax.Array], jax.Array] | None:
    """The learning-rate schedule of a config (``None`` if it has no learning rate).

    The peak learning rate may be a traced value (``jaxopt2 sweep``).
    """
    if cfg.learning_rate is None:
        return None
    lr = _number(cfg.learning_rate)
    end = lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, max(steps, 1), alpha=cfg.min_lr_ratio)
    if cfg.schedule == "linear":
        return optax.linear_schedule(lr, end, max(steps, 1))
    if cfg.schedule == "warmup_cosine":
        warm = min(cfg.warmup_steps, steps)
        total = max(steps, warm + 1)
        if isinstance(lr, jax.Array):  # traced: optax's factory branches on `lr == 0`
            alpha = jnp.where(lr == 0.0, 0.0, end / jnp.where(lr == 0.0, 1.0, lr))
            return optax.join_schedules(
                [
                    optax.linear_schedule(0.0, lr, warm),
                    optax.cosine_decay_schedule(lr, total - warm, alpha=alpha),
                ],
                [warm],
            )
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, total, end)
    raise ConfigError(f"unknown optimizer.schedule {cfg.schedule!r}")


@dataclasses.dataclass
class BuiltOptimizer:
    tx: optax.GradientTransformationExtraArgs
    lr: Callable[[jax.Array], jax.Array] | None  # step -> learning rate (for logging)
    name: str
    needs_value_fn: bool
    needs_key: bool
    # (chained state, training params) -> evaluation params; None: the training params
    eval_params: Callable[[Any, Any], Any] | None = None


def uses_own_step_size(name: str) -> bool:
    """The optimizer `name` takes its step size from curvature unless given a learning rate
    (its factory's ``learning_rate`` defaults to None); False for an unknown name."""
    try:
        arg = registry.get(name).arguments().get("learning_rate")
    except ValueError:
        return False  # an unknown name is reported by the config check
    return arg is not None and arg.default is None


def member_config(base: ResolvedConfig, hyper: dict[str, Any]) -> ResolvedConfig:
    """`base` with the values of `hyper` (``{"optimizer.<name>": value}``, traced values in a
    sweep's program) put into its optimizer fields or arguments."""
    if not hyper:
        return base
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


def build_optimizer(rc: ResolvedConfig) -> BuiltOptimizer:
    """Build the chained optimizer of a resolved config."""
    cfg = rc.optimizer
    entry = registry.get(cfg.name)
    factory_args = entry.arguments()
    args: dict[str, Any] = dict(rc.optimizer_args)
    sched = make_schedule(cfg, rc.run.steps)
    if cfg.learning_rate is not None:
        args["learning_rate"] = _number(cfg.learning_rate) if cfg.schedule == "constant" else sched
    own_decay = cfg.weight_decay is not None and "weight_decay" in factory_args
    if own_decay:
        args["weight_decay"] = _number(cfg.weight_decay)
    try:
        inner = entry.factory(**args)
    except (TypeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"optimizer {cfg.name} rejected its config arguments: {msg}") from None
    parts: list[optax.GradientTransformation] = [observe_grad_norm()]
    if cfg.clip_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(_number(cfg.clip_grad_norm)))
    inner_at = len(parts)
    parts.append(inner)
    wd = cfg.weight_decay
    if wd is not None and not own_decay and (isinstance(wd, jax.Array) or wd != 0):
        lr_fn = sched if sched is not None else optax.constant_schedule(1.0)
        parts.append(decoupled_weight_decay(_number(wd), lr_fn))
    eval_params = None
    if entry.eval_params is not None:
        own = entry.eval_params
        eval_params = lambda state, params: own(state[inner_at], params)
    return BuiltOptimizer(
        optax.chain(*parts), sched, cfg.name, entry.needs_value_fn, entry.needs_key, eval_params
    )
