"""Shared pieces of the sharding tests: a small tagged MLP, its data, a step function, and a
driver that runs the same steps on one device and under a mesh.

The tests in this folder need 8 devices. On CPU that is
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax starts; the normal suite
(one device) runs this folder in a child process with that flag (``test_in_subprocess.py``).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxopt2
from jaxopt2.sharding import state_sharding

DEVICES = 8
needs_devices = pytest.mark.skipif(
    jax.device_count() < DEVICES,
    reason=f"needs {DEVICES} devices; the normal suite runs this folder in a subprocess "
    "(tests/distributed/test_in_subprocess.py)",
)

# Shapes chosen so that Shampoo's 8x8 blocks give 18 factors (padded to 24 over 8 devices)
# and K-FAC has three factors of one size (17 = 16 inputs + bias).
SHAPES = {"w1": (16, 24), "b1": (24,), "w2": (24, 16), "b2": (16,), "w3": (16, 8), "b3": (8,)}
BATCH = 64


def make_problem(seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {
        k: (jax.random.normal(jax.random.fold_in(keys[0], i), s, jnp.float32) / np.sqrt(s[0])
            if len(s) == 2 else jnp.zeros(s, jnp.float32))
        for i, (k, s) in enumerate(SHAPES.items())
    }  # fmt: skip
    x = jax.random.normal(keys[1], (BATCH, 16), jnp.float32)
    teacher = jax.random.normal(keys[2], (16, 8), jnp.float32) / 4.0
    y = jnp.tanh(x @ teacher) + 0.1 * jax.random.normal(keys[3], (BATCH, 8), jnp.float32)
    return params, x, y


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    h = jnp.tanh(h @ params["w2"] + params["b2"])
    out = h @ params["w3"] + params["b3"]
    out = jaxopt2.tag_loss("squared_error", out, y)
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def make_step(optimizer):
    def step(params, state, x, y, key):
        value, updates, state = jaxopt2.value_and_update(
            optimizer, loss_fn, params, state, x, y, key=key
        )
        return optax.apply_updates(params, updates), state, value

    return step


def train(optimizer, steps: int, mesh=None, param_spec: dict | None = None):
    """``steps`` jitted steps from the same start; under `mesh` the batch is split along its
    ``data`` axis, the parameters laid out by `param_spec` (replicated by default) and the
    state by :func:`jaxopt2.sharding.state_sharding`. Returns (params, state, losses, hlo)."""
    params, x, y = make_problem()
    step = make_step(optimizer)
    keys = [jax.random.fold_in(jax.random.PRNGKey(7), t) for t in range(steps)]
    if mesh is None:
        state = optimizer.init(params)
        fn = jax.jit(step)
        losses = []
        for key in keys:
            params, state, value = fn(params, state, x, y, key)
            losses.append(float(value))
        return params, state, losses, fn.lower(params, state, x, y, keys[0]).compile().as_text()
    with jax.set_mesh(mesh):
        spec = param_spec or {}
        pshard = {k: NamedSharding(mesh, spec.get(k, P())) for k in params}
        sshard = state_sharding(optimizer, params, pshard)
        params = jax.device_put(params, pshard)
        state = jax.jit(optimizer.init, out_shardings=sshard)(params)
        data = NamedSharding(mesh, P("data"))
        x, y = jax.device_put(x, data), jax.device_put(y, data)
        rep = NamedSharding(mesh, P())
        fn = jax.jit(step, out_shardings=(pshard, sshard, rep))
        hlo = fn.lower(params, state, x, y, keys[0]).compile().as_text()
        losses = []
        for key in keys:
            params, state, value = fn(params, state, x, y, key)
            losses.append(float(value))
        return params, state, losses, hlo


def max_relative_error(a: Any, b: Any) -> float:
    """Largest ``|a - b| / max|a|`` over the leaves (per leaf scale)."""
    errs = [
        float(
            np.max(np.abs(np.asarray(u) - np.asarray(v)))
            / max(np.max(np.abs(np.asarray(u))), 1e-30)
        )
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(errs)


def lapack_batches(hlo: str, target: str) -> list[tuple[int, ...]]:
    """Operand shapes of the LAPACK custom calls named `target` (e.g. ``syevd``) in HLO."""
    shapes = []
    for line in hlo.splitlines():
        if "custom-call(" in line and target in line and "custom_call_target" in line:
            m = re.search(r"=\s*\(?\s*[a-z0-9]+\[([0-9,]*)\]", line)
            if m:
                shapes.append(tuple(int(d) for d in m.group(1).split(",") if d))
    return shapes
