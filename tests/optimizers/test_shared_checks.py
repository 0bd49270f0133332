"""The optimizer contract, checked for EVERY registry entry.

Each check is parametrized over ``registry.names()``; settings come from the table in
``cases.py`` and problems from ``zoo.py``. All optimizers go through the one step function
``cases.train_step`` (``jaxopt2.value_and_update`` with a per-step key). Rows with a structural
path (Kronecker factors, layers, factored or orthogonalized matrices) run the generic checks
on ``zoo.matrix``, with refresh schedules that put the structural path in every check's steps.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt2.optimizers import registry
from tests.optimizers import cases, nonfinite, zoo
from tests.optimizers.cases import CASES, make_optimizer, train_step

pytestmark = pytest.mark.timeout(240)

NAMES = registry.names()


def _params(check: str) -> list[Any]:
    """Registry names as pytest params, with the table's explained xfails for `check`."""
    out = []
    for name in NAMES:
        reason = CASES[name].xfail.get(check) if name in CASES else None
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def _row(name: str) -> cases.Case:
    if name not in CASES:
        pytest.fail(
            f"optimizer {name!r} is registered but has no row in tests/optimizers/cases.py "
            "CASES: add one (generic hparams, a Zoo setting per zoo problem, bf16 overrides)."
        )
    return CASES[name]


def _signature(tree: Any) -> tuple[Any, list[tuple[tuple[int, ...], Any]]]:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(tuple(np.shape(x)), jnp.result_type(x)) for x in leaves]


def _assert_same_signature(a: Any, b: Any, what: str) -> None:
    (ta, la), (tb, lb) = _signature(a), _signature(b)
    assert ta == tb, f"{what}: pytree structure changed:\n  {ta}\n  {tb}"
    assert la == lb, f"{what}: leaf shapes/dtypes changed:\n  {la}\n  {lb}"


def _assert_tree_close(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-7, what: str = ""):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(
            np.asarray(x, np.float64),
            np.asarray(y, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=what,
        ),
        a,
        b,
    )


def _floating_leaves(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def _all_finite(tree: Any) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in _floating_leaves(tree))


def _nonzero(tree: Any) -> bool:
    return any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(tree))


def _problem(name: str, dtype: Any = jnp.float32) -> zoo.Problem:
    """The generic-check problem of `name`'s row (the quadratic, or its tagged counterpart)."""
    return _row(name).generic_problem(dtype)


def _grad_and_value_fn(problem: zoo.Problem, params: Any):
    value_fn = lambda p: problem.loss_fn(p, *problem.batch)
    return jax.grad(value_fn)(params), value_fn


# ------------------------------------------------------------------------------------------
# The table itself.
# ------------------------------------------------------------------------------------------


def test_every_registered_optimizer_has_a_row():
    missing = [n for n in NAMES if n not in CASES]
    assert not missing, (
        f"registered optimizers without test settings: {missing}. Add a row for each to CASES "
        "in tests/optimizers/cases.py (generic hparams, a Zoo setting per zoo problem, bf16 "
        "overrides if needed) so the shared checks run them."
    )
    stale = [n for n in CASES if n not in NAMES]
    assert not stale, f"rows in tests/optimizers/cases.py for unregistered optimizers: {stale}"
    for name, row in CASES.items():
        assert set(row.zoo) == set(row.problems), (
            f"{name}: its row must give settings for every zoo problem {sorted(row.problems)}, "
            f"got {sorted(row.zoo)}"
        )
        args = registry.get(name).arguments()
        hps = [row.hparams, row.bf16, row.inject or {}, row.matrix or {}]
        hps += [z.hparams for z in row.zoo.values()]
        if isinstance(row.nonfinite, dict):
            hps += list(row.nonfinite.values())
        for hp in hps:
            unknown = set(hp) - set(args)
            assert not unknown, f"{name}: {sorted(unknown)} are not arguments of its factory"


