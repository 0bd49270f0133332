"""Timing helpers for the benchmarks: warm medians of interleaved repeats.

Protocol: every function is called once first (tracing + XLA compilation + one run, reported
as ``first_call_s``); then ``rounds`` rounds each call every function once, in an order that
rotates from round to round, and each call is timed from dispatch to ``block_until_ready``.
A sample is the mean over ``inner`` back-to-back calls, each one blocked on. Results are the
median over rounds; ratios are reported both as the ratio of medians and as the median of the
per-round ratios (robust to background load that drifts during the run, since the calls of
one round are close in time).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def first_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, inner: int = 1
) -> dict[str, list[float]]:
    """Per-round seconds per call of each function (warm: call each once before)."""
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                jax.block_until_ready(fn())
            samples[name].append((time.perf_counter() - t0) / inner)
    return samples


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[r] / den[r]``."""
    return median([a / b for a, b in zip(num, den, strict=True)])


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def rounded(x, digits=6):
    """`x` with every float rounded to `digits` significant digits (for readable JSON)."""
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v, digits) for v in x]
    if isinstance(x, float | np.floating):
        return float(f"{float(x):.{digits}g}")
    return x
