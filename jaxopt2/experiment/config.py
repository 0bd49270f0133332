"""Run configs: YAML + dotted overrides, validated into typed dataclasses (OmegaConf).

A config has top-level run settings and three named sections::

    steps: 1000            # optimizer steps
    seed: 0                # model init, batch order and optimizer keys derive from it
    batch_size: 128        # rows per step (clamped to the training set size)
    log_every: 50          # steps fused per host call; one metrics row per chunk
    eval_every: 500        # evaluate every N steps (0: only at the end)
    nonfinite: stop        # stop | skip (skip non-finite updates and count them)
    target_loss: null      # for `jaxopt2 compare`: loss to reach (default: worst final loss)
    task: {name: digits_classifier, ...task fields}
    model: {name: mlp, hidden: [128, 128], activation: tanh}
    optimizer: {name: adam, learning_rate: 1e-3, schedule: constant, ...optimizer arguments}
    checkpoint: {every: 500, keep: 2}
    diagnostics: {every: 0, top_k: 1, num_iters: 20, trace_probes: 0, grad_share: false,
                  batch: train_batch}   # curvature logged during training; every: 0 = off
    mesh: {data: 0, model: 1, feed: auto}   # devices: data-parallel x parameter-sharded;
                                            # data: 0 = off; feed: auto | device | host

``optimizer`` holds the runner's fields (:class:`OptimizerConfig`) and, beside them, any
argument of the registered optimizer's factory (``b1: 0.95``); those are checked against the
registry entry's signature, so a newly registered optimizer works from configs as is.

Validation errors are :class:`~jaxopt2.experiment.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from importlib import resources
from importlib.resources import abc as resources_abc
from pathlib import Path
from typing import Any, cast

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxopt2.experiment import models as M
from jaxopt2.experiment import tasks as T
from jaxopt2.experiment.errors import ConfigError
from jaxopt2.optimizers import registry

__all__ = [
    "SCHEDULES",
    "CheckpointConfig",
    "DiagnosticsConfig",
    "MeshConfig",
    "OptimizerConfig",
    "ResolvedConfig",
    "RunConfig",
    "bundled_config_names",
    "first_line",
    "load_config",
    "locate_config",
    "resolve",
]

SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear")
NONFINITE = ("stop", "skip")
MESH_FEEDS = ("auto", "device", "host")
DIAGNOSTIC_BATCHES = ("train_batch", "full")


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 500  # save every N steps (at the first chunk boundary past each multiple)
    keep: int = 2  # keep the K most recent checkpoints


@dataclasses.dataclass
class DiagnosticsConfig:
    """Curvature diagnostics logged into metrics.jsonl during training (off by default).

    At the first chunk boundary at or past every multiple of ``every`` steps (and at the end),
    the run logs ``sharpness`` (the top Hessian eigenvalue, by Lanczos), optionally ``trace``
    and ``trace_stderr`` (Hutchinson) and ``grad_topk_share`` (the fraction of the gradient's
    squared norm in the top-k eigenspace; with ``top_k > 1`` also ``grad_share_by_k``, that
    fraction for the top 1..k), on the batch the next step trains on
    (``train_batch``) or on the whole training set (``full``). A disabled section is left out
    of the resolved config, so configs without it resolve (and resume) as before.
    """

    every: int = 0  # 0: off
    top_k: int = 1  # eigenvalues computed; sharpness is the largest
    num_iters: int = 20  # Lanczos steps (clamped to the number of parameters)
    trace_probes: int = 0  # Hutchinson probes for the trace; 0: no trace
    grad_share: bool = False  # log grad_topk_share (and grad_share_by_k)
    batch: str = "train_batch"  # train_batch | full


@dataclasses.dataclass
class MeshConfig:
    """The device mesh a run trains on (off by default: one device, as without the section).

    ``data`` devices split every batch (data parallelism: ``batch_size`` is the global batch
    and must divide evenly); ``model`` devices split each parameter along its largest
    dimension that they divide, with the optimizer state laid out like the parameters
    (FSDP style) and Shampoo/SOAP's stacked blocks over all devices. ``data: -1`` takes every
    device left after ``model``. The section is left out of the resolved config when off, and
    a run dir resumes under a different mesh (the same run on other devices: checkpoints are
    restored onto the new layout).

    ``feed`` says where the batches come from. ``device``: the training set sits on every
    device and each step draws its batch inside the compiled program (no host work per
    step). ``host``: each process builds the rows of every batch that its own devices hold,
    from its host copy of the data, and contributes them to the global batch
    (``jax.make_array_from_process_local_data``): no device holds the training set, and a
    process reads only its slice of each batch. ``auto``: ``host`` in a multi-process job,
    ``device`` otherwise. Both draw the same rows (the order is a function of seed and epoch),
    so a run is the same run whichever feeds it.
    """

    data: int = 0  # devices along the batch; 0: no mesh; -1: all the devices (after model)
    model: int = 1  # devices along the parameters (1: parameters replicated)
    feed: str = "auto"  # where batches are built: auto | device | host


@dataclasses.dataclass
class RunConfig:
    steps: int = 1000
    seed: int = 0
    batch_size: int = 128
    log_every: int = 50
    eval_every: int = 500
    nonfinite: str = "stop"
    target_loss: float | None = None
    task: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


@dataclasses.dataclass
class OptimizerConfig:
    """The runner's optimizer fields; the factory's own arguments sit beside them."""

    name: str = ""
    learning_rate: float | None = None  # peak learning rate (required if the factory needs it)
    schedule: str = "constant"  # constant | cosine | warmup_cosine | linear
    warmup_steps: int = 0  # warmup_cosine only
    min_lr_ratio: float = 0.0  # final lr / peak lr for cosine, warmup_cosine, linear
    weight_decay: float | None = None  # the factory's weight_decay, else decoupled decay
    clip_grad_norm: float | None = None  # clip gradients to this global norm first


_RUNNER_OPT_FIELDS = tuple(f.name for f in dataclasses.fields(OptimizerConfig))


@dataclasses.dataclass
class ResolvedConfig:
    """A validated config: typed sections plus the canonical dict saved as config.yaml."""

    run: RunConfig
    task_spec: T.TaskSpec
    task: Any
    model_name: str
    model: Any
    optimizer: OptimizerConfig
    optimizer_args: dict[str, Any]  # factory arguments given in the config (converted)
    data: dict[str, Any]  # the canonical resolved config

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.data))


# ----------------------------------------------------------------------------- locating


def _bundled_dir() -> resources_abc.Traversable:
    """The folder of configs shipped with the package (the repository's ``configs/``)."""
    return resources.files("jaxopt2.configs")


def bundled_config_names() -> list[str]:
    """Names of the configs shipped inside the package (``jaxopt2 run <name>``)."""
    return sorted(
        p.name[: -len(".yaml")] for p in _bundled_dir().iterdir() if p.name.endswith(".yaml")
    )


def locate_config(spec: str) -> tuple[str, str, str]:
    """``(yaml_text, stem, source)`` for a config file path or a bundled config name.

    A path that exists wins; otherwise a bare name (``quickstart`` or ``quickstart.yaml``)
    is looked up among the configs bundled in the package.
    """
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), path.stem, str(path)
        except OSError as e:
            raise ConfigError(f"cannot read config file {spec}: {e.strerror}") from None
    if path.is_dir():
        raise ConfigError(f"config {spec} is a directory, not a YAML file")
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and name in bundled_config_names():
        text = (_bundled_dir() / f"{name}.yaml").read_text(encoding="utf-8")
        return text, name, f"<bundled {name}>"
    raise ConfigError(
        f"config file not found: {spec} (bundled configs: {', '.join(bundled_config_names())})"
    )


