"""``jaxopt2 list``: tasks, models, registered optimizers (with their config fields), configs."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from jaxopt2.experiment import config as C
from jaxopt2.experiment import models as M
from jaxopt2.experiment import tasks as T
from jaxopt2.optimizers import registry

__all__ = ["listing"]


def _fields(cls: type, overrides: dict[str, Any] | None = None) -> str:
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "?"
        if overrides and f.name in overrides:
            default = overrides[f.name]
        out.append(f"{f.name}={default!r}")
    return ", ".join(out) if out else "(no fields)"


def _default_repr(p: inspect.Parameter) -> str:
    if p.default is inspect.Parameter.empty:
        return f"{p.name} (required)"
    d = p.default
    if isinstance(d, type):
        d = d.__name__
    elif callable(d):
        d = getattr(d, "__name__", "fn")
    return f"{p.name}={d!r}"


def listing() -> str:
    lines = ["tasks (task.name; task fields with defaults; models, first is the default):"]
    for name in sorted(T.TASKS):
        spec = T.TASKS[name]
        lines.append(f"  {name:<20} {spec.description}")
        lines.append(f"  {'':<20}   fields: {_fields(spec.config_cls)}")
        lines.append(f"  {'':<20}   models: {', '.join(spec.models)}")
    lines.append("")
    lines.append("models (model.name; fields with defaults — tasks may change the defaults):")
    for name in sorted(M.MODELS):
        mspec = M.MODELS[name]
        lines.append(f"  {name:<20} {mspec.description}")
        lines.append(f"  {'':<20}   fields: {_fields(mspec.config_cls)}")
    lines.append("")
    lines.append("optimizers (optimizer.name; arguments usable as optimizer.<arg>):")
    for name in registry.names():
        entry = registry.get(name)
        needs = [w for w, f in (("value_fn", entry.needs_value_fn), ("key", entry.needs_key)) if f]
        extra = f"[update uses {', '.join(needs)}]" if needs else ""
        lines.append(f"  {name:<20} {extra}".rstrip())
        args = ", ".join(_default_repr(p) for p in entry.arguments().values())
        lines.append(f"  {'':<20}   {args}")
    lines.append("")
    lines.append(
        "runner optimizer fields (every optimizer): "
        + _fields(C.OptimizerConfig).replace("name='', ", "")
    )
    lines.append("schedules: " + ", ".join(C.SCHEDULES))
    lines.append(
        "diagnostics fields (curvature in metrics.jsonl every N steps; every=0 is off): "
        + _fields(C.DiagnosticsConfig)
    )
    lines.append(
        "data-file tasks (mnist, fashion_mnist, cifar10: task.data_dir; npz: task.path) read "
        "files you already have; nothing is downloaded"
    )
    lines.append("")
    lines.append("bundled configs (jaxopt2 run <name>): " + ", ".join(C.bundled_config_names()))
    return "\n".join(lines)
