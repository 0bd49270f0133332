"""Mutation audit: do the tests catch wrong numerics?

Each *mutant* below is one small, deliberate bug in a numerical core of the library (a sign
flip, a dropped transpose or bias correction, a wrong root exponent, an ignored option, an
off-by-one refresh counter, a changed damping or radius rule, ...), written as data: the
file, an exact snippet of it (which must occur exactly once), its replacement, the test
files of its area and a one-line description. For every mutant the audit copies the
repository (``git ls-files`` plus untracked files that are not ignored) into a fresh scratch
directory, applies the one replacement there, and runs the area's tests on the copy::

    python -m pytest <area tests> -x -q -n 0 -p no:cacheprovider   (PYTHONPATH = the copy)

A mutant is **killed** when the tests fail, **survived** when they pass, **timeout** when
the run exceeds the per-mutant limit (counted as killed, reported separately) and **stale**
when its snippet no longer occurs exactly once (the code moved on: reported, not counted).
A mutant may carry an ``equivalent`` note, for a change that provably cannot alter any
result: if it survives the note is printed instead of counting a survivor. Before the
mutants, the union of their area tests must pass on an unmutated copy (the baseline);
otherwise the audit stops, since a failing baseline would make every mutant look killed.

Area test lists are generous: the float64 reference tests under ``tests/references/`` first
(under a minute, and the most discriminating, so a killed mutant stops early under ``-x``),
then the module's own tests, then the cross-cutting checks
(``tests/optimizers/test_shared_checks.py`` for optimizers). A listed path that does
not exist when the audit runs (a folder added or renamed later) is skipped. A mutant of a
file that only some registry entries import (``SHARED_ENTRIES``) runs the shared checks of
those entries only (``-k``); the baseline runs every test once.

How to run (from the repository root; it is not part of the default test run)::

    python experiments/mutation_audit.py --check        # snippets still apply? (seconds)
    python experiments/mutation_audit.py --list         # the mutants
    python experiments/mutation_audit.py                # the full audit
    python experiments/mutation_audit.py --only ID,ID   # some mutants
    python experiments/mutation_audit.py --jobs 2 --timeout 1800

How long: the baseline runs every area's tests once; each mutant then runs its own area's
tests, all of them when it survives, up to the first failure when it is killed. On two CPU
cores expect the baseline to take 15-30 minutes and the full audit several hours (most of it
spent by survivors, which run their whole area; ``--jobs N`` runs N mutants at a time, each
in its own copy). All runs share one XLA compilation cache (a temporary directory, removed
at the end): a cached executable is the one a fresh compile of the same program gives, and
a mutant's changed programs miss the cache, so sharing it only saves the compiles of the
unchanged ones. The default per-mutant limit is twice the baseline's time (at least 15
minutes); pytest's own per-test timeout (``pyproject.toml``) ends a hung test before that.

How to read the result: one line per mutant, ``ID  STATUS  SECONDS  FIRST FAILING TEST``,
then ``killed / counted (%)``. JSON lines go to ``experiments/results/mutation_audit.jsonl``
(``--out`` elsewhere): a ``baseline`` record, one ``mutant`` record per mutant (id, file,
description, status, seconds, first failing test, the test paths run, the pytest exit code
and, for a survivor, the tail of its output) and a ``summary``. A survivor names a gap: no
test pins that piece of numerics down (the ``expect`` field of each mutant records what was
predicted when it was written; a surprise either way is worth a look). A killed mutant
whose first failure is an error at collection or import is a crash rather than a numerical
catch; the record's ``note`` says so.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "experiments" / "results" / "mutation_audit.jsonl"
MIN_TIMEOUT_S = 900.0

# --------------------------------------------------------------------------- test areas

SHARED = "tests/optimizers/test_shared_checks.py"
REFERENCES = "tests/references"


def _area(*own: str, shared: bool = True) -> tuple[str, ...]:
    """The test paths of an area: the float64 references first (under a minute, and the
    most discriminating: a killed mutant stops at its first failure), then its own files,
    then the shared checks."""
    return (REFERENCES, *own, *((SHARED,) if shared else ()))


T_SHAMPOO = _area("tests/optimizers/test_shampoo.py", "tests/optimizers/test_lowbit.py")
T_KRONECKER = _area(
    "tests/optimizers/test_shampoo.py",
    "tests/optimizers/test_soap.py",
    "tests/optimizers/test_lowbit.py",
)
T_SOAP = _area("tests/optimizers/test_soap.py")
T_LOWBIT = _area("tests/optimizers/test_lowbit.py", "tests/optimizers/test_shampoo.py")
T_KFAC = _area(
    "tests/optimizers/test_kfac.py",
    "tests/curvature/test_sequence_losses.py",
    "tests/optimizers/test_kfac_transformer.py",
    "tests/optimizers/test_bf16_tracking.py",
)
T_SOPHIA = _area("tests/optimizers/test_sophia.py")
T_ADAHESSIAN = _area("tests/optimizers/test_adahessian.py")
T_OASIS = _area("tests/optimizers/test_oasis.py")
T_FOSI = _area("tests/optimizers/test_fosi.py")
T_HESSIAN_FREE = _area("tests/optimizers/test_newton.py")
T_PRODUCTS = _area(
    "tests/curvature/test_products.py",
    "tests/optimizers/test_newton.py",
    "tests/optimizers/test_sophia.py",
    "tests/optimizers/test_kfac.py",
)
T_ESTIMATORS = _area(
    "tests/curvature/test_estimators.py",
    "tests/curvature/test_probe_batching.py",
    "tests/optimizers/test_fosi.py",
    "tests/optimizers/test_sophia.py",
    "tests/optimizers/test_adahessian.py",
    "tests/optimizers/test_oasis.py",
)
T_TAGS = _area(
    "tests/curvature/test_sequence_losses.py",
    "tests/curvature/test_products.py",
    "tests/optimizers/test_newton.py",
    "tests/optimizers/test_sophia.py",
    "tests/optimizers/test_kfac.py",
)
T_ROOTS = _area(
    "tests/linalg/test_roots.py",
    "tests/optimizers/test_shampoo.py",
    "tests/optimizers/test_lowbit.py",
)
T_CG = _area("tests/linalg/test_cg.py", "tests/solvers/test_transforms.py", shared=False)
T_TRIDIAGONAL = _area(
    "tests/linalg/test_tridiagonal.py",
    "tests/curvature/test_estimators.py",
    "tests/optimizers/test_fosi.py",
    shared=False,
)
T_MINIMIZE = _area(
    "tests/solvers/test_minimize.py",
    "tests/solvers/test_transforms.py",
    "tests/solvers/test_damped_newton.py",
    shared=False,
)
T_DAMPED = _area(
    "tests/solvers/test_damped_newton.py",
    "tests/solvers/test_minimize.py",
    "tests/solvers/test_transforms.py",
    shared=False,
)
T_LEAST_SQUARES = _area(
    "tests/solvers/test_least_squares.py", "tests/solvers/test_transforms.py", shared=False
)

# A file that only some registry entries import: its mutants run the shared checks of those
# entries only (matched by name: "shampoo" also selects the KL and low-bit rows' modes, which
# are shampoo's). Files used across the registry (products, estimators, tags, solvers) run all.
SHARED_ENTRIES: dict[str, tuple[str, ...]] = {
    "jaxopt2/optimizers/shampoo.py": ("shampoo", "soap"),
    "jaxopt2/optimizers/_kronecker.py": ("shampoo", "soap", "kfac"),
    "jaxopt2/optimizers/soap.py": ("soap",),
    "jaxopt2/optimizers/_lowbit.py": ("shampoo", "soap"),
    "jaxopt2/optimizers/kfac/_optimizer.py": ("kfac",),
    "jaxopt2/optimizers/kfac/_factors.py": ("kfac",),
    "jaxopt2/optimizers/sophia.py": ("sophia",),
    "jaxopt2/optimizers/adahessian.py": ("adahessian",),
    "jaxopt2/optimizers/oasis.py": ("oasis",),
    "jaxopt2/optimizers/fosi.py": ("fosi",),
    "jaxopt2/linalg/roots.py": ("shampoo", "soap", "kfac"),
}

# --------------------------------------------------------------------------- the mutants


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One deliberate bug.

    Attributes:
      id: a short unique name.
      file: the mutated file, relative to the repository root.
      original: an exact snippet of `file`; it must occur exactly once.
      replacement: what the snippet becomes.
      tests: the test paths of the mutant's area, run in this order (missing ones skipped).
      description: one line: what is wrong in the mutant.
      expect: "killed", "survives" or "unsure": the prediction made when the mutant was
        written, from reading the tests (not used by the audit, reported beside the result).
      equivalent: for a change that cannot alter any result, why (a survivor is then
        explained instead of counted).
    """

    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    description: str
    expect: str = "unsure"
    equivalent: str | None = None


