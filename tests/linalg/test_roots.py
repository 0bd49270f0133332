"""Inverse matrix p-th roots against float64 eigendecomposition references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt2.linalg import matrix_inverse_root

pytestmark = pytest.mark.timeout(120)


def _spd(seed, n, eigenvalues):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (q * eigenvalues) @ q.T
    return 0.5 * (a + a.T)


def _reference(a, p, damping):
    """(a + damping·λmax·I)^(-1/p) in float64 from numpy's eigh."""
    w, v = np.linalg.eigh(np.asarray(a, np.float64))
    w = np.maximum(w, 0.0) + damping * w.max()
    return (v * w ** (-1.0 / p)) @ v.T


def _rel(x, ref):
    x = np.asarray(x, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_matches_float64_reference(method, p):
    a = np.stack([_spd(s, 12, np.geomspace(0.1, 30.0, 12)) for s in range(3)])
    root, ok = matrix_inverse_root(jnp.asarray(a), p, method=method, damping=1e-3)
    assert root.shape == a.shape and ok.shape == (3,)
    assert bool(jnp.all(ok))
    for i in range(3):
        assert _rel(root[i], _reference(a[i], p, 1e-3)) < 1e-10
    # The root really is the inverse p-th root: root^p · (a + λI) = I.
    damped = a[0] + 1e-3 * np.linalg.eigvalsh(a[0]).max() * np.eye(12)
    np.testing.assert_allclose(
        np.linalg.matrix_power(np.asarray(root[0]), p) @ damped, np.eye(12), atol=1e-9
    )


def test_eigh_takes_any_exponent_in_unit_interval():
    a = _spd(3, 10, np.geomspace(0.5, 8.0, 10))
    for p in (1.0, 2.5, 7.0):
        root, ok = matrix_inverse_root(jnp.asarray(a), p, damping=0.0)
        assert bool(ok)
        assert _rel(root, _reference(a, p, 0.0)) < 1e-12


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_condition_1e8_float64_within_1e4_of_damped_reference(method):
    a = _spd(5, 48, np.geomspace(1.0, 1e-8, 48))
    ref = _reference(a, 4, 1e-6)
    root, ok = matrix_inverse_root(jnp.asarray(a), 4, method=method, damping=1e-6)
    assert bool(ok)
    assert _rel(root, ref) < 1e-4
    # The damping is what the reference measures: the undamped root is far away.
    assert _rel(_reference(a, 4, 0.0), ref) > 0.5


@pytest.mark.parametrize(
    ("method", "tol_1e6", "tol_1e4"),
    # float32 limits, measured: at condition 1e8 a float32 eigh has backward error
    # ~n·eps·λmax ≈ 6e-7·λmax, comparable to a 1e-6 damping, so the roots of the damped small
    # eigenvalues are off by a few percent; coupled Newton is ~10x more accurate there.
    [("eigh", 5e-2, 2e-3), ("newton", 1e-2, 2e-4)],
)
def test_condition_1e8_float32_stays_finite_with_damping(method, tol_1e6, tol_1e4):
    a = _spd(5, 48, np.geomspace(1.0, 1e-8, 48)).astype(np.float32)
    for damping, tol in ((1e-6, tol_1e6), (1e-4, tol_1e4)):
        root, ok = matrix_inverse_root(jnp.asarray(a), 4, method=method, damping=damping)
        assert root.dtype == jnp.float32
        assert bool(ok) and bool(jnp.all(jnp.isfinite(root)))
        assert _rel(root, _reference(a, 4, damping)) < tol, (method, damping)


def test_eigh_and_newton_agree_float32():
    a = np.stack([_spd(s, 32, np.geomspace(1e-3, 1.0, 32)) for s in range(4)]).astype(np.float32)
    r_eigh, ok_e = matrix_inverse_root(jnp.asarray(a), 4, damping=1e-4)
    r_newton, ok_n = matrix_inverse_root(jnp.asarray(a), 4, method="newton", damping=1e-4)
    assert bool(jnp.all(ok_e)) and bool(jnp.all(ok_n))
    for i in range(4):
        assert _rel(r_newton[i], np.asarray(r_eigh[i], np.float64)) < 1e-4


def test_batch_axes_equal_one_by_one_and_relative_damping_is_scale_free():
    a = np.stack([_spd(s, 8, np.geomspace(0.01, 3.0, 8)) for s in range(6)]).reshape(2, 3, 8, 8)
    root, ok = matrix_inverse_root(jnp.asarray(a), 2, method="newton", damping=1e-5)
    assert root.shape == (2, 3, 8, 8) and ok.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            one, _ = matrix_inverse_root(jnp.asarray(a[i, j]), 2, method="newton", damping=1e-5)
            np.testing.assert_allclose(root[i, j], one, rtol=1e-10, atol=1e-12)
    # (c·A + ε·c·λmax I)^(-1/p) = c^(-1/p) (A + ε λmax I)^(-1/p)
    scaled, _ = matrix_inverse_root(jnp.asarray(1e4 * a), 2, damping=1e-5)
    base, _ = matrix_inverse_root(jnp.asarray(a), 2, damping=1e-5)
    np.testing.assert_allclose(np.asarray(scaled) * 1e2, base, rtol=1e-9)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_bad_matrices_are_flagged_per_member(method):
    good = _spd(1, 6, np.geomspace(0.1, 1.0, 6))
    nan = good.copy()
    nan[0, 1] = nan[1, 0] = np.nan
    stack = jnp.asarray(np.stack([good, np.zeros((6, 6)), nan, good]))
    root, ok = matrix_inverse_root(stack, 4, method=method)
    assert ok.tolist() == [True, False, False, True]
    assert bool(jnp.all(jnp.isfinite(root[0]))) and bool(jnp.all(jnp.isfinite(root[3])))


def test_newton_without_convergence_is_not_ok():
    a = _spd(2, 16, np.geomspace(1e-6, 1.0, 16))
    _, ok = matrix_inverse_root(jnp.asarray(a), 4, method="newton", damping=0.0, max_iters=3)
    assert not bool(ok)
    _, ok = matrix_inverse_root(jnp.asarray(a), 4, method="newton", damping=0.0)
    assert bool(ok)


def test_every_matmul_runs_at_highest_precision():
    a = jnp.asarray(_spd(0, 8, np.geomspace(0.1, 1.0, 8)), jnp.float32)
    for method in ("eigh", "newton"):
        jaxpr = jax.make_jaxpr(lambda m, method=method: matrix_inverse_root(m, 4, method=method))(a)
        dots = []

        def walk(jx, dots=dots):
            for eqn in jx.eqns:
                if eqn.primitive.name == "dot_general":
                    dots.append(eqn.params["precision"])
                for v in eqn.params.values():  # while/cond/pjit bodies
                    for sub in v if isinstance(v, tuple) else (v,):
                        inner = getattr(sub, "jaxpr", None)
                        if inner is not None:
                            walk(getattr(inner, "jaxpr", inner))

        walk(jaxpr.jaxpr)
        assert dots, method
        highest = jax.lax.Precision.HIGHEST
        assert all(d is not None and all(x == highest for x in d) for d in dots), (method, dots)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 0.5}, "p must be a number >= 1"),
        ({"p": 0}, "p must be a number >= 1"),
        ({"p": 2.5, "method": "newton"}, "p must be an integer for method='newton'"),
        ({"p": 2, "method": "qr"}, "method must be one of"),
        ({"p": 2, "damping": -1.0}, "damping must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        matrix_inverse_root(jnp.eye(3), **kwargs)


def test_non_square_is_refused():
    with pytest.raises(ValueError, match="needs square matrices"):
        matrix_inverse_root(jnp.ones((3, 4)), 2)
