"""Sharded training matches one device, state follows the parameters' layout, and the
preconditioner refreshes are split across devices (8 simulated devices)."""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxopt2
from jaxopt2._sharding import partial_sums, splits, sum_partials
from jaxopt2.optimizers.kfac import leafwise
from jaxopt2.sharding import mesh_size, state_memory, state_sharding
from tests.distributed.common import (
    DEVICES,
    SHAPES,
    lapack_batches,
    make_problem,
    max_relative_error,
    needs_devices,
    train,
)

pytestmark = [needs_devices, pytest.mark.timeout(240)]
STEPS = 20

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "shampoo": lambda: jaxopt2.shampoo(1e-2, block_size=8, precondition_every=5),
    # eps well above float32 noise: Adam in the eigenbasis divides rotated gradient entries
    # that are ~1e-7 (round-off) by their own RMS, which turns round-off into +-1 steps; a
    # different reduction order (the sharded batch) then changes the step at O(lr).
    "soap": lambda: jaxopt2.soap(3e-3, block_size=8, precondition_every=5, eps=1e-3),
    "kfac": lambda: jaxopt2.kfac(invert_every=5),
    "hessian_free": lambda: jaxopt2.hessian_free(max_cg_iters=10),
}


def _mesh(shape=(DEVICES,), names=("data",), kind=AxisType.Explicit):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


# K-FAC runs on Auto mesh axes only (it refuses Explicit ones, tested below); the others are
# tested on jax.make_mesh's default, Explicit axes, and Shampoo on Auto axes too.
KIND = {"kfac": AxisType.Auto}


@pytest.fixture(scope="module")
def single_device():
    """20 steps of every optimizer on one device (the reference), computed once."""
    return {name: train(make(), STEPS) for name, make in OPTIMIZERS.items()}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_data_parallel_matches_one_device(name, single_device):
    params1, _, losses1, _ = single_device[name]
    mesh = _mesh(kind=KIND.get(name, AxisType.Explicit))
    params8, _, losses8, _ = train(OPTIMIZERS[name](), STEPS, mesh=mesh)
    assert losses1[-1] < 0.7 * losses1[0]  # the reference trains
    assert max_relative_error(params1, params8) <= 1e-4
    np.testing.assert_allclose(losses8, losses1, rtol=1e-4)


def _results(hlo: str, op: str) -> list[str]:
    """Result shapes of the `op` collectives in compiled HLO (``f32[16,8,8]``, ...; every
    element of a tuple result)."""
    found = []
    for m in re.finditer(rf"= (.*?) {op}(?:-start)?\(", hlo):
        found += re.findall(r"[a-z]+[0-9]*\[[0-9,]*\]", m.group(1))
    return sorted(found)


