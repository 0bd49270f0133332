"""Per-optimizer test settings (one row per registry name) and the one step function.

Every name in :func:`jaxopt2.optimizers.registry.names` must have a row in :data:`CASES`;
``test_shared_checks.py::test_every_registered_optimizer_has_a_row`` fails loudly otherwise.

A row says:
  * ``hparams``: factory arguments for the generic contract checks (run on the float32
    quadratic of the zoo);
  * ``zoo``: per zoo problem, the number of steps, argument overrides and (only where stated,
    with the reason) a tolerance other than the problem's default. The criterion is always
    ``f(final) - f* <= rel_tol * (f0 - f*)`` on the loss at the last iterate (see ``zoo.py``);
  * ``bf16``: argument overrides for the bfloat16 check (200 steps on the bf16 quadratic,
    final loss <= 0.1 * initial loss). bf16 has an 8-bit mantissa: a step smaller than half
    an ulp of a parameter (~0.2% of it) rounds away, so sign-like optimizers (lion, lamb's
    trust ratio, adafactor's clipped RMS step, rmsprop) need a larger learning rate than in
    float32 to move at all;
  * ``xfail``: check name -> reason, only for behaviour inherent to optax (none needed now);
  * ``tagged``: set (to the reason) for optimizers that need a tagged loss
    (:func:`jaxopt2.tag_loss`): their ``zoo`` covers ``zoo.TAGGED_PROBLEMS`` instead, and the
    generic checks run on the tagged ``linear_regression`` instead of the quadratic;
  * ``inject``: hparams for the inject_hyperparams check when the generic ones have no
    numeric learning rate (an adaptive step size);
  * ``matrix``: set (overrides of ``hparams``, possibly empty) for optimizers with a
    structural path (Kronecker factors, layers, factored or orthogonalized matrices): their
    generic checks run on ``zoo.matrix`` (two matrices and a vector) instead, with schedules
    short enough that the one or two steps of a check already go through that path (the
    statistics, the refresh and its ``lax.cond`` traced and taken). A vector problem would
    leave the whole structural path untraced;
  * ``nonfinite``: the modes of the non-finite check, each a name and overrides of the
    generic arguments (refreshes on every step, so the bad step meets the curvature pass and
    the refresh); for an optax re-export, which has no guard of its own, the reason why its
    contract is checked inside ``optax.apply_if_finite`` instead.

Every optimizer is driven through :func:`train_step` (``jaxopt2.value_and_update`` with a key
per step from ``jax.random.fold_in``), whatever its needs: first-order optimizers receive and
ignore ``value``/``value_fn``/``key``, which is itself part of the contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxopt2
from jaxopt2.optimizers import registry
from tests.optimizers import zoo

PyTree = Any

BASE_KEY = jax.random.PRNGKey(1234)


@dataclasses.dataclass(frozen=True)
class Zoo:
    """How one optimizer runs one zoo problem.

    Attributes:
      steps: number of optimizer steps (one jitted ``lax.scan``).
      hparams: factory arguments overriding the row's ``hparams`` (a learning-rate schedule
        may be given as ``("cosine", peak)``: ``optax.cosine_decay_schedule(peak, steps)``).
      rel_tol: the relative-gap tolerance; None means the problem's default.
      note: why this row differs from the obvious choice (shown on failure).
    """

    steps: int
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    rel_tol: float | None = None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Case:
    hparams: dict[str, Any]
    zoo: dict[str, Zoo]
    bf16: dict[str, Any] = dataclasses.field(default_factory=dict)
    xfail: dict[str, str] = dataclasses.field(default_factory=dict)
    tagged: str = ""
    inject: dict[str, Any] | None = None
    matrix: dict[str, Any] | None = None
    nonfinite: dict[str, dict[str, Any]] | str = dataclasses.field(
        default_factory=lambda: {"default": {}}
    )

    @property
    def problems(self) -> dict[str, Callable[..., zoo.Problem]]:
        """The zoo problems this row must give settings for."""
        return zoo.TAGGED_PROBLEMS if self.tagged else zoo.PROBLEMS

    def generic_problem(self, dtype: Any = jnp.float32) -> zoo.Problem:
        """The problem the generic contract checks run on."""
        if self.matrix is not None:
            return zoo.matrix(dtype)
        return zoo.linear_regression(dtype) if self.tagged else zoo.quadratic(dtype)

    @property
    def generic(self) -> dict[str, Any]:
        """The factory arguments of the generic checks (``hparams`` with ``matrix``'s)."""
        return {**self.hparams, **(self.matrix or {})}


_OPTAX = (
    "an optax re-export keeps optax's behaviour, which has no non-finite guard of its own: "
    "the contract is that of optax.apply_if_finite around it"
)

_FIXED_STEP = (
    "fixed-length steps (trust ratio / clipped RMS step) never settle at a constant learning "
    "rate; a cosine decay to 0 is the standard use"
)

CASES: dict[str, Case] = {
    "sgd": Case(
        nonfinite=_OPTAX,
        hparams={"learning_rate": 0.01},  # 1/L = 0.01 on the quadratic
        zoo={
            "quadratic": Zoo(1000),
            "rosenbrock": Zoo(8000, {"learning_rate": 2e-3}, note="lr > ~4e-3 diverges"),
            "logistic": Zoo(3000, {"learning_rate": 0.3}),
            "mlp": Zoo(3000, {"learning_rate": 0.3}),
        },
    ),
    "adam": Case(
        nonfinite=_OPTAX,
        hparams={"learning_rate": 0.03},
        zoo={
            "quadratic": Zoo(1000),
            "rosenbrock": Zoo(3000, {"learning_rate": 0.02}),
            "logistic": Zoo(1000),
            "mlp": Zoo(1000),
        },
    ),
    "adamw": Case(
        nonfinite=_OPTAX,
        # Default weight_decay=1e-4 kept: it moves the fixed point by far less than the tolerances.
        hparams={"learning_rate": 0.03},
        zoo={
            "quadratic": Zoo(1000),
            "rosenbrock": Zoo(3000, {"learning_rate": 0.02}),
            "logistic": Zoo(1000),
            "mlp": Zoo(1000),
        },
    ),
    "schedule_free_adamw": Case(
        nonfinite=_OPTAX,
        # optax.contrib's schedule-free AdamW; its training iterate y converges like Adam's.
        hparams={"learning_rate": 0.03},
        zoo={
            "quadratic": Zoo(1000),
            "rosenbrock": Zoo(
                3000,
                {"learning_rate": 0.1},
                note="the averaged iterate lags the valley at 0.02 (gap 1.6e-3 after 3000 steps)",
            ),
            "logistic": Zoo(1000),
            "mlp": Zoo(1000),
        },
    ),
    "nadam": Case(
        nonfinite=_OPTAX,
        hparams={"learning_rate": 0.03},
        zoo={
            "quadratic": Zoo(1000),
            "rosenbrock": Zoo(3000, {"learning_rate": 0.02}),
            "logistic": Zoo(1000),
            "mlp": Zoo(1000),
        },
    ),
    "lion": Case(
        nonfinite=_OPTAX,
        hparams={"learning_rate": 3e-3},
        zoo={
            "quadratic": Zoo(2000),
            "rosenbrock": Zoo(5000, {"learning_rate": 1e-3}),
            "logistic": Zoo(2000, {"learning_rate": 1e-3}),
            "mlp": Zoo(1000),
        },
        bf16={"learning_rate": 0.03},
    ),
    "rmsprop": Case(
        nonfinite=_OPTAX,
        hparams={"learning_rate": 3e-3},
        zoo={
            "quadratic": Zoo(2000),
            "rosenbrock": Zoo(5000, {"learning_rate": 1e-3}),
            "logistic": Zoo(2000, {"learning_rate": 1e-3}),
            "mlp": Zoo(1000, {"learning_rate": 0.01}),
        },
        bf16={"learning_rate": 0.03},
    ),
    "adagrad": Case(
        nonfinite=_OPTAX,
        hparams={"learning_rate": 0.3},
        zoo={
            "quadratic": Zoo(1000),
            "rosenbrock": Zoo(5000),
            "logistic": Zoo(2000),
            "mlp": Zoo(2000),
        },
    ),
    "adafactor": Case(
        nonfinite=_OPTAX,
        hparams={"learning_rate": 3e-3},
        matrix={"min_dim_size_to_factor": 2},  # factored second moments on both matrices
        zoo={
            "quadratic": Zoo(2000),
            "rosenbrock": Zoo(5000, {"learning_rate": ("cosine", 0.03)}, note=_FIXED_STEP),
            "logistic": Zoo(2000, {"learning_rate": 0.03}),
            "mlp": Zoo(1000, {"learning_rate": 0.03}),
        },
        bf16={"learning_rate": 0.03},
    ),
    "lamb": Case(
        nonfinite=_OPTAX,
        hparams={"learning_rate": 1e-3},
        zoo={
            "quadratic": Zoo(2000),
            "rosenbrock": Zoo(5000, {"learning_rate": ("cosine", 0.01)}, note=_FIXED_STEP),
            "logistic": Zoo(2000, {"learning_rate": 0.01}),
            "mlp": Zoo(1000, {"learning_rate": 0.01}),
        },
        bf16={"learning_rate": 0.03},
    ),
    "adahessian": Case(
        nonfinite={"default": {"update_every": 1}},
        hparams={"learning_rate": 0.15},
        zoo={
            "quadratic": Zoo(1000),
            "rosenbrock": Zoo(
                4000,
                {"learning_rate": 1.0},
                note="the valley's Hessian is far from diagonal: only a diagonal-Newton-sized "
                "step (lr 1) gets through the bend in a few thousand steps",
            ),
            "logistic": Zoo(1000),
            "mlp": Zoo(1000),
        },
    ),
    "muon": Case(
        nonfinite=_OPTAX,
        # optax.contrib.muon: orthogonalized momentum on the MLP's matrices, Adam (adam_b1/b2)
        # on vectors, so the quadratic, Rosenbrock and logistic rows exercise its Adam part.
        hparams={"learning_rate": 0.03},
        matrix={},  # Newton-Schulz on w1, w2; Adam on b
        zoo={
            "quadratic": Zoo(1000),
            "rosenbrock": Zoo(3000, {"learning_rate": 0.02}),
            "logistic": Zoo(1000),
            "mlp": Zoo(1000),
        },
    ),
    "shampoo": Case(
        nonfinite={
            "default": {"precondition_every": 1},
            "kl": {"precondition_every": 1, "statistics": "kl"},
        },
        # Vectors (quadratic, Rosenbrock, logistic) take the Adam graft; the MLP's matrices
        # are preconditioned (roots every 5 steps from step 5). Matrix-specific behaviour is
        # tested in test_shampoo.py.
        hparams={"learning_rate": 0.03, "precondition_every": 5},
        # Roots from the first step on, refreshed on even steps: every check's first step is
        # a preconditioned one, and a two-step check takes both branches of the refresh.
        # w1 [4, 3] on its side of 3 only (one gradient's 4 x 4 factor is singular), w2
        # [3, 3] on both sides.
        matrix={
            "precondition_every": 2,
            "start_preconditioning_step": 0,
            "max_precondition_dim": 3,
        },
        zoo={
            "quadratic": Zoo(1000),
            "rosenbrock": Zoo(3000, {"learning_rate": 0.02}),
            "logistic": Zoo(1000),
            "mlp": Zoo(1000),
        },
    ),
    "soap": Case(
        nonfinite={
            "default": {"precondition_every": 1},
            "kl": {"precondition_every": 1, "statistics": "kl"},
        },
        # Vectors take plain Adam (b1 = b2 = 0.95, SOAP's defaults); the MLP's matrices run
        # Adam in their factors' eigenbases. Matrix-specific behaviour is in test_soap.py.
        hparams={"learning_rate": 0.03, "precondition_every": 5},
        # Bases refreshed on even steps (the first included), one-sided: the first step is
        # Adam in the first gradient's eigenbasis, and rotated on both sides that gradient is
        # diagonal (its SVD): the zeros off the diagonal come out as rounding noise, which
        # Adam's first step scales to full size (a different update under jit than eagerly).
        matrix={"precondition_every": 2, "one_sided": True},
        # optax.inject_hyperparams as users write it leaves one_sided (structural) at its
        # default, two-sided: a larger eps keeps that rounding noise (1e-8-sized entries) from
        # being scaled to full size, so the injected and plain programs agree
        inject={"learning_rate": 0.03, "eps": 1e-2},
        zoo={
            "quadratic": Zoo(1000),
            "rosenbrock": Zoo(3000, {"learning_rate": 0.02}),
            "logistic": Zoo(1000),
            "mlp": Zoo(1000),
        },
    ),
    "kfac": Case(
        nonfinite={
            "adaptive": {"invert_every": 1},
            "fixed": {"learning_rate": 0.3, "momentum": 0.5, "invert_every": 1},
            "ekfac": {"ekfac": True, "invert_every": 1},
            "ekfac_fixed": {"ekfac": True, "learning_rate": 0.3, "invert_every": 1},
        },
        # The recommended setting: kfac() with learning rate, momentum and damping all taken
        # from the quadratic model. Layer-level numerics are tested in test_kfac.py.
        hparams={},
        inject={"learning_rate": 0.3, "momentum": 0.5},
        # Two dense layers (inverses refreshed on even steps) and b in no layer (the diagonal
        # Fisher).
        matrix={"invert_every": 2},
        tagged="K-FAC's curvature is that of a tagged loss (jaxopt2.tag_loss): on an untagged "
        "problem (the quadratic, Rosenbrock) it has nothing to precondition and refuses",
        zoo={
            "linear_regression": Zoo(30),  # a single layer: K-FAC is exact Gauss-Newton there
            "logistic_layer": Zoo(100),
            "mlp_tagged": Zoo(100),
            "mlp_regression": Zoo(150),
        },
    ),
    "sophia": Case(
        nonfinite={"default": {"update_interval": 1}},
        # Hutchinson estimator (the default), refreshed every 10 steps (the paper's k). Each
        # coordinate moves by at most lr per step. GNB runs on the tagged zoo in test_sophia.py.
        # No weight decay and the former eps: the zoo measures the gap to the unregularized
        # minimum (optax's defaults, weight_decay=1e-4 and eps=1e-8, shift it).
        hparams={"learning_rate": 0.03, "weight_decay": 0.0, "eps": 1e-12},
        zoo={
            "quadratic": Zoo(400),
            "rosenbrock": Zoo(800),
            "logistic": Zoo(400),
            "mlp": Zoo(100),
        },
    ),
    "hessian_free": Case(
        # curvature="auto": Hessian-vector products on these untagged problems, Gauss-Newton on
        # the tagged ones (test_newton.py); the step is the CG solution (lr 1).
        hparams={"learning_rate": 1.0},
        # The inject check compares a jitted step with an eager one to rtol 1e-5: 16-24 float32
        # CG iterations on this cond-50 system differ by up to ~2e-5 between the two (jit's
        # different rounding), so that check (about the injected learning rate, not CG) takes
        # one CG iteration, where both agree to rounding.
        inject={"learning_rate": 1.0, "max_cg_iters": 1},
        zoo={
            "quadratic": Zoo(10),
            "rosenbrock": Zoo(40),
            "logistic": Zoo(25),
            "mlp": Zoo(25),
        },
    ),
    "oasis": Case(
        nonfinite={"default": {"update_every": 1}},
        hparams={"learning_rate": 0.2},
        zoo={
            "quadratic": Zoo(300),
            "rosenbrock": Zoo(
                4000,
                {"learning_rate": 0.5},
                note="the valley's Hessian is far from diagonal (as for adahessian): a "
                "near-diagonal-Newton step (lr 0.5) gets through the bend in ~3000 steps",
            ),
            "logistic": Zoo(400),
            "mlp": Zoo(200),
        },
    ),
    "egn": Case(
        # The exact damped Gauss-Newton step of the tagged minibatch loss (lr 1: the full step).
        hparams={"learning_rate": 1.0, "damping": 1e-3},
        tagged="EGN's curvature is the Gauss-Newton matrix of a tagged loss (jaxopt2.tag_loss); "
        "on an untagged problem there is no model/loss split to take",
        zoo={
            "linear_regression": Zoo(5),  # linear residuals: Gauss-Newton is Newton
            "logistic_layer": Zoo(30),
            "mlp_tagged": Zoo(50),
            "mlp_regression": Zoo(50),
        },
    ),
    "mfac": Case(
        # The empirical Fisher of full-batch gradients on a quadratic or Rosenbrock is far from
        # the Hessian (consecutive gradients nearly parallel): a damping above the gradients'
        # squared scale makes the step GD-like (lr / damping) with momentum. On the
        # cross-entropy problems the window's Fisher is a good curvature model: small damping.
        hparams={"learning_rate": 0.5, "damping": 10.0, "momentum": 0.9, "num_grads": 8},
        zoo={
            "quadratic": Zoo(600),
            "rosenbrock": Zoo(3000, {"learning_rate": 0.02, "damping": 1.0}),
            "logistic": Zoo(200, {"learning_rate": 0.1, "damping": 0.01, "momentum": 0.0}),
            "mlp": Zoo(300, {"learning_rate": 1.0, "damping": 0.01, "momentum": 0.0}),
        },
    ),
    "fosi": Case(
        nonfinite={"default": {"approx_every": 1}},
        # Default base optax.adam(learning_rate); Newton on the top-5 eigenspace (of 20 on the
        # quadratic), refreshed every 20 steps. Rosenbrock has 2 parameters: k=1.
        hparams={"learning_rate": 0.03, "k": 5},
        zoo={
            "quadratic": Zoo(300),
            "rosenbrock": Zoo(500, {"k": 1}),
            "logistic": Zoo(200),
            "mlp": Zoo(100),
        },
    ),
}


def nan_batch(batch: tuple[Any, ...], first: bool = False) -> tuple[Any, ...]:
    """`batch` with the first entry of its last floating array set to NaN (NaN loss, NaN
    gradient); with `first`, of its first floating array (the inputs, or the quadratic's
    matrix: a NaN curvature too, where the targets alone may leave it finite)."""
    floating = [j for j, b in enumerate(batch) if jnp.issubdtype(jnp.result_type(b), jnp.floating)]
    i = floating[0] if first else floating[-1]
    bad = batch[i].reshape(-1).at[0].set(jnp.nan).reshape(batch[i].shape)
    return (*batch[:i], bad, *batch[i + 1 :])


def resolve_hparams(hparams: dict[str, Any], steps: int | None = None) -> dict[str, Any]:
    """Turn ``("cosine", peak)`` learning rates into optax schedules over `steps`."""
    out = dict(hparams)
    for k, v in hparams.items():
        if isinstance(v, tuple) and v and v[0] == "cosine":
            if steps is None:
                raise ValueError(f"{k}={v!r} needs the number of steps.")
            out[k] = optax.cosine_decay_schedule(v[1], steps)
    return out


def make_optimizer(name: str, **overrides: Any) -> optax.GradientTransformationExtraArgs:
    """The registry's optimizer `name` with its row's generic arguments (and overrides)."""
    return registry.get(name).factory(**{**CASES[name].generic, **overrides})


def step_key(step: jax.Array | int) -> jax.Array:
    return jax.random.fold_in(BASE_KEY, step)


def train_step(
    opt: optax.GradientTransformation,
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    opt_state: optax.OptState,
    step: jax.Array | int,
    batch: tuple[Any, ...],
) -> tuple[jax.Array, PyTree, optax.OptState, optax.Updates]:
    """THE training step of the shared checks: ``(loss, new_params, new_state, updates)``."""
    value, updates, opt_state = jaxopt2.value_and_update(
        opt, loss_fn, params, opt_state, *batch, key=step_key(step)
    )
    return value, optax.apply_updates(params, updates), opt_state, updates


def run_scan(
    opt: optax.GradientTransformation, problem: zoo.Problem, steps: int
) -> tuple[jax.Array, jax.Array, PyTree, optax.OptState]:
    """`steps` of :func:`train_step` inside one jitted ``lax.scan``.

    Returns ``(final_loss, losses_along_the_way, final_params, final_state)``.
    """

    @jax.jit
    def go(params, batch):
        def body(carry, i):
            params, state = carry
            value, params, state, _ = train_step(opt, problem.loss_fn, params, state, i, batch)
            return (params, state), value

        (params, state), values = jax.lax.scan(body, (params, opt.init(params)), jnp.arange(steps))
        return problem.loss_fn(params, *batch), values, params, state

    return go(problem.params, problem.batch)