SHAMPOO = "jaxopt2/optimizers/shampoo.py"
KRONECKER = "jaxopt2/optimizers/_kronecker.py"
SOAP = "jaxopt2/optimizers/soap.py"
LOWBIT = "jaxopt2/optimizers/_lowbit.py"
KFAC = "jaxopt2/optimizers/kfac/_optimizer.py"
KFAC_FACTORS = "jaxopt2/optimizers/kfac/_factors.py"
SOPHIA = "jaxopt2/optimizers/sophia.py"
ADAHESSIAN = "jaxopt2/optimizers/adahessian.py"
OASIS = "jaxopt2/optimizers/oasis.py"
FOSI = "jaxopt2/optimizers/fosi.py"
HESSIAN_FREE = "jaxopt2/optimizers/newton.py"
PRODUCTS = "jaxopt2/curvature/products.py"
ESTIMATORS = "jaxopt2/curvature/estimators.py"
TAGS = "jaxopt2/curvature/tags.py"
CG = "jaxopt2/linalg/cg.py"
ROOTS = "jaxopt2/linalg/roots.py"
TRIDIAGONAL = "jaxopt2/linalg/tridiagonal.py"
TRUST_REGION = "jaxopt2/solvers/_trust_region.py"
SUBPROBLEMS = "jaxopt2/solvers/_subproblems.py"
CUBIC = "jaxopt2/solvers/_cubic.py"
SOLVER_NEWTON = "jaxopt2/solvers/_newton.py"
LEAST_SQUARES = "jaxopt2/solvers/least_squares.py"