# ----------------------------------------------------------------------------- validation


def first_line(e: Exception) -> str:
    """The first line of an exception's message (its type name if empty)."""
    msg = getattr(e, "msg", None) or str(e)
    return str(msg).strip().splitlines()[0] if str(msg).strip() else type(e).__name__


def _merge_typed(schema: Any, values: Any, prefix: str, defaults: Any = None) -> Any:
    """Merge `values` into the structured config of dataclass `schema` (after `defaults`);
    errors name the key."""
    base = OmegaConf.structured(schema)
    if defaults:
        base = OmegaConf.merge(base, defaults)  # the registry's own defaults: bugs raise
    try:
        merged = OmegaConf.merge(base, values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        full = f"{prefix}{key}" if key else prefix.rstrip(".")
        if type(e).__name__ in ("ConfigKeyError", "ConfigAttributeError"):
            owner = getattr(e, "object_type", None)
            owner = owner if dataclasses.is_dataclass(owner) else schema
            valid = [f.name for f in dataclasses.fields(owner)]
            hint = f"; valid keys: {', '.join(valid)}" if valid else " (it takes no fields)"
            raise ConfigError(f"unknown config key '{full}'{hint}") from None
        line = first_line(e)
        if "is not a ListConfig" in line:
            line = "expected a list"
        elif "is not a DictConfig" in line or ("Cannot assign" in line and "Dict" in line):
            line = "expected a mapping"
        raise ConfigError(f"config key '{full}': {line}") from None


def _section(top: RunConfig, name: str) -> dict[str, Any]:
    value = getattr(top, name)
    if value is None:
        return {}
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value)
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{name}' must be a mapping, got {value!r}")
    return dict(value)