def _gathers(hlo: str) -> list[str]:
    return _results(hlo, "all-gather")


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_blocks_are_owned_refreshed_and_applied_per_device(name, single_device):
    _, state1, _, hlo1 = single_device[name]
    _, state8, _, hlo8 = train(OPTIMIZERS[name](), STEPS, mesh=_mesh())
    field = "roots" if name == "shampoo" else "bases"
    one, eight = getattr(state1[0], field), getattr(state8[0], field)
    # 8x8 blocks: w1 6, w2 6, w3 2 = one group of 14 blocks, a left and a right factor each
    ((left1, right1),) = one
    ((left8, right8),) = eight
    assert left1.shape == right1.shape == (14, 8, 8)
    for stack8, stack1 in ((left8, left1), (right8, right1)):
        assert stack8.shape == (16, 8, 8)  # padded to a multiple of 8 devices
        assert stack8.sharding.spec == P(("data",))
        assert {s.data.shape for s in stack8.addressable_shards} == {(2, 8, 8)}
        # float32: each block the same to float32 noise relative to its own scale
        a, b = np.asarray(stack8)[:14], np.asarray(stack1)
        diff = np.abs(a - b).max(axis=(1, 2))
        assert np.all(diff <= 2e-5 * np.abs(b).max(axis=(1, 2))), diff
        # the padding rows are decompositions of identities: finite
        assert np.all(np.isfinite(np.asarray(stack8)[14:]))
    # the statistics are split the same way: each device holds its blocks' factors
    for stats in jax.tree.leaves(state8[0].stats):
        assert stats.sharding.spec == P(("data",)) and stats.shape == (16, 8, 8)
    failed = "num_failed_roots" if name == "shampoo" else "num_failed_refreshes"
    assert int(getattr(state8[0], failed)) == 0
    # the refresh's batched eigh: all 28 factors on one device; on 8, each device's own 2 left
    # and 2 right factors
    assert lapack_batches(hlo1, "syevd") == [(28, 8, 8)]
    assert lapack_batches(hlo8, "syevd") == [(4, 8, 8)]
    # owner-computes: the only gather of the step is the preconditioned blocks (16 x 8 x 8,
    # parameter-sized); the roots/bases (2 x 16 x 8 x 8) never travel
    assert _gathers(hlo1) == []
    assert _gathers(hlo8) == ["f32[16,8,8]"]


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_a_group_smaller_than_the_mesh_is_kept_whole(name):
    # "a": 8 blocks of 8x8 (one per device: owned); "b": one 8x3 block (kept on every device)
    rng = np.random.default_rng(0)
    shapes = {"a": (64, 8), "b": (8, 3)}
    params = {k: jnp.zeros(v) for k, v in shapes.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(v), jnp.float32) for k, v in shapes.items()}
             for _ in range(3)]  # fmt: skip
    # well-conditioned on purpose (a single random gradient's factor is not): float32 noise
    # stays at 1e-6, so a mixed-up block or root shows
    if name == "shampoo":
        opt = jaxopt2.scale_by_shampoo(block_size=8, precondition_every=1, damping=1e-2,
                                       start_preconditioning_step=0)  # fmt: skip
    else:  # one-sided: a's left (a tie) and b's right side, both full rank
        opt = jaxopt2.scale_by_soap(block_size=8, precondition_every=1, eps=1e-2, one_sided=True)

    def run(mesh):
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            if mesh is None:
                state, step = opt.init(params), jax.jit(opt.update)
            else:
                rep = NamedSharding(mesh, P())
                layout = state_sharding(opt, params, rep)
                state = jax.jit(opt.init, out_shardings=layout)(params)
                step = jax.jit(opt.update, out_shardings=(rep, layout))
            hlo = step.lower(grads[0], state, params).compile().as_text()
            updates = []
            for g in grads:
                u, state = step(g, state, params)
                updates.append(u)
        return updates, state, hlo

    one, _, _ = run(None)
    eight, state, hlo = run(_mesh())
    # SOAP divides by sqrt(v) + eps in the rotated basis, which amplifies the float32
    # differences of a per-device eigh (one block) and the whole-stack one: measured 4.2e-5
    # (jax 0.10.2, scipy's OpenBLAS); a mixed-up block or basis is off by O(1)
    tol = 1e-5 if name == "shampoo" else 2e-4
    for u1, u8 in zip(one, eight, strict=True):
        assert max_relative_error(u1, u8) <= tol
    field = state.roots if name == "shampoo" else state.bases
    (a_left, a_right), (b_left, b_right) = field
    assert a_left.shape == (8, 8, 8) and a_left.sharding.spec == P(("data",))
    assert b_right.shape == (1, 3, 3) and b_right.sharding.spec == P()
    if name == "shampoo":
        assert a_right.shape == (8, 8, 8) and a_right.sharding.spec == P(("data",))
        assert b_left.shape == (1, 8, 8) and b_left.sharding.spec == P()
    else:
        assert a_right is None and b_left is None
    # one eigh per device: its own factors of "a" (one per side) and the whole of "b"
    assert lapack_batches(hlo, "syevd") == [(4 if name == "shampoo" else 2, 8, 8)]
    # only the owned group's preconditioned blocks travel
    assert _gathers(hlo) == ["f32[8,8,8]"]


