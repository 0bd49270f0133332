"""`jaxopt2 spectrum`: known eigenvalues of the quadratic task, the dense Hessian of trained
parameters (a run's checkpoint, a sweep member), files written, short errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxopt2.cli import main
from jaxopt2.experiment.config import load_config
from jaxopt2.experiment.rundir import load_params, prepare_run_dir
from jaxopt2.experiment.setup import build_setup
from jaxopt2.experiment.spectrum import run_spectrum
from jaxopt2.experiment.sweep import sweep
from tests.experiment.helpers import assert_user_error

pytestmark = pytest.mark.timeout(180)

# The quadratic task's Hessian is A = Q diag(lambda) Q^T with lambda log-spaced from 1 down to
# 1/condition_number; with noise_std=0 the loss is exactly 0.5 (x - x*)^T A (x - x*).
DIM, COND = 24, 100.0
QUAD = [
    "task_quadratic",
    f"task.dim={DIM}",
    f"task.condition_number={COND}",
    "task.noise_std=0.0",
    "task.num_samples=64",
    "batch_size=16",
]
EXPECTED = np.logspace(0.0, -np.log10(COND), DIM)


def test_spectrum_of_initial_params_recovers_the_quadratic_eigenvalues(tmp_path, capsys):
    out = tmp_path / "spec"
    res = run_spectrum(
        QUAD[0],
        QUAD[1:],
        out=out,
        top_k=4,
        trace_probes=64,
        density_iters=DIM,
        density_probes=3,
    )
    assert res.trace_count == 1  # one jitted program
    data = json.loads((out / "spectrum.json").read_text())
    np.testing.assert_allclose(data["top_eigenvalues"], EXPECTED[:4], rtol=1e-4)
    assert data["params"] == "initial" and data["step"] == 0 and data["dtype"] == "float32"
    assert abs(data["trace"] - EXPECTED.sum()) < 5 * data["trace_stderr"] + 1e-4
    w = np.asarray(data["density_weights"])
    assert w.shape == (3, DIM)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-4)  # a probability measure
    nodes = np.asarray(data["density_nodes"])
    assert nodes.max() <= 1.0 + 1e-4 and nodes.min() >= EXPECTED[-1] - 1e-4
    assert len(data["density"]) == len(data["density_grid"]) and max(data["density"]) > 0
    assert (out / "spectrum.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "top-4 eigvals" in printed and "trace" in printed


def _params_row(path, like, member=None):
    """The parameters stored in a params.npz (row `member` of a sweep's stacked one), in
    float64, with the pytree structure of `like`."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), load_params(path, like, member))


def _dense_top(setup, params, batches, k):
    """The k largest eigenvalues of the dense float64 Hessian of the mean loss over
    `batches` (tuples of arrays) at `params`."""
    flat, unravel = ravel_pytree(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params))
    b64 = [
        tuple(jnp.asarray(a) if a.dtype.kind in "iub" else jnp.asarray(a, jnp.float64) for a in b)
        for b in batches
    ]

    def loss(v):
        return sum(setup.loss_fn(unravel(v), *b) for b in b64) / len(b64)

    return np.sort(np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(loss))(flat))))[::-1][:k]


DIGITS_RUN = [
    "model.hidden=[4]",
    "batch_size=32",
    "steps=20",
    "log_every=10",
    "optimizer.learning_rate=0.3",
]


