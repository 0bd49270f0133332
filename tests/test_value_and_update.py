"""``jaxopt2.value_and_update``: what it returns and what it passes to ``update``."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt2
from tests.optimizers import zoo

pytestmark = pytest.mark.timeout(120)


def _problem(dtype: Any = jnp.float32) -> zoo.Problem:
    return zoo.quadratic(dtype)


def _close(a: Any, b: Any, **kw: Any) -> None:
    chex.assert_trees_all_close(a, b, **kw)


def _recorder(log: dict[str, Any]) -> optax.GradientTransformationExtraArgs:
    """An update that records every extra argument it receives (call it outside jit)."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None, **extra):
        log.clear()
        log.update(extra, params=params, updates=updates)
        return jax.tree.map(jnp.negative, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def test_matches_update_by_hand():
    problem = _problem()
    opt = optax.adam(0.1)
    params = problem.params
    state = opt.init(params)
    value, updates, new_state = jaxopt2.value_and_update(
        opt, problem.loss_fn, params, state, *problem.batch
    )
    ref_value, grad = jax.value_and_grad(problem.loss_fn)(params, *problem.batch)
    ref_updates, ref_state = opt.update(grad, state, params)
    _close(value, ref_value, rtol=0, atol=0)
    _close(updates, ref_updates, rtol=0, atol=0)
    _close(new_state, ref_state, rtol=0, atol=0)
    assert value.dtype == jnp.float32


def test_passes_value_grad_value_fn_and_key():
    problem = _problem()
    log: dict[str, Any] = {}
    opt = _recorder(log)
    params = problem.params
    key = jax.random.PRNGKey(7)
    value, updates, _ = jaxopt2.value_and_update(
        opt, problem.loss_fn, params, opt.init(params), *problem.batch, key=key
    )
    assert set(log) == {"value", "grad", "value_fn", "key", "params", "updates"}
    ref_value, ref_grad = jax.value_and_grad(problem.loss_fn)(params, *problem.batch)
    _close(log["value"], ref_value, rtol=0, atol=0)
    _close(log["grad"], ref_grad, rtol=0, atol=0)
    _close(log["updates"], ref_grad, rtol=0, atol=0)  # the gradient is the update's input
    _close(log["params"], params, rtol=0, atol=0)
    assert log["key"] is key
    # value_fn is the loss on *this* batch, as a function of the parameters only.
    shifted = params + 1.0
    _close(log["value_fn"](shifted), problem.loss_fn(shifted, *problem.batch), rtol=1e-6)
    _close(value, ref_value, rtol=0, atol=0)
    _close(updates, -ref_grad, rtol=0, atol=0)

    # No key given: none is passed (optimizers fall back to the key in their state).
    jaxopt2.value_and_update(opt, problem.loss_fn, params, opt.init(params), *problem.batch)
    assert "key" not in log and {"value", "grad", "value_fn"} <= set(log)


def test_value_fn_closes_over_the_traced_batch_under_jit():
    problem = _problem()
    seen = []

    def update(updates, state, params=None, *, value_fn=None, **extra):
        seen.append(1)
        # Return the loss value_fn computes so the test can compare it outside.
        return jax.tree.map(lambda u: u * 0 + value_fn(params), updates), state

    opt = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    @jax.jit
    def step(params, batch):
        return jaxopt2.value_and_update(opt, problem.loss_fn, params, optax.EmptyState(), *batch)

    for scale in (1.0, 2.0):
        batch = (problem.batch[0] * scale, problem.batch[1])
        value, updates, _ = step(problem.params, batch)
        _close(updates[0], value, rtol=1e-6)
        _close(value, problem.loss_fn(problem.params, *batch), rtol=1e-6)
    assert len(seen) == 1


def test_plain_gradient_transformation():
    """A transformation whose update takes no extra args gets none (and still works)."""
    problem = _problem()
    inner = optax.sgd(0.01)

    def update(updates, state, params=None):  # no **extra: extra args would be a TypeError
        return inner.update(updates, state, params)

    plain = optax.GradientTransformation(inner.init, update)
    assert not isinstance(plain, optax.GradientTransformationExtraArgs)
    params = problem.params
    value, updates, _ = jaxopt2.value_and_update(
        plain,
        problem.loss_fn,
        params,
        plain.init(params),
        *problem.batch,
        key=jax.random.PRNGKey(0),
    )
    grad = jax.grad(problem.loss_fn)(params, *problem.batch)
    _close(updates, -0.01 * grad, rtol=1e-6)
    _close(value, problem.loss_fn(params, *problem.batch), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "steps", "rel_tol"),
    [
        # L-BFGS with the zoom line search: superlinear, to float64 round-off in 60 steps.
        pytest.param(lambda: optax.lbfgs(), 60, 1e-12, id="lbfgs-zoom"),
        # Gradient descent with Armijo backtracking from a step of 0.05 (> 2/L = 0.02): linear
        # convergence (relative gap ~1e-12 after 500 steps on this problem).
        pytest.param(
            lambda: optax.chain(
                optax.sgd(0.05),
                optax.scale_by_backtracking_linesearch(max_backtracking_steps=20),
            ),
            500,
            1e-8,
            id="sgd-backtracking",
        ),
    ],
)
def test_optax_linesearches(make, steps, rel_tol):
    """optax's line searches read value, grad and value_fn from the extra args."""
    problem = _problem(jnp.float64)
    opt = make()

    @jax.jit
    def run(params, batch):
        def body(carry, _):
            params, state = carry
            value, updates, state = jaxopt2.value_and_update(
                opt, problem.loss_fn, params, state, *batch
            )
            return (optax.apply_updates(params, updates), state), value

        (params, _), values = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
        return problem.loss_fn(params, *batch), values

    f_final, values = run(problem.params, problem.batch)
    gap = problem.rel_gap(float(f_final))
    assert np.all(np.diff(np.asarray(values)) <= 1e-12), "a line search step increased the loss"
    assert gap <= rel_tol, f"relative gap {gap:.3g} after {steps} steps"