# ------------------------------------------------------------------------------------------
# Construction, init, state.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _params("init"))
def test_factory_and_init_under_eval_shape(name):
    _row(name)
    opt = make_optimizer(name)
    assert isinstance(opt, optax.GradientTransformationExtraArgs), type(opt)
    params = _problem(name).params
    shapes = jax.eval_shape(opt.init, params)
    state = opt.init(params)
    _assert_same_signature(shapes, state, f"{name}: eval_shape(init) vs init")
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        assert isinstance(leaf, jax.Array), (
            f"{name}: state{jax.tree_util.keystr(path)} is {type(leaf).__name__}, not an array"
        )


FINITE_STEPS = 20


@pytest.mark.parametrize("name", _params("jit_once"))
def test_jitted_steps_compile_once_keep_state_and_stay_finite(name):
    """One jitted step, called 20 times: traced once (a second step with new values of params,
    state, step and batch does not retrace), the state's structure, shapes and dtypes never
    change (nor do the updates' and params'), and every update, value, parameter and state
    leaf stays finite. (One compiled program serves the three checks.)"""
    _row(name)
    opt = make_optimizer(name)
    problem = _problem(name)
    traces = []

    @jax.jit
    def step(params, state, i, batch):
        traces.append(1)  # runs only while tracing
        return train_step(opt, problem.loss_fn, params, state, i, batch)

    params = problem.params
    state0 = state = opt.init(params)
    batch2 = tuple(1.5 * b for b in problem.batch)
    values = []
    for i in range(FINITE_STEPS):
        value, params, state, updates = step(
            params, state, jnp.asarray(i), (batch2 if i == 1 else problem.batch)
        )
        values.append(float(value))
        if i < 2:
            _assert_same_signature(state0, state, f"{name}: state after {i + 1} steps")
            _assert_same_signature(problem.params, updates, f"{name}: updates vs params")
            _assert_same_signature(problem.params, params, f"{name}: params after a step")
        assert _all_finite(updates), f"{name}: non-finite updates at step {i}"
    assert len(traces) == 1, f"{name}: the jitted step was traced {len(traces)} times"
    assert values[0] != values[1]
    assert np.all(np.isfinite(values)), f"{name}: non-finite values {values}"
    assert _all_finite(params), f"{name}: non-finite params"
    assert _all_finite(state), f"{name}: non-finite state"


@pytest.mark.parametrize("name", _params("extra_args"))
def test_extra_args_contract(name):
    """Unknown extra args are ignored; value_fn/key are honoured by entries that need them."""
    entry = registry.get(name)
    _row(name)
    opt = make_optimizer(name)
    problem = _problem(name)
    params = problem.params
    state = opt.init(params)
    grads, value_fn = _grad_and_value_fn(problem, params)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)

    u_ref, s_ref = opt.update(grads, state, params, value_fn=value_fn, key=k1)
    u_unk, s_unk = opt.update(
        grads, state, params, value_fn=value_fn, key=k1, not_an_argument=jnp.ones(3), flag=True
    )
    _assert_tree_close(u_ref, u_unk, rtol=0, atol=0, what=f"{name}: unknown extra args")
    _assert_tree_close(s_ref, s_unk, rtol=0, atol=0, what=f"{name}: unknown extra args")

    if entry.needs_value_fn:
        with pytest.raises((ValueError, TypeError), match="value_fn"):
            opt.update(grads, state, params, key=k1)
    else:
        # A plain optax loop (no extra args at all) must work unchanged.
        u_plain, _ = opt.update(grads, state, params)
        _assert_tree_close(u_ref, u_plain, rtol=0, atol=0, what=f"{name}: plain update")

    if entry.needs_key:
        key_leaves = [
            i
            for i, x in enumerate(jax.tree.leaves(state))
            if jnp.result_type(x) == jnp.uint32 or jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        ]
        assert key_leaves, f"{name}: needs_key but carries no fallback key in its state"
        # The same key gives the same update, another key another one (the key is read).
        u_same, _ = opt.update(grads, state, params, value_fn=value_fn, key=k1)
        _assert_tree_close(u_ref, u_same, rtol=0, atol=0, what=f"{name}: same key")
        u_other, _ = opt.update(grads, state, params, value_fn=value_fn, key=k2)
        assert not all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_other), strict=True)
        ), f"{name}: two different keys gave identical updates (is the key ignored?)"
        # Without a key the carried key is used and advanced.
        u_nokey, s_nokey = opt.update(grads, state, params, value_fn=value_fn)
        assert _all_finite(u_nokey)
        before = [jax.tree.leaves(state)[i] for i in key_leaves]
        after = [jax.tree.leaves(s_nokey)[i] for i in key_leaves]
        assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)), (
            f"{name}: an update without a key left the carried key unchanged"
        )
        _assert_same_signature(state, s_nokey, f"{name}: state after a keyless update")


