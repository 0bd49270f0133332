"""The ``jaxopt2`` command line: ``run``, ``compare``, ``spectrum`` and ``list``.

Exit codes: 0 success; 2 a user error (bad config, arguments, missing file, run-dir
conflict, the ``runner`` extra not installed), reported in at most three lines on stderr
without a traceback; 3 training stopped
on a non-finite loss (``nonfinite: stop``); 128 + signal number (143 for SIGTERM, 130 for
Ctrl-C) when interrupted after saving a checkpoint — rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import NoReturn

__all__ = ["main"]

# The packages of pyproject.toml's `runner` extra, as module name -> distribution name. The
# library installs without them; every command of this command line needs them.
_RUNNER_MODULES = {
    "equinox": "equinox",
    "matplotlib": "matplotlib",
    "omegaconf": "omegaconf",
    "orbax.checkpoint": "orbax-checkpoint",
    "sklearn": "scikit-learn",
    "tqdm": "tqdm",
}
_RUNNER_INSTALL = "pip install 'jaxopt2[runner]'"

_EPILOG_RUN = """\
overrides are dotted.key=value pairs applied over the YAML, e.g.
  jaxopt2 run quickstart steps=500 optimizer.learning_rate=3e-3 model.hidden=[64,64]

CONFIG is a YAML file, or the name of a bundled config (see `jaxopt2 list`).
Rerunning the same command in the same run dir resumes from its last checkpoint.
exit codes: 0 done, 2 user error, 3 non-finite loss, 143 SIGTERM (checkpoint saved)."""

_EPILOG_COMPARE = """\
each optimizer runs with its registry defaults plus the config's learning rate and schedule
(`name:lr` sets a learning rate for one optimizer), on the same task, initialization and batches.
  jaxopt2 compare quickstart --optimizers adam,sgd:0.1,lion:3e-4 steps=1000"""


_EPILOG_SPECTRUM = """\
  jaxopt2 spectrum runs/quickstart                  # the run's latest checkpoint
  jaxopt2 spectrum task_quadratic task.dim=50       # a config's initial parameters
  jaxopt2 spectrum runs/quickstart --batches 4 --top-k 10 --out spectra/q
  jaxopt2 spectrum runs/quickstart-sweep --member 3 # member 3 of a sweep (see results.md)"""


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "positive")


def _nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0, "non-negative")


def _batches(text: str) -> str | int:
    return "full" if text.strip().lower() == "full" else _positive_int(text)


