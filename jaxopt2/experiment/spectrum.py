"""``jaxopt2 spectrum``: the Hessian spectrum of a run's latest checkpoint or of an initial model.

For a run directory the parameters come from its newest checkpoint (read-only: a run that is
still training is not disturbed); for a sweep directory, from member ``member`` of its newest
checkpoint (with that member's config: its seed gives its batches); for a config (file or
bundled name, plus overrides) they are the initial parameters of that config. The loss is the
task's own training loss, on

* ``batches="full"``: every training row at once (the default), or
* ``batches=N``: the first ``N`` batches that the run trains on (``batch_size`` rows each,
  in the run's own order), their mean loss, i.e. the loss on those ``N * batch_size`` rows.

What is computed (one jitted call of :func:`jaxopt2.experiment.diagnostics.hessian_spectrum`,
in the parameters' float32): the top-k eigenvalues (Lanczos), the Hutchinson trace with its
standard error, and the stochastic Lanczos quadrature density. Written to the output
directory: ``spectrum.json`` (all numbers, the SLQ nodes and weights, and the smoothed density
on a grid) and ``spectrum.png`` (the smoothed density, log-scale, with the top eigenvalues).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from jaxopt2.curvature import density_on_grid
from jaxopt2.experiment.checkpoint import Checkpointer
from jaxopt2.experiment.config import ResolvedConfig, bundled_config_names, from_dict, load_config
from jaxopt2.experiment.diagnostics import hessian_spectrum
from jaxopt2.experiment.engine import Engine
from jaxopt2.experiment.errors import UserError
from jaxopt2.experiment.plots import pyplot
from jaxopt2.experiment.rundir import atomic_write
from jaxopt2.experiment.setup import build_setup
from jaxopt2.experiment.sweep import build_engine
from jaxopt2.experiment.sweep_grid import prepare_sweep

__all__ = ["SpectrumResult", "load_source", "run_spectrum", "spectrum_of"]

GRID_POINTS = 1000
SIGMA_FRACTION = 0.01  # kernel width of the smoothed density, as a fraction of the node range


@dataclasses.dataclass
class Source:
    """Where the parameters come from."""

    rc: ResolvedConfig
    run_dir: Path | None  # None: the config's initial parameters
    stem: str
    member: int | None = None  # a sweep member (run_dir is a sweep directory)
    sweep_plan: Any = None  # the sweep's plan (for a sweep member)


@dataclasses.dataclass
class SpectrumResult:
    data: dict[str, Any]  # what spectrum.json holds
    out_dir: Path
    trace_count: int  # how often the spectrum program was traced (1)


def _sweep_source(path: Path, member: int | None) -> Source:
    """Member `member` of the sweep in `path` (its config rebuilt from config.yaml + grid.yaml)."""

    try:
        # Any: the file's structure is checked by using it (errors become a UserError).
        grid: Any = OmegaConf.to_container(OmegaConf.load(path / "grid.yaml"))
        axes, seeds = grid["axes"], [int(s) for s in grid["seeds"]]
        items = [f"{k}={','.join(repr(float(v)) for v in vals)}" for k, vals in axes.items()]
    except Exception as e:
        raise UserError(f"cannot read {path / 'grid.yaml'}: {e}") from None
    items.append(f"seed={','.join(map(str, seeds))}" if len(seeds) > 1 else f"seed={seeds[0]}")
    plan = prepare_sweep(str(path / "config.yaml"), items)
    n = len(plan.members)
    if member is None:
        raise UserError(
            f"{path} is a sweep of {n} members: pass --member J (0..{n - 1}; the member "
            "numbers are in its results.md)"
        )
    if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < n:
        raise UserError(f"--member must be an integer in 0..{n - 1} for {path}, got {member!r}")
    return Source(plan.members[member].rc, path, f"{path.name}-member{member}", member, plan)


def load_source(
    spec: str, overrides: list[str] | tuple[str, ...] = (), member: int | None = None
) -> Source:
    """A run directory (holding config.yaml), a sweep directory (with `member`), or a config
    file / bundled config name."""
    path = Path(os.path.expanduser(spec))
    if member is not None and not (path / "grid.yaml").is_file():
        raise UserError(f"--member selects a member of a sweep directory; {spec} is not one")
    if path.is_dir() and (path / "grid.yaml").is_file():
        if overrides:
            raise UserError(
                f"overrides ({' '.join(overrides)}) apply to a CONFIG, not to the sweep dir {spec}"
            )
        return _sweep_source(path, member)
    if path.is_dir():
        cfg_path = path / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(
                f"{spec} is a directory without config.yaml: not a jaxopt2 run dir "
                "(pass a run dir or a config file)"
            )
        if overrides:
            raise UserError(
                f"overrides ({' '.join(overrides)}) apply to a CONFIG, not to the run dir {spec}"
            )
        try:
            raw = OmegaConf.to_container(OmegaConf.load(cfg_path))
        except Exception as e:  # yaml errors
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot read {cfg_path}: {line}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{cfg_path} is not a config mapping")
        return Source(from_dict(raw), path, path.name)
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if not path.exists() and not (path.parent == Path(".") and name in bundled_config_names()):
        raise UserError(
            f"not found: {spec} is neither a run dir nor a config file "
            "(`jaxopt2 list` names the bundled configs)"
        )
    rc, stem = load_config(spec, list(overrides))
    return Source(rc, None, stem)


def _parse_batches(batches: str | int) -> int | None:
    """None for the full training set, else a positive number of batches."""
    if isinstance(batches, str):
        if batches.strip().lower() == "full":
            return None
        try:
            batches = int(batches)
        except ValueError:
            raise UserError(
                f"--batches must be 'full' or a positive integer, got {batches!r}"
            ) from None
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise UserError(f"--batches must be 'full' or a positive integer, got {batches!r}")
    return batches


def _check_count(name: str, value: int, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")


def spectrum_of(
    source: Source,
    *,
    top_k: int = 5,
    trace_probes: int = 100,
    density_iters: int = 60,
    density_probes: int = 8,
    batches: str | int = "full",
    seed: int | None = None,
    probe_batch: int | None = None,
) -> tuple[dict[str, Any], int]:
    """Compute the spectrum of `source`; returns ``(json-able dict, trace count)``."""
    _check_count("--top-k", top_k)
    _check_count("--trace-probes", trace_probes, 2)
    _check_count("--density-iters", density_iters)
    _check_count("--density-probes", density_probes)
    if probe_batch is not None:
        _check_count("--probe-batch", probe_batch)
    n_batches = _parse_batches(batches)
    rc = source.rc
    setup = build_setup(rc)
    params = setup.params
    step = 0
    if source.run_dir is not None:
        ckpt_dir = source.run_dir / "checkpoints"
        restored = None
        # the engine that wrote the checkpoint gives its layout
        engine = Engine(rc, [setup]) if source.member is None else build_engine(source.sweep_plan)
        if ckpt_dir.is_dir():
            ckpt = Checkpointer(ckpt_dir, rc.run.checkpoint.keep, read_only=True)
            try:
                if ckpt.steps():
                    restored = engine.restore(ckpt)
            finally:
                ckpt.close()
        if restored is None:
            raise UserError(
                f"run dir {source.run_dir} has no (loadable) checkpoint; train it first with "
                "`jaxopt2 run`, or pass a config for its initial parameters"
            )
        carry, meta = restored
        member = 0 if source.member is None else source.member
        params, step = jax.tree.map(lambda a: a[member], carry["params"]), int(meta["step"])

    dim = setup.n_params
    if top_k > dim:
        raise UserError(f"--top-k {top_k} exceeds the number of parameters ({dim})")
    density_iters = min(density_iters, dim)

    # The loss: the full training set, or the first N batches of the run, stacked.
    data = setup.train_data
    n = setup.task.n_train
    if not data:
        rows, desc = 0, "no data (deterministic objective)"
        stacked = False
    elif n_batches is None or not setup.sampled:
        rows, desc = n, f"full batch ({n} rows)"
        stacked = False
    else:
        batch_list = [setup.batch(data, jnp.asarray(s, jnp.int32)) for s in range(n_batches)]
        data = tuple(jnp.stack(parts) for parts in zip(*batch_list, strict=True))
        rows = n_batches * setup.batch_size
        desc = f"{n_batches} batch{'es' if n_batches > 1 else ''} of {setup.batch_size} rows"
        stacked = True

    loss_fn = setup.loss_fn
    traces = 0

    def program(p, d, key):
        nonlocal traces
        traces += 1
        if stacked:

            def value_fn(q):
                return jnp.mean(jax.lax.map(lambda b: loss_fn(q, *b), d))
        else:

            def value_fn(q):
                return loss_fn(q, *d)

        return hessian_spectrum(
            value_fn,
            p,
            key,
            top_k=top_k,
            trace_probes=trace_probes,
            density_iters=density_iters,
            density_probes=density_probes,
            probe_batch_size="auto" if probe_batch is None else probe_batch,
        )

    key = jax.random.fold_in(jax.random.PRNGKey(rc.run.seed if seed is None else seed), 7)
    t0 = time.perf_counter()
    out = jax.device_get(jax.jit(program)(params, data, key))
    elapsed = time.perf_counter() - t0

    nodes = np.asarray(out["density_nodes"], np.float64)
    weights = np.asarray(out["density_weights"], np.float64)
    grid, density, sigma = _smoothed(nodes, weights)
    evals = [float(v) for v in np.asarray(out["top_eigenvalues"])]
    result = {
        "source": str(source.run_dir) if source.run_dir is not None else f"config {source.stem}",
        "member": source.member,
        "member_values": (
            None
            if source.member is None
            else {
                **source.sweep_plan.members[source.member].values,
                "seed": source.sweep_plan.members[source.member].seed,
            }
        ),
        "task": rc.task_spec.name,
        "model": rc.model_name,
        "optimizer": rc.optimizer.name,
        "step": step,
        "params": "checkpoint" if source.run_dir is not None else "initial",
        "batches": "full" if n_batches is None else n_batches,
        "loss_on": desc,
        "rows": rows,
        "num_params": dim,
        "dtype": str(jax.tree.leaves(params)[0].dtype),
        "top_k": top_k,
        "top_eigenvalues": evals,
        "trace": float(out["trace"]),
        "trace_stderr": float(out["trace_stderr"]),
        "trace_probes": trace_probes,
        "density_iters": density_iters,
        "density_probes": density_probes,
        "density_nodes": nodes.tolist(),
        "density_weights": weights.tolist(),
        "density_sigma": sigma,
        "density_grid": grid.tolist(),
        "density": density.tolist(),
        "seed": rc.run.seed if seed is None else seed,
        "time_s": elapsed,
    }
    return result, traces


def _smoothed(nodes: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The SLQ measure smoothed with a Gaussian kernel on a grid spanning the nodes."""
    lo, hi = float(nodes.min()), float(nodes.max())
    span = hi - lo
    if not span > 0:
        span = max(abs(hi), 1.0)
    sigma = SIGMA_FRACTION * span
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, GRID_POINTS)
    density = np.asarray(density_on_grid(nodes, weights, grid, sigma=sigma), np.float64)
    return grid, density, sigma