# ------------------------------------------------------------------------------------------
# Composition with optax wrappers.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _params("chain"))
def test_inside_chain(name):
    _row(name)
    opt = make_optimizer(name)
    problem = _problem(name)
    inactive = optax.chain(optax.clip_by_global_norm(1e9), opt)
    active = optax.chain(optax.clip_by_global_norm(1.0), opt)

    @jax.jit
    def run(params, batch):
        def body(carry, i):
            p_plain, s_plain, p_inact, s_inact, p_act, s_act = carry
            _, p_plain, s_plain, u_plain = train_step(
                opt, problem.loss_fn, p_plain, s_plain, i, batch
            )
            _, p_inact, s_inact, u_inact = train_step(
                inactive, problem.loss_fn, p_inact, s_inact, i, batch
            )
            v_act, p_act, s_act, _ = train_step(active, problem.loss_fn, p_act, s_act, i, batch)
            return (p_plain, s_plain, p_inact, s_inact, p_act, s_act), (u_plain, u_inact, v_act)

        init = (
            params,
            opt.init(params),
            params,
            inactive.init(params),
            params,
            active.init(params),
        )
        return jax.lax.scan(body, init, jnp.arange(5))

    _, (u_plain, u_inact, v_act) = run(problem.params, problem.batch)
    _assert_tree_close(u_plain, u_inact, rtol=1e-5, atol=1e-6, what=f"{name}: chain(clip∞, opt)")
    assert bool(jnp.all(jnp.isfinite(v_act))) and float(v_act[-1]) < float(v_act[0]), (
        f"{name}: chain(clip_by_global_norm(1), opt) did not reduce the loss: {v_act}"
    )


@pytest.mark.parametrize("name", _params("inject_hyperparams"))
def test_inject_hyperparams(name):
    """``optax.inject_hyperparams(factory)(**numbers)`` as users write it (no static_args):
    every number is injected as a traced array, the structural defaults stay out of the
    state, and changing the learning rate in the state changes the update exactly as
    building the optimizer with it would. (Structural arguments given explicitly go through
    jaxopt2.inject_hyperparams: test_hyperparams.py.)"""
    entry = registry.get(name)
    row = _row(name)
    # the user's form: the row's numbers (the matrix problem's overrides too) without the
    # structural arguments, which optax would turn into arrays
    given = {**row.inject, **(row.matrix or {})} if row.inject else row.generic
    hparams = {k: v for k, v in given.items() if k not in entry.static_args}
    lr = hparams["learning_rate"]
    # optax's own factories keep optax's signatures, whose numeric structural defaults optax
    # would inject (adafactor's min_dim_size_to_factor): users of those pass static_args
    own = entry.factory.__module__.startswith("jaxopt2.")
    static = {} if own else {"static_args": entry.static_args}
    injected = optax.inject_hyperparams(entry.factory, **static)(**hparams)
    problem = _problem(name)
    params = problem.params
    traces = []

    @jax.jit
    def step(state):
        traces.append(1)
        return train_step(injected, problem.loss_fn, params, state, 0, problem.batch)

    state0 = injected.init(params)
    assert "learning_rate" in state0.hyperparams
    if entry.factory.__module__.startswith("jaxopt2."):
        # jaxopt2's structural defaults stay out of the state. (optax's own factories keep
        # optax's signatures; a seed is a number jax.random.PRNGKey takes as an array too.)
        leaked = sorted((set(entry.static_args) - {"seed"}) & set(state0.hyperparams))
        assert not leaked, f"{name}: structural defaults injected as arrays: {leaked}"
    _, _, state1, u1 = step(state0)
    hyper2 = {**state0.hyperparams, "learning_rate": jnp.asarray(2 * lr, jnp.float32)}
    _, _, _, u2 = step(state0._replace(hyperparams=hyper2))
    assert len(traces) == 1, f"{name}: changing the injected learning rate retraced"
    _assert_same_signature(state0, state1, f"{name}: inject_hyperparams state")

    for lr_, u in ((lr, u1), (2 * lr, u2)):
        plain = registry.get(name).factory(**{**hparams, "learning_rate": lr_})
        # Jitted like the injected step (an eager step rounds CG's iterations differently).
        _, _, _, u_plain = jax.jit(
            lambda s, plain=plain: train_step(plain, problem.loss_fn, params, s, 0, problem.batch)
        )(plain.init(params))
        # atol: float32 rounding of ~0.1-sized terms that cancel to a small entry (SOAP's
        # rotation back into the parameter basis; measured up to 2e-6 between the injected and
        # the plain program); a wrong rate is off by the update itself, ~1e-2 here.
        _assert_tree_close(u, u_plain, rtol=1e-5, atol=1e-5, what=f"{name}: injected lr={lr_}")
    assert not all(
        np.allclose(a, b) for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True)
    )


