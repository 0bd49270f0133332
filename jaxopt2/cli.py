"""The ``jaxopt2`` command line: ``run``, ``compare`` and ``list``.

Exit codes: 0 success; 2 a user error (bad config, arguments, missing file, run-dir
conflict), reported in at most three lines on stderr without a traceback; 3 training stopped
on a non-finite loss (``nonfinite: stop``); 128 + signal number (143 for SIGTERM, 130 for
Ctrl-C) when interrupted after saving a checkpoint — rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

__all__ = ["main"]

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


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (plus a hint) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jaxopt2",
        description="Train and compare jaxopt2 optimizers on small offline tasks.",
    )
    sub = p.add_subparsers(dest="command", metavar="{run,compare,list}", parser_class=_Parser)
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

    sub.add_parser(
        "list",
        help="list tasks, models, optimizers and bundled configs",
        description="List tasks, models, registered optimizers (with their config "
        "fields) and bundled configs.",
    )
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from jaxopt2.experiment.config import load_config
    from jaxopt2.experiment.trainer import run_config

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


def _cmd_list(args: argparse.Namespace) -> int:
    from jaxopt2.experiment.listing import listing

    print(listing())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxopt2`` console script; returns the exit code."""
    from jaxopt2._cpu_workaround import apply_cpu_deadlock_workaround

    apply_cpu_deadlock_workaround()
    parser = _parser()
    # Overrides may come after options (`run cfg --run-dir d steps=5`): argparse leaves such
    # positionals unparsed, so collect the KEY=VALUE ones here.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + [a for a in extra if a not in unknown]
    from jaxopt2.experiment.errors import UserError

    handler = {"run": _cmd_run, "compare": _cmd_compare, "list": _cmd_list}[args.command]
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