def test_spectrum_of_a_run_checkpoint_via_the_cli(tmp_path, capsys):
    """The spectrum of a run directory is that of its checkpoint's parameters on the run's
    first batches: on the digits classifier, whose Hessian changes with the parameters, its
    top eigenvalues equal the dense float64 Hessian's at the run's params.npz on the same two
    batches, and those differ from the ones at the initial parameters (so analysing the wrong
    parameters would fail)."""
    run_dir = tmp_path / "run"
    assert main(["run", "task_digits_classifier", *DIGITS_RUN, "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    rc = main(
        [
            "spectrum",
            str(run_dir),
            "--top-k",
            "3",
            "--trace-probes",
            "8",
            "--density-iters",
            "10",
            "--density-probes",
            "2",
            "--batches",
            "2",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "step 20" in printed and "2 batches of 32 rows" in printed
    data = json.loads((run_dir / "spectrum.json").read_text())
    assert data["params"] == "checkpoint" and data["step"] == 20 and data["rows"] == 64
    assert (run_dir / "spectrum.png").stat().st_size > 0

    rcfg, _ = load_config("task_digits_classifier", DIGITS_RUN)
    setup = build_setup(rcfg)
    batches = [setup.batch(setup.train_data, jnp.asarray(s, jnp.int32)) for s in range(2)]
    trained = _dense_top(setup, _params_row(run_dir / "params.npz", setup.params), batches, 3)
    initial = _dense_top(setup, setup.params, batches, 3)
    assert np.max(np.abs(trained / initial - 1.0)) > 0.05  # the fixture tells them apart
    np.testing.assert_allclose(data["top_eigenvalues"], trained, rtol=1e-4)


def test_spectrum_user_errors_are_short(tmp_path, capsys):
    rc = main(["spectrum", str(tmp_path / "missing_run")])
    assert_user_error(capsys, rc, "missing_run", "not found")
    # a run dir (config.yaml) without any checkpoint
    rcfg, _ = load_config(QUAD[0], QUAD[1:])
    prepare_run_dir(tmp_path / "fresh", rcfg)
    rc = main(["spectrum", str(tmp_path / "fresh")])
    assert_user_error(capsys, rc, "fresh", "no (loadable) checkpoint")
    assert not (tmp_path / "fresh" / "checkpoints").exists()  # nothing created
    # a directory that is not a run
    (tmp_path / "plain").mkdir()
    rc = main(["spectrum", str(tmp_path / "plain")])
    assert_user_error(capsys, rc, "plain", "config.yaml")
    # overrides only apply to configs
    rc = main(["spectrum", str(tmp_path / "fresh"), "steps=3"])
    assert_user_error(capsys, rc, "steps=3")
    # bad option values (argparse)
    with pytest.raises(SystemExit) as e:
        main(["spectrum", QUAD[0], "--batches", "zero"])
    assert_user_error(capsys, e.value.code, "--batches")
    rc = main(["spectrum", *QUAD, "task.dim=2", "--out", str(tmp_path / "o")])
    assert_user_error(capsys, rc, "--top-k 5", "2")


def test_probe_groups_give_the_same_spectrum(tmp_path, capsys):
    """`--probe-batch` bounds memory without changing the numbers."""
    kw = dict(top_k=2, trace_probes=12, density_iters=8, density_probes=3, plot=False)
    run_spectrum(QUAD[0], QUAD[1:], out=tmp_path / "a", **kw)
    rc = main(
        [
            "spectrum",
            *QUAD,
            "--top-k",
            "2",
            "--trace-probes",
            "12",
            "--density-iters",
            "8",
            "--density-probes",
            "3",
            "--probe-batch",
            "5",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert rc == 0
    a = json.loads((tmp_path / "a" / "spectrum.json").read_text())
    b = json.loads((tmp_path / "b" / "spectrum.json").read_text())
    np.testing.assert_allclose(b["trace"], a["trace"], rtol=1e-5)
    np.testing.assert_allclose(b["density_weights"], a["density_weights"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b["top_eigenvalues"], a["top_eigenvalues"], rtol=1e-6)


def test_spectrum_of_a_sweep_member_matches_its_dense_hessian(tmp_path, capsys):
    """--member J reads member J's parameters from the sweep's stacked checkpoint: its top
    eigenvalues equal those of the dense float64 Hessian at that member's params.npz row (the
    two members trained at different learning rates, so slicing the wrong one would show)."""
    args = ["steps=20", "log_every=10", "model.hidden=[4]", "optimizer.learning_rate=0.01,0.3"]
    sweep("task_digits_classifier", args, tmp_path / "s", progress=False, stream=None)

    rc = main(["spectrum", str(tmp_path / "s")])
    assert_user_error(capsys, rc, "sweep of 2 members", "--member")
    rc = main(["spectrum", str(tmp_path / "s"), "--member", "2"])
    assert_user_error(capsys, rc, "--member", "0..1")
    rc = main(["spectrum", "task_quadratic", "--member", "0"])
    assert_user_error(capsys, rc, "--member", "not one")

    j = 1
    assert main(["spectrum", str(tmp_path / "s"), "--member", str(j), "--top-k", "3"]) == 0
    assert f"member {j}: learning_rate=0.3 seed=0" in capsys.readouterr().out
    data = json.loads((tmp_path / "s" / f"spectrum-member{j}" / "spectrum.json").read_text())
    assert data["member"] == j and data["step"] == 20

    member_rc, _ = load_config("task_digits_classifier", [*args[:3], "optimizer.learning_rate=0.3"])
    setup = build_setup(member_rc)
    params = _params_row(tmp_path / "s" / "params.npz", setup.params, member=j)
    top = _dense_top(setup, params, [setup.train_data], 3)
    np.testing.assert_allclose(data["top_eigenvalues"], top, rtol=1e-4)