M = Mutant
MUTANTS: tuple[Mutant, ...] = (
    # ---- Shampoo ------------------------------------------------------------------------
    M(
        "shampoo-default-exponent",
        SHAMPOO,
        'exponent = 0.5 if (one_sided or statistics == "kl") else 0.25',
        'exponent = 0.5 if (one_sided or statistics == "kl") else 0.5',
        T_SHAMPOO,
        "two-sided Shampoo takes the roots X^(-1/2) instead of X^(-1/4)",
        "killed",
    ),
    M(
        "shampoo-graft-adam-bias",
        SHAMPOO,
        'nu_hat = nu / (1.0 - b2**count) if kind == "adam" else nu',
        "nu_hat = nu",
        T_SHAMPOO,
        "the Adam graft's second moment is used without its bias correction",
        "killed",
    ),
    M(
        "shampoo-graft-rmsprop-ignored",
        SHAMPOO,
        'if kind in ("sgd", "none"):',
        'if kind in ("sgd", "none", "rmsprop"):',
        T_SHAMPOO,
        "graft='rmsprop' silently grafts SGD's norm (the option is ignored)",
        "survives",
    ),
    M(
        "shampoo-nesterov-ignored",
        SHAMPOO,
        "        if nesterov:\n",
        "        if False:\n",
        T_SHAMPOO,
        "nesterov=True gives plain momentum (the option is ignored)",
        "survives",
    ),
    M(
        "shampoo-momentum-bias",
        SHAMPOO,
        "correction = 1.0 - b1**fcount",
        "correction = 1.0",
        T_SHAMPOO,
        "the momentum EMA of the update is returned without its bias correction",
        "survives",
    ),
    M(
        "shampoo-refresh-off-by-one",
        SHAMPOO,
        "do_refresh = (t >= start) & ((t - start) % k == 0) & finite",
        "do_refresh = (t >= start) & ((t - start + 1) % k == 0) & finite",
        T_SHAMPOO,
        "roots refreshed one step early in every period (first refresh at start + k - 1)",
        "survives",
    ),
    M(
        "shampoo-kl-whitening-dropped",
        KRONECKER,
        "new_l = ema(left, mmt(h * s_r[:, None, :], h) / c, decay)",
        "new_l = ema(left, mmt(h, h) / c, decay)",
        T_KRONECKER,
        "KL statistics: L accumulates G Gᵀ / c, no longer whitened by R⁻¹ (KL-Shampoo, KL-SOAP)",
        "survives",
    ),
    M(
        "kronecker-ascending-eigh",
        KRONECKER,
        "w, q = w[..., ::-1], q[..., ::-1]",
        "w, q = w, q",
        T_KRONECKER,
        "descending_eigh returns ascending columns (padded coordinates land in the corner)",
        "killed",
    ),
    M(
        "roots-absolute-damping",
        ROOTS,
        "spectrum = (jnp.maximum(w, 0.0) + damping * w_max) ** (-1.0 / p)",
        "spectrum = (jnp.maximum(w, 0.0) + damping) ** (-1.0 / p)",
        T_ROOTS,
        "eigh roots damp by ε instead of ε·λ_max (absolute, scale-dependent damping)",
        "killed",
    ),
    M(
        "roots-newton-start",
        ROOTS,
        "x0 = z ** (1.0 / p) * eye",
        "x0 = z ** (1.0 / (p + 1.0)) * eye",
        T_ROOTS,
        "coupled Newton starts from z^(1/(p+1)) I: the iteration converges to a scaled root",
        "killed",
    ),
    M(
        "lowbit-bjorck-dropped",
        LOWBIT,
        "return jnp.matmul(q, 1.5 * eye - 0.5 * gram, precision=HIGHEST)",
        "return q",
        T_LOWBIT,
        "the dequantized eigenvectors are not re-orthogonalized (Björck step dropped)",
        "killed",
    ),
    M(
        "lowbit-truncated-codes",
        LOWBIT,
        "codes = jnp.round(unit * 127.0).astype(jnp.int8)",
        "codes = jnp.trunc(unit * 127.0).astype(jnp.int8)",
        T_LOWBIT,
        "8-bit codes truncated toward zero instead of rounded (twice the error, biased)",
        "unsure",
    ),
    # ---- SOAP ---------------------------------------------------------------------------
    M(
        "soap-rotation-transpose-dropped",
        SOAP,
        "x, None if ql is None else jnp.swapaxes(ql, -1, -2), qr",
        "x, None if ql is None else ql, qr",
        T_SOAP,
        "the gradient is rotated by Q_L G Q_R instead of Q_Lᵀ G Q_R",
        "killed",
    ),
    M(
        "soap-shampoo-b2-ignored",
        SOAP,
        "factor_decay = b2 if shampoo_b2 is None else shampoo_b2",
        "factor_decay = b2",
        T_SOAP,
        "shampoo_b2 is ignored: the factors always decay with b2",
        "survives",
    ),
    M(
        "soap-nu-not-rotated",
        SOAP,
        "v = kr.mm(jnp.square(kr.tmm(nl, ol)), v)",
        "v = v",
        T_SOAP,
        "on a refresh the second moment is not carried into the new left basis",
        "killed",
    ),
    M(
        "soap-second-moment-bias",
        SOAP,
        "c1, c2 = 1.0 - b1**fcount, 1.0 - b2**fcount",
        "c1, c2 = 1.0 - b1**fcount, 1.0",
        T_SOAP,
        "the eigenbasis second moment is used without its bias correction",
        "killed",
    ),
    M(
        "soap-qr-sort-ascending",
        SOAP,
        "order = jnp.argsort(-est, axis=-1)",
        "order = jnp.argsort(est, axis=-1)",
        T_SOAP,
        "QR refresh sorts the old columns by ascending Rayleigh quotient",
        "killed",
    ),
    M(
        "soap-refresh-off-by-one",
        SOAP,
        "(t % k == 0) & finite",
        "((t + 1) % k == 0) & finite",
        T_SOAP,
        "bases refreshed at steps k-1, 2k-1, ... (never a full eigh at step 0 when k > 1)",
        "survives",
    ),
    # ---- K-FAC --------------------------------------------------------------------------
    M(
        "kfac-pi-swapped",
        KFAC,
        "gam_a, gam_g = pi * jnp.sqrt(lam_), jnp.sqrt(lam_) / pi",
        "gam_a, gam_g = jnp.sqrt(lam_) / pi, pi * jnp.sqrt(lam_)",
        T_KFAC,
        "π-correction: A gets √λ/π and G gets π√λ (the split of the damping swapped)",
        "survives",
    ),
    M(
        "kfac-softmax-fisher-sqrt-diagonal",
        KFAC,
        "return s[..., None] * eye - p[..., :, None] * s[..., None, :]",
        "return s[..., None] * eye",
        T_KFAC,
        "exact Fisher for softmax: B = diag(√p) (the -p √pᵀ term of the square root dropped)",
        "survives",
    ),
    M(
        "kfac-bias-correction-dropped",
        KFAC,
        "correction = 1.0 - decay ** (t // stats_every + 1).astype(stats_dtype)",
        "correction = jnp.ones([], stats_dtype)",
        T_KFAC,
        "factor and diagonal-Fisher EMAs are used without their bias correction",
        "survives",
    ),
    M(
        "kfac-homogeneous-coordinate-zero",
        KFAC,
        "a = jnp.concatenate([a, jnp.ones_like(a[..., :1])], axis=-1)",
        "a = jnp.concatenate([a, jnp.zeros_like(a[..., :1])], axis=-1)",
        T_KFAC,
        "A's bias coordinate is 0 instead of 1 (the bias gets no curvature)",
        "killed",
    ),
    M(
        "kfac-a-normalized-by-examples",
        KFAC,
        "_unslice([sa_k / r for sa_k, r in zip(sum_a, rows_a, strict=True)], head, axis=1)",
        "_unslice([sa_k / n for sa_k, r in zip(sum_a, rows_a, strict=True)], head, axis=1)",
        T_KFAC,
        "A is divided by the batch size instead of the row count (wrong for sequences, convs)",
        "killed",
    ),
    M(
        "kfac-ekfac-ignored",
        KFAC,
        "if ekfac:  # inv0, inv1 are the eigenbases",
        "if False:  # inv0, inv1 are the eigenbases",
        T_KFAC,
        "ekfac=True preconditions with the eigenbases as if they were the inverses",
        "killed",
    ),
    M(
        "kfac-ekfac-scaling-reset-zero",
        KFAC,
        "s0 = jnp.maximum(w0, 0.0)[:, :, None] * jnp.maximum(w1, 0.0)[:, None, :]",
        "s0 = jnp.zeros_like(old_s)",
        T_KFAC,
        "EKFAC's scaling restarts from 0 at a refresh, not from K-FAC's eigenvalue products",
        "survives",
    ),
    M(
        "kfac-lm-rule-inverted",
        KFAC,
        "grow = jnp.where(r < 0.25, lam / damping_adaptation_decay, lam)",
        "grow = jnp.where(r < 0.25, lam * damping_adaptation_decay, lam)",
        T_KFAC,
        "Levenberg-Marquardt: a poor reduction ratio lowers λ instead of raising it",
        "unsure",
    ),
    M(
        "kfac-corner-without-bias",
        KFAC_FACTORS,
        "ka = layer.in_features + (layer.bias is not None)",
        "ka = layer.in_features",
        T_KFAC,
        "row info forgets the bias coordinate (π's dim A, EKFAC's eigenbasis corner)",
        "killed",
    ),
    # ---- diagonal second-order methods ----------------------------------------------------
    M(
        "sophia-gnb-batch-scale",
        SOPHIA,
        "root = jnp.sqrt(split.row_weights())",
        "root = split.row_weights()",
        T_SOPHIA,
        "GNB estimate: rows weighted by c_r, not √c_r (ĝ ⊙ ĝ off by the row count)",
        "killed",
    ),
    M(
        "sophia-refresh-count",
        SOPHIA,
        "num = state.count // update_interval + 1 - num_nonfinite",
        "num = state.count // update_interval - num_nonfinite",
        T_SOPHIA,
        "bias correction of h counts one refresh too few",
        "killed",
    ),
    M(
        "adahessian-nu-bias",
        ADAHESSIAN,
        "nu_hat = optax.tree.bias_correction(nu, b2, count)",
        "nu_hat = nu",
        T_ADAHESSIAN,
        "the Hessian-diagonal second moment is used without its bias correction",
        "killed",
    ),
    M(
        "adahessian-abs-dropped",
        ADAHESSIAN,
        "_spatial_average(jnp.abs(x), spatial_averaging)",
        "_spatial_average(x, spatial_averaging)",
        T_ADAHESSIAN,
        "conv kernels average the signed estimate over the window, not |D|",
        "killed",
    ),
    M(
        "oasis-warm-start-dropped",
        OASIS,
        "jnp.where(first, e, b2 * d + (1 - b2) * e)",
        "b2 * d + (1 - b2) * e",
        T_OASIS,
        "D_0 is (1-b2) times the first estimate instead of the estimate itself",
        "killed",
    ),
    M(
        "oasis-truncation-abs-dropped",
        OASIS,
        "m / jnp.maximum(jnp.abs(d), alpha)",
        "m / jnp.maximum(d, alpha)",
        T_OASIS,
        "negative curvature is truncated to α instead of using |D|",
        "killed",
    ),
    M(
        "fosi-eigenvalue-abs-dropped",
        FOSI,
        "coef / jnp.maximum(jnp.abs(eigvals), eps)",
        "coef / jnp.maximum(eigvals, eps)",
        T_FOSI,
        "negative eigenvalues are floored at eps instead of using |λ| in the Newton part",
        "killed",
    ),
    M(
        "fosi-base-projection-dropped",
        FOSI,
        "b = b - jnp.matmul(jnp.matmul(eigvecs, b, precision=_HIGHEST), eigvecs, "
        "precision=_HIGHEST)",
        "b = b",
        T_FOSI,
        "the base optimizer's step is not projected off the Newton subspace",
        "killed",
    ),
    # ---- Hessian-free -------------------------------------------------------------------
    M(
        "hf-negative-curvature-sign",
        HESSIAN_FREE,
        "alpha = (rs / jnp.where(negative, -pap, pap)).astype(dtype)",
        "alpha = (rs / pap).astype(dtype)",
        T_HESSIAN_FREE,
        "truncated CG steps along negative curvature with a negative length (model ascent)",
        "killed",
    ),
    M(
        "hf-progress-window",
        HESSIAN_FREE,
        "k = jnp.maximum(10, jnp.ceil(0.1 * i).astype(jnp.int32))",
        "k = jnp.maximum(1, jnp.ceil(0.1 * i).astype(jnp.int32))",
        T_HESSIAN_FREE,
        "Martens' progress test looks back 1 iteration instead of at least 10",
        "unsure",
    ),
    M(
        "hf-damping-decrease-threshold",
        HESSIAN_FREE,
        "jnp.where(rho > 0.75, lam * hp(damping_decrease), lam)",
        "jnp.where(rho > 0.5, lam * hp(damping_decrease), lam)",
        T_HESSIAN_FREE,
        "Levenberg-Marquardt lowers λ from ρ > 1/2 instead of ρ > 3/4",
        "survives",
    ),
    # ---- curvature ----------------------------------------------------------------------
    M(
        "products-softmax-fisher-diagonal",
        PRODUCTS,
        "return p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)",
        "return p * u",
        T_PRODUCTS,
        "softmax output Fisher diag(p) instead of diag(p) - p pᵀ",
        "killed",
    ),
    M(
        "products-gaussian-sample-scale",
        PRODUCTS,
        "return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)",
        "return outputs + 0.5 * jax.random.normal(key, outputs.shape, outputs.dtype)",
        T_PRODUCTS,
        "squared error: targets sampled with standard deviation 1/2 (MC Fisher biased by 1/4)",
        "killed",
    ),
    M(
        "estimators-lanczos-no-reorthogonalization",
        ESTIMATORS,
        "w = _orthogonalize(w, basis)",
        "w = _orthogonalize(w, jnp.where((jnp.arange(basis.shape[0]) >= j - 1)[:, None], "
        "basis, 0.0))",
        T_ESTIMATORS,
        "Lanczos orthogonalizes against the last two vectors only (full reorthogonalization "
        "dropped)",
        "killed",
    ),
    M(
        "estimators-hutchpp-residual-scale",
        ESTIMATORS,
        "residual_part = jnp.sum(g * mv(g)) / num_residual",
        "residual_part = jnp.sum(g * mv(g)) / num_matvecs",
        T_ESTIMATORS,
        "Hutch++ averages the residual probes over all matvecs, not the residual ones",
        "killed",
    ),
    M(
        "estimators-trace-stderr-ddof",
        ESTIMATORS,
        "stderr = jnp.std(samples, ddof=1) / math.sqrt(num_probes)",
        "stderr = jnp.std(samples, ddof=0) / math.sqrt(num_probes)",
        T_ESTIMATORS,
        "Hutchinson's standard error uses the biased (ddof=0) standard deviation",
        "survives",
    ),
    M(
        "estimators-slq-weights-last-component",
        ESTIMATORS,
        "weights = vectors[:, 0, :] ** 2 / num_probes",
        "weights = vectors[:, -1, :] ** 2 / num_probes",
        T_ESTIMATORS,
        "SLQ weights from the last components of the Ritz vectors instead of the first",
        "killed",
    ),
    M(
        "tags-jvp-sign",
        TAGS,
        "return loss_tag_p.bind(*primals, **params), ad.instantiate_zeros(tangents[0])",
        "return loss_tag_p.bind(*primals, **params), -ad.instantiate_zeros(tangents[0])",
        T_TAGS,
        "tag_loss flips the sign of tangents: no longer an identity for differentiation",
        "killed",
    ),
    # ---- linear algebra -----------------------------------------------------------------
    M(
        "cg-stop-unsquared",
        CG,
        "return (i < maxiter) & (rs > threshold_sq) & curvature_ok",
        "return (i < maxiter) & (rs > threshold) & curvature_ok",
        T_CG,
        "CG compares ‖r‖² with the tolerance instead of its square (stops early)",
        "killed",
    ),
    M(
        "cg-threshold-min",
        CG,
        "threshold = jnp.maximum(rtol * jnp.sqrt(optax.tree.vdot(b, b)), atol).astype(dtype)",
        "threshold = jnp.minimum(rtol * jnp.sqrt(optax.tree.vdot(b, b)), atol).astype(dtype)",
        T_CG,
        "CG stops at min(rtol‖b‖, atol) instead of max(rtol‖b‖, atol)",
        "killed",
    ),
    M(
        "tridiagonal-lower-band-dropped",
        TRIDIAGONAL,
        "t = t.at[..., idx[1:], idx[:-1]].set(betas)",
        "t = t",
        T_TRIDIAGONAL,
        "the tridiagonal matrix gets its upper band only (eigh sees half the coupling)",
        "killed",
    ),
    # ---- solvers ------------------------------------------------------------------------
    M(
        "tr-grow-off-boundary",
        TRUST_REGION,
        "grow = (rho > 0.75) & on_boundary",
        "grow = rho > 0.75",
        T_MINIMIZE,
        "the trust radius doubles after a very successful interior step too",
        "unsure",
    ),
    M(
        "tr-boundary-wrong-root",
        TRUST_REGION,
        "return jnp.where(b <= 0, (-b + disc) / (2 * a), -2 * c / (b + disc))",
        "return jnp.where(b <= 0, (-b - disc) / (2 * a), -2 * c / (b + disc))",
        T_MINIMIZE,
        "Steihaug's step to the boundary takes the negative root τ (backwards) when zᵀd ≤ 0",
        "killed",
    ),
    M(
        "tr-steihaug-forcing-linear",
        TRUST_REGION,
        "rtol = jnp.minimum(0.5, jnp.sqrt(gnorm)) * gnorm",
        "rtol = 0.5 * gnorm",
        T_MINIMIZE,
        "Newton-CG's forcing term is 1/2, not min(1/2, √‖g‖) (linear local convergence)",
        "unsure",
    ),
    M(
        "subproblem-hard-case-no-eigvec",
        SUBPROBLEMS,
        "tau = jnp.where(w1 < 0, room, 0) * jnp.where(gt[0] > 0, -1, 1)",
        "tau = 0.0 * jnp.where(w1 < 0, room, 0) * jnp.where(gt[0] > 0, -1, 1)",
        T_MINIMIZE,
        "trust-region hard case: the step gets no component along the negative eigenvector",
        "killed",
    ),
    M(
        "cubic-sigma-never-decreases",
        CUBIC,
        'jnp.maximum(sigma / opts["gamma"], opts["sigma_min"])',
        "sigma",
        T_MINIMIZE,
        "ARC keeps σ after a very successful step instead of dividing it by gamma",
        "unsure",
    ),
    M(
        "aicn-step-size",
        SOLVER_NEWTON,
        "return 2.0 / (1.0 + jnp.sqrt(1.0 + 2.0 * lipschitz * newton_decrement))",
        "return 1.0 / (1.0 + jnp.sqrt(1.0 + 2.0 * lipschitz * newton_decrement))",
        T_DAMPED,
        "AICN's step size halved (1/(1+√(1+2LG)) instead of 2/(1+√(1+2LG)))",
        "killed",
    ),
    M(
        "root-newton-exponent",
        SOLVER_NEWTON,
        "(9.0 * smoothness) ** (1.0 / (q - 1.0))",
        "(9.0 * smoothness) ** (1.0 / q)",
        T_DAMPED,
        "Root Newton's regularization uses (9M)^(1/q) instead of (9M)^(1/(q-1))",
        "killed",
    ),
    M(
        "saddle-free-abs-dropped",
        SOLVER_NEWTON,
        "d = -v @ ((v.T @ g) / jnp.maximum(aw, floor))",
        "d = -v @ ((v.T @ g) / jnp.maximum(w, floor))",
        T_MINIMIZE,
        "saddle-free Newton floors λ instead of taking |λ| (negative curvature gets 1/δ)",
        "unsure",
    ),
    M(
        "lm-predicted-decrease-sign",
        LEAST_SQUARES,
        "pred = 0.5 * jnp.dot(h, mu * h - g)",
        "pred = 0.5 * jnp.dot(h, mu * h + g)",
        T_LEAST_SQUARES,
        "Levenberg-Marquardt's predicted decrease ½hᵀ(μh + Jᵀr) (sign of the gradient term)",
        "killed",
    ),
    M(
        "lm-nu-not-reset",
        LEAST_SQUARES,
        "nu_new = jnp.where(accepted, 2.0, 2 * st.nu)",
        "nu_new = jnp.where(accepted, st.nu, 2 * st.nu)",
        T_LEAST_SQUARES,
        "Nielsen's ν is not reset to 2 after an accepted step",
        "survives",
    ),
)
del M