@pytest.mark.parametrize("name", _params("multisteps"))
def test_multisteps(name):
    """every_k_schedule=2: a zero update, then the inner optimizer's update on the mean grad."""
    _row(name)
    opt = make_optimizer(name)
    # As users write it: jaxopt2.value_and_update passes the extra args to MultiSteps.update
    # (which forwards them), though MultiSteps is no GradientTransformationExtraArgs.
    tx = optax.MultiSteps(opt, every_k_schedule=2)
    problem = _problem(name)
    params = problem.params

    @jax.jit
    def run(params, batch):
        state = tx.init(params)
        # Same params, batch and step key twice: the accumulated mean gradient is the gradient.
        _, _, state, u_first = train_step(tx, problem.loss_fn, params, state, 0, batch)
        _, _, state, u_second = train_step(tx, problem.loss_fn, params, state, 0, batch)
        _, _, _, u_inner = train_step(opt, problem.loss_fn, params, opt.init(params), 0, batch)
        return u_first, u_second, u_inner, state

    u_first, u_second, u_inner, state = run(params, problem.batch)
    assert not _nonzero(u_first), f"{name}: MultiSteps emitted an update on mini-step 1"
    assert _nonzero(u_second), f"{name}: MultiSteps emitted nothing on mini-step 2"
    _assert_tree_close(u_second, u_inner, rtol=1e-5, atol=1e-7, what=f"{name}: MultiSteps")
    assert int(state.gradient_step) == 1 and int(state.mini_step) == 0


@pytest.mark.parametrize("name", _params("apply_if_finite"))
def test_apply_if_finite(name):
    """A NaN gradient is skipped (zero update, inner state kept, counted); then it recovers."""
    _row(name)
    opt = make_optimizer(name)
    tx = optax.apply_if_finite(opt, max_consecutive_errors=3)
    problem = _problem(name)
    params = problem.params
    nan_batch = cases.nan_batch(problem.batch)  # NaN loss, NaN gradient

    @jax.jit
    def run(params, good, bad):
        state0 = tx.init(params)
        v_bad, _, state1, u_bad = train_step(tx, problem.loss_fn, params, state0, 0, bad)
        _, _, state2, u_good = train_step(tx, problem.loss_fn, params, state1, 1, good)
        _, _, _, u_inner = train_step(opt, problem.loss_fn, params, opt.init(params), 1, good)
        return v_bad, u_bad, u_good, u_inner, state0, state1, state2

    v_bad, u_bad, u_good, u_inner, state0, state1, state2 = run(params, problem.batch, nan_batch)
    assert not bool(jnp.isfinite(v_bad))
    assert not _nonzero(u_bad) and _all_finite(u_bad), f"{name}: NaN step was not skipped"
    assert int(state1.notfinite_count) == 1 and int(state1.total_notfinite) == 1
    assert not bool(state1.last_finite)
    _assert_tree_close(
        state1.inner_state,
        state0.inner_state,
        rtol=0,
        atol=0,
        what=f"{name}: inner state touched by a skipped step",
    )
    assert int(state2.notfinite_count) == 0 and bool(state2.last_finite)
    _assert_tree_close(u_good, u_inner, rtol=1e-5, atol=1e-7, what=f"{name}: after recovery")