def _deep_kfac(ekfac: bool, mesh=None, steps: int = 4):
    """`steps` K-FAC steps (refresh every step) on a tanh MLP 16 -> 8 x (8 hidden 8 x 8) -> 16:
    the hidden layers' factors form one group of 8 rows (one per device: owned); the input
    layer (16, 8) and the output layer (8, 16) share a group of sizes (17, 9), the second
    flipped, 2 rows (kept whole on every device)."""
    rng = np.random.default_rng(1)
    shapes = {"w_in": (16, 8), "w_out": (8, 16)} | {f"h{i}": (8, 8) for i in range(8)}
    params = {k: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), jnp.float32)
              for k, s in shapes.items()}  # fmt: skip
    params |= {f"c{i}": jnp.zeros(8, jnp.float32) for i in range(8)}
    x = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    y = jnp.asarray(np.tanh(rng.standard_normal((32, 16))), jnp.float32)

    def loss(p, x, y):
        h = jnp.tanh(x @ p["w_in"])
        for i in range(8):
            h = jnp.tanh(h @ p[f"h{i}"] + p[f"c{i}"])
        out = jaxopt2.tag_loss("squared_error", h @ p["w_out"], y)
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

    opt = jaxopt2.kfac(1e-1, invert_every=1, ekfac=ekfac, damping=1e-2)

    def step(p, state, x, y):
        _, updates, state = jaxopt2.value_and_update(opt, loss, p, state, x, y)
        return optax.apply_updates(p, updates), state

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        if mesh is None:
            state, fn = opt.init(params), jax.jit(step)
        else:
            rep = NamedSharding(mesh, P())
            layout = state_sharding(opt, params, rep)
            state = jax.jit(opt.init, out_shardings=layout)(params)
            data = NamedSharding(mesh, P("data"))
            x, y = jax.device_put(x, data), jax.device_put(y, data)
            fn = jax.jit(step, out_shardings=(rep, layout))
        hlo = fn.lower(params, state, x, y).compile().as_text()
        for _ in range(steps):
            params, state = fn(params, state, x, y)
    return params, state, hlo


@pytest.mark.parametrize("ekfac", [False, True], ids=["kfac", "ekfac"])
def test_kfac_factors_are_owned_inverted_and_applied_per_device(ekfac):
    params1, state1, hlo1 = _deep_kfac(ekfac)
    params8, state8, hlo8 = _deep_kfac(ekfac, _mesh(kind=AxisType.Auto))
    assert max_relative_error(params1, params8) <= 1e-4
    inner1, inner8 = state1[0], state8[0]
    assert int(inner8.num_failed_inverses) == 0 == int(inner1.num_failed_inverses)
    # groups in leaf order (dict keys sorted: c*, h*, w_in, w_out): the hidden layers first
    (hidden8, small8) = inner8.factors
    # the hidden layers' group: 8 rows split one per device, for factors and inverses alike
    for stack in (*hidden8, *inner8.inverses[0]):
        assert stack.shape == (8, 9, 9) and stack.sharding.spec == P(("data",))
        assert {s.data.shape for s in stack.addressable_shards} == {(1, 9, 9)}
    for stack in (*small8, *inner8.inverses[1]):  # kept whole on every device
        assert stack.sharding.spec == P()
    assert [s.shape for s in small8] == [(2, 17, 17), (2, 9, 9)]
    # each row the same factor as on one device (float32 noise relative to its scale)
    for a, b in zip(jax.tree.leaves(inner8.factors), jax.tree.leaves(inner1.factors),
                    strict=True):  # fmt: skip
        a, b = np.asarray(a), np.asarray(b)
        # measured up to 1.3e-5 with XLA's optimizations off (the suite's setting)
        assert np.all(np.abs(a - b).max(axis=(1, 2)) <= 5e-5 * np.abs(b).max(axis=(1, 2)))
    # the flipped output layer: its A (inputs + 1 = 9) sits on side 1, its G (16) on side 0
    w_out = leafwise(inner8, params8).factors
    leaf = sorted(params8).index("w_out")
    assert [f.shape for f in w_out[leaf]] == [(9, 9), (17, 17)]
    if ekfac:
        return
    # one batched Cholesky per size, one after the other: on one device all 18 factors of
    # size 9 and the 2 of size 17; on 8, each device its own hidden layer's two factors and
    # the whole small group
    assert sorted(lapack_batches(hlo1, "potrf")) == [(2, 17, 17), (18, 9, 9)]
    assert sorted(lapack_batches(hlo8, "potrf")) == [(2, 17, 17), (4, 9, 9)]
    # owner-computes: the one gather of the step is the hidden layers' preconditioned
    # gradients (parameter-sized); factors and inverses never travel
    assert _gathers(hlo1) == []
    assert _gathers(hlo8) == ["f32[8,9,9]"]
    # the hidden layers' statistics are reduce-scattered to their owners (each device
    # receives its layer's A and G, one row each), never all-reduced whole; the small
    # group's, kept whole, are all-reduced
    assert _results(hlo1, "reduce-scatter") == []
    assert _results(hlo8, "reduce-scatter") == ["f32[1,9,9]", "f32[1,9,9]"]
    reduced = _results(hlo8, "all-reduce")
    assert "f32[8,9,9]" not in reduced
    assert {"f32[2,17,17]", "f32[2,9,9]"} <= set(reduced)