# --------------------------------------------------------------------------- checks


def snippet_count(mutant: Mutant, root: Path = ROOT) -> int:
    """Occurrences of the mutant's snippet in its file (-1: the file is missing)."""
    path = root / mutant.file
    if not path.is_file():
        return -1
    return path.read_text(encoding="utf-8").count(mutant.original)


def existing_tests(mutant: Mutant, root: Path = ROOT) -> list[str]:
    """The mutant's test paths that exist under `root`, in order."""
    return [t for t in mutant.tests if (root / t).exists()]


def check(mutants: list[Mutant]) -> list[str]:
    """Problems of the mutant list against the current code (empty: every mutant applies).

    Checks: unique ids; each snippet occurs exactly once; the replacement differs from it;
    the mutated file still parses; each mutant has an existing test file besides the
    optional references folder.
    """
    problems = []
    seen = set()
    for m in mutants:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        if m.original == m.replacement:
            problems.append(f"{m.id}: the replacement equals the original snippet")
        count = snippet_count(m)
        if count < 0:
            problems.append(f"{m.id}: {m.file} does not exist")
            continue
        if count != 1:
            problems.append(f"{m.id}: stale, the snippet occurs {count} times in {m.file}")
            continue
        text = (ROOT / m.file).read_text(encoding="utf-8")
        try:
            ast.parse(text.replace(m.original, m.replacement, 1))
        except SyntaxError as err:
            problems.append(f"{m.id}: the mutated {m.file} does not parse ({err})")
        own = [t for t in existing_tests(m) if t != REFERENCES]
        if not own:
            problems.append(f"{m.id}: none of its test files exists: {m.tests}")
        missing = [t for t in m.tests if t != REFERENCES and not (ROOT / t).exists()]
        if own and missing:
            problems.append(f"{m.id}: test paths missing (skipped at run time): {missing}")
    return problems