# ------------------------------------------------------------------------------------------
# Through optax's wrappers.
# ------------------------------------------------------------------------------------------


def _uses_extras() -> optax.GradientTransformationExtraArgs:
    """An update that needs all four extra args and folds each into its output:
    ``grad · value_fn(params) / value + normal(key)`` (a missing one is an error, a wrong one
    a different update)."""

    def update(updates, state, params=None, *, value, grad, value_fn, key, **extra):
        scale = value_fn(params) / value
        noise = jax.random.normal(key, jnp.shape(params), jnp.result_type(params))
        return jax.tree.map(lambda g: g * scale + noise, grad), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


class _KwargsOnly:
    """Not an optax type at all: an object whose ``update`` takes ``**kwargs``."""

    def __init__(self, inner):
        self.inner = inner

    def init(self, params):
        return self.inner.init(params)

    def update(self, updates, state, params=None, **kwargs):
        return self.inner.update(updates, state, params, **kwargs)


def _named_only(inner) -> optax.GradientTransformation:
    """An ``update`` that names only value_fn and key: the others would be a TypeError."""

    def update(updates, state, params=None, *, value_fn=None, key=None):
        value = value_fn(params)
        return inner.update(
            updates, state, params, value=value, grad=updates, value_fn=value_fn, key=key
        )

    return optax.GradientTransformation(inner.init, update)


_WRAPPERS = {
    "MultiSteps": lambda t: optax.MultiSteps(t, every_k_schedule=1),
    "MultiSteps.gradient_transformation": lambda t: optax.MultiSteps(
        t, every_k_schedule=1
    ).gradient_transformation(),
    "chain": lambda t: optax.chain(optax.identity(), t),
    "masked": lambda t: optax.masked(t, True),
    "apply_if_finite": lambda t: optax.apply_if_finite(t, 3),
    "inject_hyperparams": lambda t: optax.inject_hyperparams(
        lambda learning_rate: optax.chain(t, optax.scale(learning_rate))
    )(1.0),
    "update(**kwargs)": _KwargsOnly,
    "update(*, value_fn, key)": _named_only,
}


@pytest.mark.parametrize("wrap", list(_WRAPPERS), ids=list(_WRAPPERS))
def test_extra_args_pass_through_optax_wrappers(wrap):
    problem = _problem()
    opt = _WRAPPERS[wrap](_uses_extras())
    params, key = problem.params, jax.random.PRNGKey(3)
    value, updates, _ = jax.jit(
        lambda p, s: jaxopt2.value_and_update(opt, problem.loss_fn, p, s, *problem.batch, key=key)
    )(params, opt.init(params))
    grad = jax.grad(problem.loss_fn)(params, *problem.batch)
    _close(updates, grad + jax.random.normal(key, params.shape, params.dtype), rtol=1e-5)
    _close(value, problem.loss_fn(params, *problem.batch), rtol=1e-6)