def test_kfac_with_a_matrix_no_layer_uses_matches_one_device():
    # "e" is rank 2, so it gets a factor group of its own, but no layer uses it (a penalty
    # term): its group has no statistics to sum over the devices
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((16, 8)) / 4, jnp.float32),
              "e": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)}  # fmt: skip
    x = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)

    def loss(p, x, y):
        out = jaxopt2.tag_loss("squared_error", x @ p["w"], y)
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1)) + 0.01 * jnp.sum(p["e"] ** 2)

    opt = jaxopt2.kfac(1e-1, invert_every=1)

    def run(mesh):
        def step(p, state):
            _, updates, state = jaxopt2.value_and_update(opt, loss, p, state, x, y)
            return optax.apply_updates(p, updates), state

        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            p, state, fn = params, opt.init(params), jax.jit(step)
            for _ in range(3):
                p, state = fn(p, state)
        return p

    one, eight = run(None), run(_mesh(kind=AxisType.Auto))
    assert max_relative_error(one, eight) <= 1e-4
    for k in params:  # it trained: each leaf moved (the max over the leaves hid a frozen one)
        assert max_relative_error(params[k], one[k]) > 1e-3, k


def test_shampoo_on_auto_axes_matches_too(single_device):
    params1, *_ = single_device["shampoo"]
    params8, _, _, hlo = train(OPTIMIZERS["shampoo"](), STEPS, mesh=_mesh(kind=AxisType.Auto))
    assert max_relative_error(params1, params8) <= 1e-4
    assert lapack_batches(hlo, "syevd") == [(4, 8, 8)]


def test_kfac_refuses_explicit_axes_by_name():
    with pytest.raises(ValueError, match="kfac runs under a device mesh with Auto axes only"):
        train(OPTIMIZERS["kfac"](), 1, mesh=_mesh(kind=AxisType.Explicit))


FSDP = {"w1": P(None, "model"), "b1": P("model"), "w2": P(None, "model"), "b2": P("model"),
        "w3": P("model", None), "b3": P(None)}  # fmt: skip


@pytest.mark.parametrize("name", ["adam", "shampoo", "soap"])
def test_parameter_sharded_state_follows_parameters(name, single_device):
    # Auto axes: with Explicit ones the model's own products over a sharded contracting
    # dimension would need out_sharding annotations (jax's rule, not the optimizer's)
    mesh = _mesh((4, 2), ("data", "model"), kind=AxisType.Auto)
    params1, *_ = single_device[name]
    params8, state8, _, _ = train(OPTIMIZERS[name](), STEPS, mesh=mesh, param_spec=FSDP)
    assert max_relative_error(params1, params8) <= 1e-4
    moments = dict(state8[0].mu)
    if name == "soap":  # the second moment of the leaves SOAP does not block (the biases)
        nu = {k: v for k, v in zip(sorted(SHAPES), state8[0].nu[1], strict=True) if v is not None}
        assert list(nu) == ["b1", "b2", "b3"]
        moments.update({f"nu_{k}": v for k, v in nu.items()})
    for k, moment in moments.items():
        leaf = k.removeprefix("nu_")
        spec = FSDP[leaf]
        assert params8[leaf].sharding.spec == spec
        assert moment.sharding.spec == spec, k
        shard = {s.data.shape for s in moment.addressable_shards}
        assert shard == {NamedSharding(mesh, spec).shard_shape(SHAPES[leaf])}, k