# --------------------------------------------------------------------------- running


def repository_files() -> list[str]:
    """Tracked files plus untracked files that are not ignored, relative to the root."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    names = sorted({n for n in out.decode("utf-8").split("\0") if n})
    return [n for n in names if (ROOT / n).is_file()]  # tracked but deleted files drop out


def make_copy(files: list[str], dest: Path) -> None:
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


_RUNNING: dict[int, subprocess.Popen] = {}
_LOCK = threading.Lock()


def _stop(proc: subprocess.Popen) -> None:
    """End a child started by this script, with the process group it leads."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _environment(copy: Path, cache_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy)
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def shared_filter(mutant: Mutant) -> list[str]:
    """pytest's ``-k`` for a mutant whose file only the registry entries in
    ``SHARED_ENTRIES`` use: every test of its other files, and the shared checks of those
    entries (the other entries' shared checks run code the mutant does not touch)."""
    entries = SHARED_ENTRIES.get(mutant.file)
    if not entries or SHARED not in mutant.tests:
        return []
    return ["-k", f"not test_shared_checks or {' or '.join(entries)}"]


def run_pytest(
    copy: Path, tests: list[str], timeout: float | None, cache_dir: str, extra: tuple = ()
) -> dict:
    """pytest on `tests` in `copy`: exit code, seconds, first failure, output tail, timeout."""
    cmd = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-n", "0", "-p", "no:cacheprovider"]
    cmd += list(extra)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=copy,
        env=_environment(copy, cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a timeout ends its children too
    )
    with _LOCK:
        _RUNNING[proc.pid] = proc
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc)
        out, _ = proc.communicate()
    finally:
        with _LOCK:
            _RUNNING.pop(proc.pid, None)
    text = out.decode("utf-8", "replace")
    return {
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - t0,
        "first_failure": first_failure(text),
        "tail": text[-3000:],
        "timed_out": timed_out,
    }