def _annotation_str(param: inspect.Parameter) -> str:
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        return ""
    if isinstance(ann, str):
        return ann.replace("typing.", "").replace("Optional[", "").strip()
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")


def _convert_arg(opt: str, name: str, param: inspect.Parameter, value: Any) -> Any:
    """Check an optimizer argument from a config against the factory's signature."""
    key = f"optimizer.{name}"
    ann = _annotation_str(param)
    default = param.default
    optional = default is None or "None" in ann
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value)
    if value is None:
        if optional or default is inspect.Parameter.empty:
            return None
        raise ConfigError(f"config key '{key}': {opt} does not accept null here")
    base = ann.split("|")[0].strip() if "|" in ann and "[" not in ann else ann

    def wrong(expected: str) -> ConfigError:
        return ConfigError(
            f"config key '{key}': expected {expected} for {opt}, got {value!r} "
            f"({type(value).__name__})"
        )

    if isinstance(default, bool) or base == "bool":
        if not isinstance(value, bool):
            raise wrong("a boolean")
        return value
    if "dtype" in name.lower() or "dtype" in ann.lower():
        if not isinstance(value, str):
            raise wrong("a dtype name such as float32")
        try:
            return np.dtype(value).type
        except TypeError:
            raise wrong("a dtype name such as float32") from None
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if base == "float" or isinstance(default, float | int):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return value
    if base == "str" or isinstance(default, str):
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if isinstance(value, list):
        return tuple(value)
    return value


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_diagnostics(d: DiagnosticsConfig) -> None:
    _check(d.every >= 0, f"diagnostics.every must be >= 0 (0: off), got {d.every}")
    _check(d.top_k >= 1, f"diagnostics.top_k must be >= 1, got {d.top_k}")
    _check(
        d.num_iters >= d.top_k,
        f"diagnostics.num_iters ({d.num_iters}) must be >= diagnostics.top_k ({d.top_k})",
    )
    _check(
        d.trace_probes == 0 or d.trace_probes >= 2,
        f"diagnostics.trace_probes must be 0 (no trace) or >= 2, got {d.trace_probes}",
    )
    _check(
        d.batch in DIAGNOSTIC_BATCHES,
        f"diagnostics.batch must be one of {', '.join(DIAGNOSTIC_BATCHES)}, got {d.batch!r}",
    )