# ------------------------------------------------------------------------------------------
# The non-finite contract.
# ------------------------------------------------------------------------------------------


def _nonfinite_params() -> list[Any]:
    out = []
    for name in NAMES:
        modes = CASES[name].nonfinite if name in CASES else {"default": {}}
        for mode in ("optax",) if isinstance(modes, str) else modes:
            out.append(pytest.param(name, mode, id=f"{name}-{mode}"))
    return out


@pytest.mark.parametrize(("name", "mode"), _nonfinite_params())
def test_nonfinite_step_keeps_state(name, mode):
    """A step on a batch with a NaN target (NaN gradient, NaN loss in ``value_fn``) leaves
    every state leaf but the counters bitwise unchanged and is counted once. For entries with
    a curvature pass of their own, a step with a finite gradient but a ``value_fn`` on a batch
    with a NaN input (a NaN curvature) puts nothing non-finite into the state and is counted
    once. After either, the next good step is finite. Refreshes run on every step (the row's
    modes), so the bad steps meet them. Optax re-exports, which have no guard of their own,
    are checked inside ``optax.apply_if_finite``."""
    entry = registry.get(name)
    row = _row(name)
    wrapped = isinstance(row.nonfinite, str)  # an optax re-export: inside apply_if_finite
    if wrapped:
        inner = inspect.unwrap(entry.factory)  # the registry's argument check around it
        inner = getattr(inner, "func", inner)  # a functools.partial (optax.nadam)
        assert inner.__module__.split(".")[0] == "optax", (
            f"{name}: only optax's own optimizers may leave the non-finite guard to "
            f"apply_if_finite; {inner.__module__} is not optax"
        )
    opt = make_optimizer(name, **({} if wrapped else row.nonfinite[mode]))
    tx = optax.apply_if_finite(opt, max_consecutive_errors=5) if wrapped else opt
    problem = _problem(name)
    loss_fn, batch = problem.loss_fn, problem.batch
    bad = cases.nan_batch(batch)

    @jax.jit
    def run(params, batch, bad):
        _, _, s1, _ = train_step(tx, loss_fn, params, tx.init(params), 0, batch)
        _, _, s2, _ = train_step(tx, loss_fn, params, s1, 1, bad)
        _, _, s3, u3 = train_step(tx, loss_fn, params, s2, 2, batch)
        if not entry.needs_value_fn:
            return s1, s2, u3, s3, None
        # Finite gradient, non-finite curvature pass.
        grads = jax.grad(loss_fn)(params, *batch)
        bad_fn = lambda p: loss_fn(p, *cases.nan_batch(batch, first=True))
        _, s4 = tx.update(grads, s1, params, value_fn=bad_fn, key=cases.step_key(1))
        _, _, s5, u5 = train_step(tx, loss_fn, params, s4, 2, batch)
        return s1, s2, u3, s3, (s4, u5, s5)

    s1, s2, u3, s3, curvature = run(problem.params, batch, bad)
    if wrapped:
        changed = nonfinite.changed_leaves(s1.inner_state, s2.inner_state)
        grew = int(s2.total_notfinite) - int(s1.total_notfinite)
    else:
        changed, grew = nonfinite.changed_leaves(s1, s2), nonfinite.counted(s1, s2)
    assert not changed, f"{name} ({mode}): a NaN-gradient step changed the state at {changed}"
    assert grew == 1, f"{name} ({mode}): the NaN-gradient step was counted {grew} times"
    bad = nonfinite.poisoned(s1, s3)
    assert _all_finite(u3) and not bad, f"{name} ({mode}): non-finite after a good step: {bad}"
    if curvature is not None:
        s4, u5, s5 = curvature
        bad = nonfinite.poisoned(s1, s4)
        assert not bad, f"{name} ({mode}): a non-finite curvature pass reached the state: {bad}"
        assert nonfinite.counted(s1, s4) == 1, f"{name} ({mode}): non-finite curvature not counted"
        bad = nonfinite.poisoned(s1, s5)
        assert _all_finite(u5) and not bad, f"{name} ({mode}): non-finite after it: {bad}"