def first_failure(output: str) -> str | None:
    """The first ``FAILED``/``ERROR`` test of pytest's short summary (``-ra``), if any."""
    for line in output.splitlines():
        found = re.match(r"^(FAILED|ERROR) (\S+)", line)
        if found:
            return found.group(2) if found.group(1) == "FAILED" else f"ERROR {found.group(2)}"
    if "Timeout" in output:
        return "pytest-timeout"
    return None


def check_imports_copy(copy: Path, cache_dir: str) -> None:
    """The copy, not an installed jaxopt2, is what the tests import."""
    out = subprocess.run(
        [sys.executable, "-c", "import jaxopt2; print(jaxopt2.__file__)"],
        cwd=copy,
        env=_environment(copy, cache_dir),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"mutation audit: the scratch copy imports jaxopt2 from {out}, not {copy}")


def classify(mutant: Mutant, result: dict) -> tuple[str, str | None]:
    """``(status, note)`` of a mutant run."""
    rc = result["returncode"]
    if result["timed_out"]:
        return "timeout", None
    if rc == 0:
        return ("equivalent", mutant.equivalent) if mutant.equivalent else ("survived", None)
    note = None
    if mutant.equivalent:
        note = f"marked equivalent ({mutant.equivalent}) but the tests fail: the note is wrong"
    if rc == 1:
        return "killed", note
    if rc in (2, 3):  # interrupted (an error at collection, e.g. an import) or internal error
        return "killed", note or f"pytest exit code {rc}: a crash, not a numerical catch"
    return "error", f"pytest exit code {rc} (usage error or no tests collected)"