def resolve(raw: Any) -> ResolvedConfig:
    """Validate a raw (untyped) config mapping into a :class:`ResolvedConfig`."""
    if not isinstance(raw, DictConfig | dict):
        raise ConfigError("a config must be a YAML mapping of keys to values")
    top: RunConfig = _merge_typed(RunConfig, raw, "")
    _check(top.steps >= 1, f"steps must be >= 1, got {top.steps}")
    _check(top.batch_size >= 1, f"batch_size must be >= 1, got {top.batch_size}")
    _check(top.log_every >= 1, f"log_every must be >= 1, got {top.log_every}")
    _check(top.eval_every >= 0, f"eval_every must be >= 0, got {top.eval_every}")
    _check(
        top.nonfinite in NONFINITE,
        f"nonfinite must be one of {', '.join(NONFINITE)}, got {top.nonfinite!r}",
    )
    _check(top.checkpoint.every >= 1, f"checkpoint.every must be >= 1, got {top.checkpoint.every}")
    _check(top.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {top.checkpoint.keep}")
    _check_diagnostics(top.diagnostics)
    _check(
        top.mesh.data == -1 or top.mesh.data >= 0,
        f"mesh.data must be a device count, 0 (no mesh) or -1 (all devices), got {top.mesh.data}",
    )
    _check(top.mesh.model >= 1, f"mesh.model must be >= 1, got {top.mesh.model}")
    _check(
        top.mesh.data != 0 or top.mesh.model == 1,
        f"mesh.model = {top.mesh.model} needs mesh.data (a device count, or -1 for the rest)",
    )
    _check(
        top.mesh.feed in MESH_FEEDS,
        f"mesh.feed must be one of {', '.join(MESH_FEEDS)}, got {top.mesh.feed!r}",
    )
    _check(
        top.mesh.data != 0 or top.mesh.feed == "auto",
        f"mesh.feed = {top.mesh.feed} needs mesh.data (a device count, or -1 for all devices)",
    )

    # task
    task_raw = _section(top, "task")
    task_name = task_raw.pop("name", None)
    _check(
        isinstance(task_name, str) and bool(task_name),
        f"task.name is missing; tasks: {', '.join(sorted(T.TASKS))}",
    )
    spec = T.get_task(task_name)
    task_cfg = _merge_typed(spec.config_cls, task_raw, "task.")

    # model
    model_raw = _section(top, "model")
    model_name = model_raw.pop("name", None) or spec.models[0]
    _check(isinstance(model_name, str), f"model.name must be a string, got {model_name!r}")
    mspec = M.get_model(model_name)
    _check(
        model_name in spec.models,
        f"task {task_name} does not take model {model_name!r}; it takes: {', '.join(spec.models)}",
    )
    defaults = spec.model_defaults.get(model_name, {})
    model_cfg = _merge_typed(mspec.config_cls, model_raw, "model.", defaults)

    # optimizer
    opt_raw = _section(top, "optimizer")
    opt_name = opt_raw.get("name")
    if not isinstance(opt_name, str) or not opt_name:
        raise ConfigError(f"optimizer.name is missing; optimizers: {', '.join(registry.names())}")
    try:
        entry = registry.get(opt_name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    known = {k: v for k, v in opt_raw.items() if k in _RUNNER_OPT_FIELDS}
    extras = {k: v for k, v in opt_raw.items() if k not in _RUNNER_OPT_FIELDS}
    opt_cfg: OptimizerConfig = _merge_typed(OptimizerConfig, known, "optimizer.")
    factory_args = entry.arguments()
    args: dict[str, Any] = {}
    for k, v in extras.items():
        if k not in factory_args:
            valid = [a for a in factory_args if a not in ("learning_rate", "weight_decay")]
            raise ConfigError(
                f"unknown config key 'optimizer.{k}': not an argument of {opt_name} "
                f"(its arguments: {', '.join(valid) or 'none'})"
            )
        args[k] = _convert_arg(opt_name, k, factory_args[k], v)
    _check(
        opt_cfg.schedule in SCHEDULES,
        f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {opt_cfg.schedule!r}",
    )
    _check(opt_cfg.warmup_steps >= 0, "optimizer.warmup_steps must be >= 0")
    _check(
        opt_cfg.warmup_steps == 0 or opt_cfg.schedule == "warmup_cosine",
        "optimizer.warmup_steps is only used by schedule: warmup_cosine",
    )
    _check(0.0 <= opt_cfg.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio must be in [0, 1]")
    if "learning_rate" in factory_args:
        lr_required = factory_args["learning_rate"].default is inspect.Parameter.empty
        _check(
            opt_cfg.learning_rate is not None or not lr_required,
            f"optimizer.learning_rate is required for {opt_name}",
        )
        _check(
            opt_cfg.learning_rate is not None or opt_cfg.schedule == "constant",
            f"optimizer.schedule {opt_cfg.schedule} needs optimizer.learning_rate",
        )
    else:
        _check(
            opt_cfg.learning_rate is None and opt_cfg.schedule == "constant",
            f"optimizer {opt_name} takes no learning_rate; remove optimizer.learning_rate "
            "and optimizer.schedule",
        )
    if opt_cfg.clip_grad_norm is not None:
        _check(opt_cfg.clip_grad_norm > 0, "optimizer.clip_grad_norm must be positive")
    missing = [a for a in entry.required_arguments() if a != "learning_rate" and a not in args]
    _check(
        not missing,
        f"optimizer {opt_name} needs argument(s): " + ", ".join(f"optimizer.{a}" for a in missing),
    )

    data = {
        "steps": top.steps,
        "seed": top.seed,
        "batch_size": top.batch_size,
        "log_every": top.log_every,
        "eval_every": top.eval_every,
        "nonfinite": top.nonfinite,
        "target_loss": top.target_loss,
        # a task field left at null is left out, so run dirs from before it existed resume
        "task": {
            "name": task_name,
            **{k: v for k, v in dataclasses.asdict(task_cfg).items() if v is not None},
        },
        "model": {"name": model_name, **dataclasses.asdict(model_cfg)},
        "optimizer": {
            **dataclasses.asdict(opt_cfg),
            **{
                k: OmegaConf.to_container(v) if isinstance(v, ListConfig | DictConfig) else v
                for k, v in extras.items()
            },
        },
        "checkpoint": dataclasses.asdict(top.checkpoint),
    }
    if top.diagnostics.every > 0:  # disabled: left out, so older run dirs still resume
        data["diagnostics"] = dataclasses.asdict(top.diagnostics)
    if top.mesh.data != 0:  # likewise
        data["mesh"] = dataclasses.asdict(top.mesh)
    return ResolvedConfig(top, spec, task_cfg, model_name, model_cfg, opt_cfg, args, data)


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``["a.b=1", "c=[1,2]"]`` -> a DictConfig; bad syntax is a ConfigError."""
    merged = OmegaConf.create({})
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip() or any(c.isspace() for c in key):
            raise ConfigError(
                f"bad override {item!r}: expected dotted.key=value "
                "(e.g. optimizer.learning_rate=0.01)"
            )
        try:
            # Two mappings merge into a mapping.
            merged = cast(DictConfig, OmegaConf.merge(merged, OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad override {item!r}: {first_line(e)}") from None
    return merged


def load_config(
    spec: str, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[ResolvedConfig, str]:
    """Read a config file (or bundled name), apply overrides and validate.

    Returns:
      ``(resolved, stem)`` where stem names the default run directory.
    """
    text, stem, source = locate_config(spec)
    try:
        raw = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except Exception as e:  # yaml.YAMLError and OmegaConf's own errors
        line = first_line(e)
        raise ConfigError(f"cannot parse {source}: {line}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{source}: a config must be a YAML mapping of keys to values")
    raw = cast(DictConfig, OmegaConf.merge(raw, parse_overrides(list(overrides))))
    return resolve(raw), stem


def from_dict(data: dict[Any, Any]) -> ResolvedConfig:
    """Validate a plain dict (e.g. a saved config.yaml, or one built by compare)."""
    return resolve(OmegaConf.create(data))