def test_kfac_through_multisteps_and_inject_hyperparams():
    """The two forms users write: MultiSteps around K-FAC (every_k=2: a zero update, then
    K-FAC's update on the mean gradient of the two mini-steps) and inject_hyperparams."""
    problem = zoo.linear_regression(jnp.float32)
    params, key = problem.params, jax.random.PRNGKey(0)
    step = lambda opt, s, batch: jaxopt2.value_and_update(
        opt, problem.loss_fn, params, s, *batch, key=key
    )[1:]
    inner = jaxopt2.kfac(0.05, momentum=0.9)
    ms = optax.MultiSteps(inner, every_k_schedule=2)
    u1, s = step(ms, ms.init(params), problem.batch)
    u2, s = step(ms, s, problem.batch)
    u_ref, _ = step(inner, inner.init(params), problem.batch)
    assert all(not jnp.any(u) for u in jax.tree.leaves(u1))
    _close(u2, u_ref, rtol=1e-5, atol=1e-7)

    injected = optax.inject_hyperparams(jaxopt2.kfac)(learning_rate=0.05, momentum=0.9)
    state = injected.init(params)
    u_inj, _ = step(injected, state, problem.batch)
    _close(u_inj, u_ref, rtol=1e-5, atol=1e-7)
    hyper = {**state.hyperparams, "learning_rate": jnp.asarray(0.1, jnp.float32)}
    u_inj2, _ = step(injected, state._replace(hyperparams=hyper), problem.batch)
    _close(u_inj2, jax.tree.map(lambda u: 2 * u, u_ref), rtol=1e-5, atol=1e-7)


def test_multisteps_inside_chain_drops_the_extra_args_and_says_how_to_fix_it():
    """optax's chain forwards extra args only to a GradientTransformationExtraArgs, which a
    nested MultiSteps is not: the error says what to do instead."""
    problem = zoo.linear_regression(jnp.float32)
    nested = optax.chain(optax.identity(), optax.MultiSteps(jaxopt2.kfac(), every_k_schedule=2))
    with pytest.raises(ValueError, match="put MultiSteps outermost"):
        jaxopt2.value_and_update(
            nested, problem.loss_fn, problem.params, nested.init(problem.params), *problem.batch
        )


@pytest.mark.parametrize("name", ["adam", "sophia", "hessian_free", "adahessian"])
def test_has_aux_returns_aux_and_the_same_step(name):
    """``has_aux=True``: ``((value, aux), updates, state)`` as jax.value_and_grad's
    convention; the updates and state equal the plain call's (value_fn returns the value
    alone to the optimizer), also under jit."""
    problem = _problem()
    opt = jaxopt2.registry.get(name).factory(learning_rate=0.1)
    state = opt.init(problem.params)

    def aux_fn(p, *batch):
        value = problem.loss_fn(p, *batch)
        return value, {"twice": 2 * value, "norm": jnp.sum(p**2)}

    key = jax.random.PRNGKey(0)
    value, updates, new_state = jaxopt2.value_and_update(
        opt, problem.loss_fn, problem.params, state, *problem.batch, key=key
    )
    step = jax.jit(
        lambda p, s, k: jaxopt2.value_and_update(
            opt, aux_fn, p, s, *problem.batch, key=k, has_aux=True
        )
    )
    (value_a, aux), updates_a, new_state_a = step(problem.params, state, key)
    np.testing.assert_allclose(value_a, value, rtol=1e-6)
    np.testing.assert_allclose(aux["twice"], 2 * value, rtol=1e-6)
    np.testing.assert_allclose(aux["norm"], jnp.sum(problem.params**2), rtol=1e-6)
    _close(updates_a, updates, rtol=1e-5, atol=1e-6)
    _close(new_state_a, new_state, rtol=1e-5, atol=1e-6)


def test_has_aux_needs_a_pair():
    problem = _problem()
    opt = optax.sgd(0.1)
    with pytest.raises(TypeError, match=r"value_and_update\(has_aux=True\).*pair"):
        jaxopt2.value_and_update(
            opt, problem.loss_fn, problem.params, opt.init(problem.params), *problem.batch,
            has_aux=True,
        )  # fmt: skip
