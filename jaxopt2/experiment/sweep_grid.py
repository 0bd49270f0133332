"""The grid of ``jaxopt2 sweep``: parsing ``key=v1,v2,...`` arguments, checking that every
axis is a numeric in-program hyperparameter, and expanding the grid into member configs
(each validated like ``jaxopt2 run`` validates its config). See :mod:`.sweep`."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import cast

from omegaconf import DictConfig, OmegaConf

from jaxopt2.experiment import config as C
from jaxopt2.experiment.config import ResolvedConfig
from jaxopt2.experiment.errors import ConfigError
from jaxopt2.experiment.optim import SWEEPABLE_RUNNER_FIELDS, build_optimizer
from jaxopt2.optimizers import registry

__all__ = [
    "SWEEPABLE_RUNNER_FIELDS",
    "Grid",
    "Member",
    "SweepPlan",
    "fmt_values",
    "is_grid_item",
    "parse_sweep_args",
    "prepare_sweep",
]


def fmt_values(values: dict[str, float], seed: int | None = None) -> str:
    """``lr=0.001 b1=0.9 seed=0``: a member's or point's values, short."""
    parts = [f"{k.rpartition('.')[2]}={v:g}" for k, v in values.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    return " ".join(parts) or "(base)"


# The fields of the run section (the top-level config keys).
_RUN_FIELDS = tuple(f.name for f in dataclasses.fields(C.RunConfig))


@dataclasses.dataclass
class Grid:
    """A parsed sweep: the axes (dotted key -> values), the seeds, and plain overrides."""

    axes: dict[str, list[float]]
    seeds: list[int] | None  # None: the config's own seed
    overrides: list[str]

    def points(self) -> list[dict[str, float]]:
        keys = list(self.axes)
        return [
            dict(zip(keys, vals, strict=True))
            for vals in itertools.product(*(self.axes[k] for k in keys))
        ]


def is_grid_item(item: str) -> bool:
    _, sep, value = item.partition("=")
    value = value.strip()
    return bool(sep) and "," in value and not value.startswith(("[", "{", "'", '"'))


def _parse_number(key: str, text: str, integer: bool = False) -> float | int:
    t = text.strip()
    if not t:
        raise ConfigError(f"bad grid {key}=...: an empty value (write {key}=v1,v2,...)")
    try:
        v: float | int = int(t)
    except ValueError:
        if integer:
            raise ConfigError(f"grid values of {key} must be integers, got {t!r}") from None
        try:
            v = float(t)
        except ValueError:
            raise ConfigError(
                f"grid values of {key} must be numbers, got {t!r} (non-numeric values need "
                "separate runs)"
            ) from None
    if not math.isfinite(v):
        raise ConfigError(f"grid values of {key} must be finite numbers, got {t!r}")
    return v


def parse_sweep_args(
    items: list[str] | tuple[str, ...], check_key: Callable[[str], None] | None = None
) -> Grid:
    """Split ``key=v1,v2`` grid axes from ``key=value`` overrides and parse the values
    (`check_key(key)` runs on each axis key first; see :func:`prepare_sweep`)."""
    axes: dict[str, list[float]] = {}
    seeds: list[int] | None = None
    overrides: list[str] = []
    for item in items:
        if not is_grid_item(item):
            overrides.append(item)
            continue
        key, _, value = item.partition("=")
        key = key.strip()
        if not key or any(c.isspace() for c in key) or key.startswith(".") or ".." in key:
            raise ConfigError(
                f"bad grid {item!r}: expected dotted.key=v1,v2,... "
                "(e.g. optimizer.learning_rate=1e-3,1e-2)"
            )
        if key in axes or (key == "seed" and seeds is not None):
            raise ConfigError(f"grid key {key} is given twice")
        if check_key is not None and key != "seed":
            check_key(key)
        parts = value.split(",")
        vals: list[int] | list[float]
        if key == "seed":
            vals = seeds = [int(_parse_number(key, p, integer=True)) for p in parts]
        else:
            vals = axes[key] = [float(_parse_number(key, p)) for p in parts]
        if len(set(vals)) != len(vals):
            raise ConfigError(f"grid {key} repeats a value: {value}")
    for item in overrides:  # a plain override of a grid key would be silently lost
        key = item.partition("=")[0].strip()
        if key in axes or (key == "seed" and seeds is not None):
            raise ConfigError(f"{key} is both a grid axis and a plain override")
    return Grid(axes, seeds, overrides)


def _raw_config(spec: str, overrides: list[str]) -> DictConfig:
    text, _, source = C.locate_config(spec)
    try:
        raw = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except Exception as e:  # yaml.YAMLError and OmegaConf's own errors
        raise ConfigError(f"cannot parse {source}: {C.first_line(e)}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{source}: a config must be a YAML mapping of keys to values")
    # Two mappings merge into a mapping.
    return cast(DictConfig, OmegaConf.merge(raw, C.parse_overrides(list(overrides))))


def _static(key: str, why: str) -> ConfigError:
    return ConfigError(
        f"cannot sweep {key}: {why}; it would need separate programs (run separate sweeps, "
        "or sweep it with a shell loop)"
    )


def _check_axis(key: str, opt_name: str) -> None:
    """Refuse grid keys that are not numeric in-program hyperparameters."""
    head, _, rest = key.partition(".")
    if head in _RUN_FIELDS and head != "optimizer":
        if rest:
            raise _static(key, f"the {head} section is static (it shapes the program)")
        raise _static(key, "it is a static run setting (not a traced hyperparameter)")
    if head != "optimizer" or not rest or "." in rest:
        sweepable = ", ".join(f"optimizer.{k}" for k in SWEEPABLE_RUNNER_FIELDS)
        raise ConfigError(
            f"unknown or unsweepable config key '{key}'; sweep seed, {sweepable} or a numeric "
            "optimizer argument (see `jaxopt2 list`)"
        )
    if rest in SWEEPABLE_RUNNER_FIELDS:
        return
    if rest in C._RUNNER_OPT_FIELDS:
        raise _static(key, "it is not a number used inside the step")
    try:
        entry = registry.get(opt_name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    args = entry.arguments()
    if rest not in args:
        valid = [a for a in args if a not in entry.static_args]
        raise ConfigError(
            f"unknown config key '{key}': not an argument of {opt_name} (its numeric "
            f"arguments: {', '.join(valid) or 'none'})"
        )
    if rest in entry.static_args:
        raise _static(key, f"it is a static argument of {opt_name} (registry static_args)")


@dataclasses.dataclass
class Member:
    index: int
    point: int  # index into the grid's points
    values: dict[str, float]  # the swept hyperparameters
    seed: int
    rc: ResolvedConfig


@dataclasses.dataclass
class SweepPlan:
    base: ResolvedConfig  # the first member's config (all non-swept fields are shared)
    grid: Grid
    seeds: list[int]
    points: list[dict[str, float]]
    members: list[Member]
    stem: str


def prepare_sweep(spec: str, items: list[str] | tuple[str, ...]) -> SweepPlan:
    """Parse and validate a sweep: every member's config is checked like ``jaxopt2 run``
    would check it, and its optimizer is built once with concrete values (so the
    optimizer's own hyperparameter checks apply)."""
    raw = _raw_config(spec, [item for item in items if not is_grid_item(item)])
    opt_name = OmegaConf.select(raw, "optimizer.name", default=None)
    opt_name = opt_name if isinstance(opt_name, str) else ""
    grid = parse_sweep_args(items, lambda key: _check_axis(key, opt_name))
    _, stem, _ = C.locate_config(spec)

    seeds = grid.seeds
    if seeds is None:
        seed = OmegaConf.select(raw, "seed", default=None)
        seeds = [seed if isinstance(seed, int) and not isinstance(seed, bool) else 0]
    points = grid.points()
    members: list[Member] = []
    for p_idx, values in enumerate(points):
        for seed in seeds:
            m_raw = copy.deepcopy(raw)
            for key, v in values.items():
                OmegaConf.update(m_raw, key, v, force_add=True)
            OmegaConf.update(m_raw, "seed", seed, force_add=True)
            label = fmt_values(values, seed)
            try:
                rc = C.resolve(m_raw)
                build_optimizer(rc)
            except ConfigError as e:
                if not values:
                    raise
                raise ConfigError(f"grid member {label}: {e}") from None
            members.append(Member(len(members), p_idx, values, seed, rc))
    return SweepPlan(members[0].rc, grid, list(seeds), points, members, stem)