def run_mutant(mutant: Mutant, files: list[str], timeout: float, cache_dir: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="jaxopt2-mutant-") as tmp:
        copy = Path(tmp)
        make_copy(files, copy)
        path = copy / mutant.file
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace(mutant.original, mutant.replacement, 1), encoding="utf-8")
        tests = existing_tests(mutant, copy)
        result = run_pytest(copy, tests, timeout, cache_dir, tuple(shared_filter(mutant)))
    status, note = classify(mutant, result)
    record = {
        "kind": "mutant",
        "id": mutant.id,
        "file": mutant.file,
        "description": mutant.description,
        "expect": mutant.expect,
        "status": status,
        "seconds": round(result["seconds"], 1),
        "first_failure": result["first_failure"],
        "tests": tests,
        "pytest_filter": shared_filter(mutant)[1:],
        "returncode": result["returncode"],
    }
    if note:
        record["note"] = note
    if status in ("survived", "equivalent", "error"):
        record["tail"] = result["tail"]
    return record


def union_tests(mutants: list[Mutant]) -> list[str]:
    out: list[str] = []
    for m in mutants:
        out += [t for t in existing_tests(m) if t not in out]
    return out


def summary(records: list[dict], stale: list[str]) -> dict:
    count = lambda s: sum(r["status"] == s for r in records)
    killed, timeout, survived = count("killed"), count("timeout"), count("survived")
    counted = killed + timeout + survived
    return {
        "kind": "summary",
        "killed": killed + timeout,
        "timeouts": timeout,
        "survived": survived,
        "counted": counted,
        "percent_killed": round(100.0 * (killed + timeout) / counted, 1) if counted else None,
        "equivalent": count("equivalent"),
        "errors": count("error"),
        "stale": stale,
        "survivors": [r["id"] for r in records if r["status"] == "survived"],
        "surprises": [
            r["id"]
            for r in records
            if (r["expect"], r["status"]) in (("killed", "survived"), ("survives", "killed"))
        ],
    }