@pytest.mark.parametrize("layers", [8, 3], ids=["owned", "whole"])
def test_partial_sums_reduce_to_the_owners(layers):
    # 13 rows (padded to 16 over 8 devices) of `layers` stacked Gram matrices: the sum over
    # the devices' partial sums is each layer's aᵀa, split over the devices when the stack is
    # owned (8 layers: one per device) and whole on every device otherwise (3 would pad to 8)
    a = jax.random.normal(jax.random.PRNGKey(0), (layers, 13, 5))
    expected = np.einsum("lri,lrj->lij", np.asarray(a, np.float64), np.asarray(a, np.float64))
    gram = lambda rows: jnp.einsum("lri,lrj->lij", rows, rows)  # rows [13, layers, 5]

    @jax.jit
    def reduce(a):
        partial = partial_sums(lambda r: gram(jnp.swapaxes(r, 0, 1)), jnp.swapaxes(a, 0, 1))
        assert partial.shape == (mesh_size(), layers, 5, 5)  # one partial sum per device
        return sum_partials(partial, split=splits(layers))

    with jax.set_mesh(_mesh(kind=AxisType.Auto)):
        out = reduce(a)
    spec, shard = (P(("data",)), (1, 5, 5)) if layers == 8 else (P(), (3, 5, 5))
    assert out.sharding.spec == spec
    assert {s.data.shape for s in out.addressable_shards} == {shard}
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(reduce(a)), expected, rtol=1e-5, atol=1e-5)  # no mesh


def test_state_sharding_layout():
    mesh = _mesh((4, 2), ("data", "model"))
    params, _, _ = make_problem()
    pshard = {k: NamedSharding(mesh, FSDP[k]) for k in params}
    opt = jaxopt2.shampoo(1e-2, block_size=8, precondition_every=5)
    layout = state_sharding(opt, params, pshard)
    inner = layout[0]
    assert inner.mu == pshard and inner.graft_nu == pshard
    rows = P(("data", "model"))  # per-block stacks: split along their rows over all 8
    assert [s.spec for s in jax.tree.leaves(inner.roots)] == [rows, rows]
    assert [s.spec for s in jax.tree.leaves(inner.stats)] == [rows, rows]
    assert inner.count.spec == P() and inner.num_failed_roots.spec == P()
    # SOAP: the blocks' second moments are split too, the unblocked leaves' (the biases) follow
    # their parameters
    soap = state_sharding(jaxopt2.soap(1e-3, block_size=8), params, pshard)[0]
    assert [s.spec for s in jax.tree.leaves(soap.bases)] == [rows, rows]
    nu_blocks, nu_leaves = soap.nu
    assert [s.spec for s in nu_blocks] == [rows]
    assert [s.spec for s in nu_leaves if s is not None] == [FSDP["b1"], FSDP["b2"], FSDP["b3"]]
    assert [s is None for s in nu_leaves] == [False] * 3 + [True] * 3  # b1..b3, then w1..w3
    # an optax chain: adam's moments take the parameters' shardings, its count is replicated
    adam = state_sharding(optax.adam(1e-3), params, pshard)
    assert adam[0].mu == pshard and adam[0].nu == pshard and adam[0].count.spec == P()


def test_state_memory_matches_the_allocated_shards():
    mesh = _mesh((4, 2), ("data", "model"))
    params, _, _ = make_problem()
    pshard = {k: NamedSharding(mesh, FSDP[k]) for k in params}
    for opt in (optax.adam(1e-3), jaxopt2.shampoo(1e-2, block_size=8), jaxopt2.kfac()):
        with jax.set_mesh(mesh):
            state = jax.jit(opt.init, out_shardings=state_sharding(opt, params, pshard))(params)
        device = mesh.devices.flat[0]
        on_device = sum(
            s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards
            if s.device == device
        )  # fmt: skip
        shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
        assert state_memory(opt, shapes, pshard) == on_device
        abstract = jax.tree.leaves(jax.eval_shape(opt.init, params))
        total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in abstract)
        assert state_memory(opt, shapes) == total
        assert on_device < total