def plot_spectrum(data: dict[str, Any], path: Path) -> None:
    """The smoothed spectral density (log y) with the top eigenvalues marked."""
    plt = pyplot()
    grid = np.asarray(data["density_grid"])
    density = np.asarray(data["density"])
    floor = max(float(density.max()) * 1e-8, 1e-300) if density.size else 1e-300
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid, np.maximum(density, floor), lw=1.2, label="SLQ density (smoothed)")
    for i, v in enumerate(data["top_eigenvalues"]):
        ax.axvline(v, color="tab:red", ls="--", lw=0.8, label="top eigenvalues" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    where = f"step {data['step']}" if data["params"] == "checkpoint" else "initial parameters"
    ax.set_title(f"Hessian spectrum: {data['task']} / {data['model']}, {where}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _g(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.5g}"


def format_spectrum(data: dict[str, Any], out_dir: Path) -> str:
    where = (
        f"step {data['step']} (checkpoint of {data['source']})"
        if data["params"] == "checkpoint"
        else f"initial parameters of {data['source']}"
    )
    if data.get("member") is not None:
        values = " ".join(f"{k.rpartition('.')[2]}={v:g}" for k, v in data["member_values"].items())
        where = where[:-1] + f", member {data['member']}: {values})"
    nodes = np.asarray(data["density_nodes"])
    lines = [
        f"jaxopt2 spectrum: {data['task']} / {data['model']}, {where}",
        f"  loss on       {data['loss_on']}; {data['num_params']} params ({data['dtype']})",
        f"  top-{data['top_k']} eigvals  " + ", ".join(_g(v) for v in data["top_eigenvalues"]),
        f"  trace         {_g(data['trace'])} ± {_g(data['trace_stderr'])} "
        f"(Hutchinson, {data['trace_probes']} probes)",
        f"  density       SLQ, {data['density_probes']} probes x {data['density_iters']} "
        f"Lanczos steps; nodes in [{_g(float(nodes.min()))}, {_g(float(nodes.max()))}]",
        f"  wrote         {out_dir / 'spectrum.json'}, {out_dir / 'spectrum.png'} "
        f"({data['time_s']:.2f} s)",
    ]
    return "\n".join(lines)


def run_spectrum(
    spec: str,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    out: Path | None = None,
    stream: TextIO | Literal["stdout"] | None = "stdout",
    plot: bool = True,
    member: int | None = None,
    **kwargs: Any,
) -> SpectrumResult:
    """``jaxopt2 spectrum``: compute, write spectrum.json (+ spectrum.png) and print a summary.

    Args:
      spec: a run directory, a sweep directory (with `member`) or a config (file or bundled
        name).
      overrides: dotted overrides (configs only).
      out: output directory (default: the run dir; ``<sweep dir>/spectrum-member<J>``; or
        ``runs/<stem>-spectrum`` for a config).
      member: the sweep member (its index in the sweep's results), for a sweep directory.
      stream: where the summary is printed (``"stdout"``: sys.stdout at call time; None).
      kwargs: ``top_k``, ``trace_probes``, ``density_iters``, ``density_probes``, ``batches``,
        ``seed``, ``probe_batch`` (see :func:`spectrum_of`).
    """
    source = load_source(spec, overrides, member)
    if out is None:
        if source.member is not None:
            assert source.run_dir is not None  # a sweep member's source is its sweep dir
            out = source.run_dir / f"spectrum-member{source.member}"
        else:
            out = source.run_dir or Path("runs") / f"{source.stem}-spectrum"
    data, traces = spectrum_of(source, **kwargs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "spectrum.json", json.dumps(data, indent=1) + "\n")
    if plot:
        plot_spectrum(data, out / "spectrum.png")
    if stream is not None:
        print(format_spectrum(data, out), file=sys.stdout if stream == "stdout" else stream)
    return SpectrumResult(data, out, traces)