def print_line(record: dict) -> None:
    first = record.get("first_failure") or ""
    note = record.get("note") or ""
    if record["status"] == "equivalent":
        note = f"equivalent: {note}"
    extra = "  ".join(x for x in (first, note) if x)
    print(
        f"{record['id']:<42} {record['status']:<10} {record['seconds']:8.1f}s  "
        f"(expected {record['expect']})  {extra}",
        flush=True,
    )


def select(only: str | None) -> list[Mutant]:
    if not only:
        return list(MUTANTS)
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    known = {m.id: m for m in MUTANTS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"mutation audit: unknown mutant id(s) {unknown}; see --list.")
    return [known[w] for w in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument(
        "--check", action="store_true", help="check every snippet applies (no tests) and exit"
    )
    parser.add_argument("--only", help="comma-separated mutant ids to run")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at a time (default 1)")
    parser.add_argument(
        "--timeout",
        type=float,
        help=f"seconds per mutant (default: twice the baseline, at least {MIN_TIMEOUT_S:.0f})",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON lines output")
    args = parser.parse_args(argv)
    mutants = select(args.only)

    if args.list:
        for m in mutants:
            print(f"{m.id:<42} {m.file}")
            print(f"    {m.description} (expected: {m.expect})")
            print(f"    tests: {' '.join(m.tests)}")
        print(f"{len(mutants)} mutants in {len({m.file for m in mutants})} files")
        return 0
    if args.check:
        problems = check(mutants)
        for p in problems:
            print(p)
        stale = sum("stale" in p or "does not exist" in p for p in problems)
        print(
            f"{len(mutants)} mutants checked: "
            + ("every snippet occurs exactly once" if not stale else f"{stale} stale")
            + (f"; {len(problems)} problem(s)" if problems else "")
        )
        return 1 if problems else 0
    if args.jobs < 1:
        raise SystemExit("mutation audit: --jobs must be at least 1.")

    live = [m for m in mutants if snippet_count(m) == 1]
    stale = [m.id for m in mutants if snippet_count(m) != 1]
    for m in mutants:
        if m.id in stale:
            print(f"{m.id:<42} stale      the snippet no longer occurs exactly once in {m.file}")
    if not live:
        raise SystemExit("mutation audit: no mutant applies to the current code.")

    files = repository_files()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cache_dir = tempfile.mkdtemp(prefix="jaxopt2-mutation-xla-cache-")
    records: list[dict] = []
    try:
        with args.out.open("w", encoding="utf-8") as out:

            def write(record: dict) -> None:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()

            tests = union_tests(live)
            print(f"baseline: {len(tests)} test paths on an unmutated copy ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="jaxopt2-mutation-baseline-") as tmp:
                make_copy(files, Path(tmp))
                check_imports_copy(Path(tmp), cache_dir)
                base = run_pytest(Path(tmp), tests, None, cache_dir)
            write(
                {
                    "kind": "baseline",
                    "tests": tests,
                    "seconds": round(base["seconds"], 1),
                    "returncode": base["returncode"],
                    "first_failure": base["first_failure"],
                }
            )
            if base["returncode"] != 0:
                print(base["tail"])
                print(
                    f"mutation audit: the baseline fails ({base['first_failure']}, exit code "
                    f"{base['returncode']}) on the unmutated code; fix the tests first: every "
                    "mutant would look killed."
                )
                return 2
            timeout = args.timeout or max(MIN_TIMEOUT_S, 2 * base["seconds"])
            print(
                f"baseline passed in {base['seconds']:.0f}s; {len(live)} mutants, "
                f"{args.jobs} at a time, {timeout:.0f}s limit each",
                flush=True,
            )
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futures = [pool.submit(run_mutant, m, files, timeout, cache_dir) for m in live]
                try:
                    for fut in as_completed(futures):
                        record = fut.result()
                        records.append(record)
                        print_line(record)
                        write(record)
                except KeyboardInterrupt:
                    for fut in futures:
                        fut.cancel()
                    with _LOCK:
                        running = list(_RUNNING.values())
                    for proc in running:
                        _stop(proc)
                    raise
            order = {m.id: i for i, m in enumerate(live)}
            records.sort(key=lambda r: order[r["id"]])
            result = summary(records, stale)
            write(result)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    print(
        f"\nkilled {result['killed']} / {result['counted']} "
        f"({result['percent_killed']}%), of which {result['timeouts']} by timeout; "
        f"{result['survived']} survived, {result['equivalent']} equivalent, "
        f"{len(stale)} stale, {result['errors']} errors"
    )
    if result["survivors"]:
        print("survivors (a test is missing for each):")
        for r in records:
            if r["status"] == "survived":
                print(f"  {r['id']}: {r['description']}")
    if result["surprises"]:
        print(f"against the prediction: {', '.join(result['surprises'])}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