_EPILOG_SWEEP = """\
KEY=V1,V2,... is a grid axis (numeric optimizer hyperparameters, or seed); KEY=VALUE an override.
  jaxopt2 sweep quickstart optimizer.learning_rate=1e-4,1e-3,1e-2 seed=0,1,2 steps=500
  jaxopt2 sweep opt_adam optimizer.learning_rate=1e-3,1e-2 optimizer.b1=0.8,0.9,0.95"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (plus a hint) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jaxopt2",
        description="Train and compare jaxopt2 optimizers on small offline tasks.",
    )
    sub = p.add_subparsers(
        dest="command", metavar="{run,compare,sweep,spectrum,list}", parser_class=_Parser
    )
    sub.required = True

    r = sub.add_parser(
        "run",
        help="train one run from a config",
        epilog=_EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one run from a YAML config; resume it if the run dir holds it.",
    )
    r.add_argument("config", metavar="CONFIG", help="YAML file or bundled config name")
    r.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", default=[], help="dotted config overrides"
    )
    r.add_argument(
        "--run-dir",
        metavar="DIR",
        type=Path,
        help="run directory (default: runs/<config stem> under the current dir)",
    )
    r.add_argument(
        "--overwrite", action="store_true", help="replace a run dir that holds a different config"
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="multi-process job: the coordinator's address (process 0 listens there); "
        "default JAXOPT2_COORDINATOR",
    )
    r.add_argument(
        "--num-processes",
        type=_positive_int,
        metavar="N",
        help="multi-process job: processes in it (default JAXOPT2_NUM_PROCESSES)",
    )
    r.add_argument(
        "--process-id",
        type=int,
        metavar="I",
        help="multi-process job: this process, 0..N-1 (default JAXOPT2_PROCESS_ID)",
    )

    c = sub.add_parser(
        "compare",
        help="train several optimizers on the same task and compare them",
        epilog=_EPILOG_COMPARE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one config under several optimizers; write an overlay plot and a "
        "table (compare.png, compare.md, compare.json).",
    )
    c.add_argument("config", metavar="CONFIG", help="YAML file or bundled config name")
    c.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", default=[], help="dotted config overrides"
    )
    c.add_argument(
        "--optimizers",
        required=True,
        metavar="A,B[:LR],...",
        help="comma-separated registry names, each optionally name:learning_rate",
    )
    c.add_argument(
        "--run-dir",
        metavar="DIR",
        type=Path,
        help="directory (default: runs/<config stem>-compare); one sub-run each",
    )
    c.add_argument(
        "--target-loss",
        type=float,
        metavar="LOSS",
        help="loss to reach (default: config target_loss, else the worst final loss)",
    )
    c.add_argument(
        "--overwrite", action="store_true", help="replace sub-runs that hold a different config"
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser(
        "spectrum",
        help="Hessian spectrum (top-k, trace, density) of a run's checkpoint or a config",
        epilog=_EPILOG_SPECTRUM,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Top-k Hessian eigenvalues, Hutchinson trace and SLQ spectral density of "
        "the training loss at a run's latest checkpoint (RUN_DIR; a sweep dir with --member) "
        "or at a config's initial parameters (CONFIG); writes spectrum.json and spectrum.png.",
    )
    s.add_argument("source", metavar="RUN_DIR|CONFIG", help="run directory, YAML file or name")
    s.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", default=[], help="overrides (CONFIG only)"
    )
    s.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="default 5")
    s.add_argument(
        "--trace-probes", type=_positive_int, default=100, metavar="N", help="default 100"
    )
    s.add_argument(
        "--density-iters", type=_positive_int, default=60, metavar="N", help="Lanczos steps (60)"
    )
    s.add_argument(
        "--density-probes", type=_positive_int, default=8, metavar="N", help="SLQ probes (8)"
    )
    s.add_argument(
        "--batches",
        default="full",
        metavar="full|N",
        type=_batches,
        help="loss on the whole training set (default) or on the run's first N batches",
    )
    s.add_argument(
        "--probe-batch",
        type=_positive_int,
        default=None,
        metavar="B",
        help="run trace/density probes in groups of B (less memory); default: one vmap on "
        "accelerators, cache-sized groups on CPU",
    )
    s.add_argument(
        "--member",
        type=_nonnegative_int,
        default=None,
        metavar="J",
        help="for a sweep dir: the member (its number in results.md)",
    )
    s.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output dir (default: the run dir; a sweep's <dir>/spectrum-member<J>; for a "
        "config runs/<stem>-spectrum)",
    )

    w = sub.add_parser(
        "sweep",
        help="train a grid of numeric hyperparameters x seeds in one compiled program",
        epilog=_EPILOG_SWEEP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every member of a grid over numeric hyperparameters and seeds "
        "(key=v1,v2,...) in one vmapped program; write results.md/json, metrics.jsonl, "
        "sweep.png and checkpoints (rerun the same command to resume).",
    )
    w.add_argument("config", metavar="CONFIG", help="YAML file or bundled config name")
    w.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=V1,V2,...|KEY=VALUE",
        default=[],
        help="grid axes and dotted config overrides",
    )
    w.add_argument("--run-dir", metavar="DIR", type=Path, help="default: runs/<config stem>-sweep")
    w.add_argument("--overwrite", action="store_true", help="replace a different sweep's dir")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser(
        "list",
        help="list tasks, models, optimizers and bundled configs",
        description="List tasks, models, registered optimizers (with their config "
        "fields) and bundled configs.",
    )
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from jaxopt2.experiment.config import load_config
    from jaxopt2.experiment.distributed import initialize_processes
    from jaxopt2.experiment.trainer import run_config

    initialize_processes(args.coordinator, args.num_processes, args.process_id)
    rc, stem = load_config(args.config, args.overrides)
    run_dir = args.run_dir if args.run_dir is not None else Path("runs") / stem
    result = run_config(
        rc,
        run_dir,
        overwrite=args.overwrite,
        handle_signals=True,
        progress=False if args.no_progress else None,
    )
    return result.exit_code


def _cmd_compare(args: argparse.Namespace) -> int:
    from jaxopt2.experiment.compare import compare, parse_optimizers
    from jaxopt2.experiment.config import load_config

    optimizers = parse_optimizers(args.optimizers)
    rc, stem = load_config(args.config, args.overrides)
    run_dir = args.run_dir if args.run_dir is not None else Path("runs") / f"{stem}-compare"
    result = compare(
        rc,
        optimizers,
        run_dir,
        target_loss=args.target_loss,
        overwrite=args.overwrite,
        handle_signals=True,
        progress=False if args.no_progress else None,
    )
    return result.exit_code


def _cmd_spectrum(args: argparse.Namespace) -> int:
    from jaxopt2.experiment.spectrum import run_spectrum

    run_spectrum(
        args.source,
        args.overrides,
        out=args.out,
        top_k=args.top_k,
        trace_probes=args.trace_probes,
        density_iters=args.density_iters,
        density_probes=args.density_probes,
        batches=args.batches,
        probe_batch=args.probe_batch,
        member=args.member,
    )
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from jaxopt2.experiment.sweep import sweep

    result = sweep(
        args.config,
        args.overrides,
        args.run_dir,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        handle_signals=True,
    )
    return result.exit_code


def _cmd_list(args: argparse.Namespace) -> int:
    from jaxopt2.experiment.listing import listing

    print(listing())
    return 0


def _missing_runner_packages() -> list[str]:
    """The distributions of the `runner` extra that cannot be found (none imported)."""
    missing = []
    for module, dist in _RUNNER_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # its parent package is missing too
            found = False
        if not found:
            missing.append(dist)
    return missing


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxopt2`` console script; returns the exit code."""
    from jaxopt2.cpu import apply_cpu_deadlock_workaround, limit_lapack_threads

    apply_cpu_deadlock_workaround()
    limit_lapack_threads()
    parser = _parser()
    # Overrides may come after options (`run cfg --run-dir d steps=5`): argparse leaves such
    # positionals unparsed, so collect the KEY=VALUE ones here.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + [a for a in extra if a not in unknown]
    missing = _missing_runner_packages()
    if missing:
        print(
            f"jaxopt2 {args.command}: error: the experiment runner needs {', '.join(missing)}, "
            f"which {'is' if len(missing) == 1 else 'are'} not installed: {_RUNNER_INSTALL} "
            "(in a source checkout: pip install -e '.[runner]')",
            file=sys.stderr,
        )
        return 2
    from jaxopt2.experiment.errors import UserError

    handler = {
        "run": _cmd_run,
        "compare": _cmd_compare,
        "list": _cmd_list,
        "spectrum": _cmd_spectrum,
        "sweep": _cmd_sweep,
    }[args.command]
    try:
        return handler(args)
    except UserError as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        lines[0] = f"jaxopt2 {args.command}: error: {lines[0]}"
        print("\n".join(lines[:3]), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"jaxopt2 {args.command}: interrupted", file=sys.stderr)
        return 130


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