# ------------------------------------------------------------------------------------------
# bfloat16.
# ------------------------------------------------------------------------------------------

BF16_STEPS = 200
BF16_DECREASE = 0.1  # final loss <= 10% of the initial loss


@pytest.mark.parametrize("name", _params("bf16"))
def test_bfloat16_params(name):
    row = _row(name)
    opt = make_optimizer(name, **row.bf16)
    problem = _problem(name, jnp.bfloat16)
    params = problem.params
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}

    @jax.jit
    def run(params, batch):
        state = opt.init(params)
        _, params1, state1, updates1 = train_step(opt, problem.loss_fn, params, state, 0, batch)

        def body(carry, i):
            params, state = carry
            value, params, state, _ = train_step(opt, problem.loss_fn, params, state, i, batch)
            return (params, state), value

        (params, state), values = jax.lax.scan(body, (params, state), jnp.arange(BF16_STEPS))
        return params1, updates1, state, state1, params, values, problem.loss_fn(params, *batch)

    params1, updates1, state0, state1, final, values, f_final = run(params, problem.batch)
    for what, tree in (("updates", updates1), ("params after a step", params1), ("params", final)):
        dtypes = {jnp.result_type(x) for x in jax.tree.leaves(tree)}
        assert dtypes == {jnp.dtype(jnp.bfloat16)}, f"{name}: bf16 {what} became {dtypes}"
    _assert_same_signature(state0, state1, f"{name}: bf16 state")
    assert _all_finite(updates1) and _all_finite(final) and _all_finite(state0), name
    assert bool(jnp.all(jnp.isfinite(values)))
    f0 = float(values[0])
    assert float(f_final) <= BF16_DECREASE * f0, (
        f"{name}: bf16 loss went {f0:.4g} -> {float(f_final):.4g} in {BF16_STEPS} steps "
        f"(need <= {BF16_DECREASE} x start) with {row.hparams | row.bf16}"
    )


# ------------------------------------------------------------------------------------------
# Convergence on the zoo.
# ------------------------------------------------------------------------------------------


def _zoo_params() -> list[Any]:
    out = []
    for name in NAMES:
        for problem in CASES[name].problems if name in CASES else zoo.PROBLEMS:
            reason = CASES[name].xfail.get(f"zoo:{problem}") if name in CASES else None
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            out.append(pytest.param(name, problem, marks=marks, id=f"{name}-{problem}"))
    return out


@pytest.mark.parametrize(("name", "problem_name"), _zoo_params())
def test_converges_on_zoo(name, problem_name):
    row = _row(name)
    setting = row.zoo[problem_name]
    hparams = cases.resolve_hparams({**row.hparams, **setting.hparams}, setting.steps)
    opt = registry.get(name).factory(**hparams)
    problem = zoo.get(problem_name, jnp.float32)
    f_final, values, _, _ = cases.run_scan(opt, problem, setting.steps)
    tol = problem.rel_tol if setting.rel_tol is None else setting.rel_tol
    gap = problem.rel_gap(float(f_final))
    assert problem.converged(float(f_final), tol), (
        f"{name} on {problem_name} ({problem.description}): relative gap {gap:.3g} > {tol:g} "
        f"after {setting.steps} steps with {row.hparams | setting.hparams}; f0={problem.f0:.6g}, "
        f"f*={problem.f_star:.6g}, final={float(f_final):.6g}, at half-way "
        f"{problem.rel_gap(float(values[setting.steps // 2])):.3g}. {setting.note}"
    )
