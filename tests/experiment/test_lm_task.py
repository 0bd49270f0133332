"""The byte-level LM task: its file split, its model (against numpy), bits per byte, and a
tiny run through the runner that resumes exactly."""

from __future__ import annotations

import json
import math
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt2.experiment.config import load_config
from jaxopt2.experiment.errors import ConfigError
from jaxopt2.experiment.lm import (
    ByteTransformer,
    bits_per_byte,
    eval_windows,
    lm_eval_metrics,
    lm_loss,
    stdlib_corpus,
    stdlib_files,
    train_windows,
)
from jaxopt2.experiment.rundir import prepare_run_dir, read_metrics
from jaxopt2.experiment.setup import build_setup
from jaxopt2.experiment.trainer import Trainer
from tests.experiment.helpers import ROOT

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------------------- data


def _fake_stdlib(root):
    files = {
        "b.py": b"bbbb\n",
        "a.py": b"aa\n",
        "pkg/__init__.py": b"",
        "pkg/c.py": b"cccccc\n",
        "pkg/d.txt": b"not python\n",
        "pkg/tests/test_c.py": b"skip\n",
        "test/test_a.py": b"skip\n",
        "idlelib/idle_test/x.py": b"skip\n",
        "site-packages/numpy/__init__.py": b"skip\n",
        "_sysconfigdata__linux.py": b"skip\n",
        "z.py": b"zzz\n",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return str(root)


def test_files_are_sorted_and_skip_tests_and_packages(tmp_path):
    root = _fake_stdlib(tmp_path)
    assert stdlib_files(root) == ("a.py", "b.py", "pkg/__init__.py", "pkg/c.py", "z.py")


def test_split_is_by_file_every_kth_in_sorted_order(tmp_path):
    root = _fake_stdlib(tmp_path)
    train, valid, tr, ev = stdlib_corpus(100, 100, 2, root)
    assert tr == ["a.py", "pkg/__init__.py", "z.py"] and ev == ["b.py", "pkg/c.py"]
    assert bytes(train) == b"aa\nzzz\n" and bytes(valid) == b"bbbb\ncccccc\n"
    # budgets cut the concatenated text (and read no further file)
    train, valid, tr, ev = stdlib_corpus(4, 5, 2, root)
    assert bytes(train) == b"aa\nz" and tr == ["a.py", "pkg/__init__.py", "z.py"]
    assert bytes(valid) == b"bbbb\n" and ev == ["b.py"]


def test_real_split_is_deterministic_and_disjoint():
    files = stdlib_files()
    assert list(files) == sorted(files) and len(files) > 100
    assert not any("/test/" in f"/{f}" or "site-packages" in f for f in files)
    a = stdlib_corpus(30_000, 20_000, 10)
    b = stdlib_corpus(30_000, 20_000, 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert len(a[0]) == 30_000 and len(a[1]) == 20_000
    assert not set(a[2]) & set(a[3])
    assert a[3][0] == files[9] and a[2][0] == files[0]  # the 10th file is the first held out


def test_windows():
    text = np.arange(23, dtype=np.uint8)
    w = train_windows(text, 5)  # starts 0, 5, 10, 15 (16..21 is the last full window)
    assert w.dtype == np.int32 and w.shape == (4, 6)
    np.testing.assert_array_equal(w[:, 0], [0, 5, 10, 15])
    np.testing.assert_array_equal(w[:, 1:].ravel(), np.arange(1, 21))  # each target once
    e = eval_windows(np.arange(27, dtype=np.uint8), 5, 4)  # evenly spaced, the last at the end
    np.testing.assert_array_equal(e[:, 0], [0, 7, 14, 21])
    np.testing.assert_array_equal(e[-1], np.arange(21, 27))


# ----------------------------------------------------------------------------- model


def _np_ln(ln, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * np.asarray(ln.weight) + np.asarray(ln.bias)


def _np_dense(lin, x):
    return x @ np.asarray(lin.weight, np.float64) + np.asarray(lin.bias, np.float64)


def _np_gelu(x):  # jax.nn.gelu's default (tanh) form
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_forward(model, tokens, num_heads):
    """The transformer written out in float64 numpy, one sequence and one head at a time."""
    t = len(tokens)
    h = np.asarray(model.embed, np.float64)[tokens] + np.asarray(model.pos, np.float64)[:t]
    for blk in model.blocks:
        n = _np_ln(blk.ln1, h)
        q, k, v = (_np_dense(lin, n) for lin in (blk.attn.query, blk.attn.key, blk.attn.value))
        dh = q.shape[1] // num_heads
        heads = []
        for i in range(num_heads):
            cols = slice(i * dh, (i + 1) * dh)
            s = q[:, cols] @ k[:, cols].T / np.sqrt(dh)
            s[np.triu_indices(t, 1)] = -np.inf  # position i attends to 0..i
            w = np.exp(s - s.max(1, keepdims=True))
            heads.append((w / w.sum(1, keepdims=True)) @ v[:, cols])
        h = h + _np_dense(blk.attn.out, np.concatenate(heads, axis=1))
        h = h + _np_dense(blk.fc2, _np_gelu(_np_dense(blk.fc1, _np_ln(blk.ln2, h))))
    return _np_dense(model.head, _np_ln(model.ln, h))


def _model(seed=0, context=12):
    m = ByteTransformer(
        context, d_model=8, num_heads=2, d_mlp=16, num_layers=2, key=jax.random.PRNGKey(seed)
    )
    # larger weights than the 0.02 initialization, so attention is far from uniform
    return jax.tree.map(lambda a: a * 25.0 if a.ndim == 2 else a, m)


def test_model_matches_numpy_and_is_causal():
    model = _model()
    tokens = np.random.default_rng(0).integers(0, 256, (3, 12))
    forward = jax.jit(lambda m, t: m(t))
    logits = np.asarray(forward(model, jnp.asarray(tokens)))
    assert logits.shape == (3, 12, 256) and logits.dtype == np.float32
    want = np.stack([_np_forward(model, t, 2) for t in tokens])
    np.testing.assert_allclose(logits, want, rtol=2e-4, atol=2e-4)
    # a later byte changes nothing before it, and everything from it on
    changed = tokens.copy()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    other = np.asarray(forward(model, jnp.asarray(changed)))
    np.testing.assert_array_equal(other[:, :7], logits[:, :7])
    assert np.all(np.abs(other[:, 7:] - logits[:, 7:]).max(-1) > 1e-3)


def test_bits_per_byte_by_hand():
    model = _model()
    uniform = eqx.tree_at(lambda m: m.head, model, jax.tree.map(jnp.zeros_like, model.head))
    windows = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 13)), jnp.int32)
    metrics = jax.jit(lm_eval_metrics)
    out = metrics(uniform, windows)
    np.testing.assert_allclose(out["bits_per_byte"], 8.0, rtol=1e-6)  # log2(256)
    np.testing.assert_allclose(out["loss"], math.log(256), rtol=1e-6)
    # a real model: mean -log p(next byte) over every position, in bits
    w = np.asarray(windows)
    logits = np.stack([_np_forward(model, x, 2) for x in w[:, :-1]])
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, w[:, 1:, None], -1).mean()
    out = metrics(model, windows)
    np.testing.assert_allclose(out["bits_per_byte"], nll / np.log(2), rtol=1e-4)
    np.testing.assert_allclose(jax.jit(lm_loss)(model, windows), nll, rtol=1e-4)
    assert float(bits_per_byte(jnp.log(2.0))) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the runner

_OVERRIDES = [
    "steps=6",
    "batch_size=4",
    "log_every=3",
    "eval_every=3",
    "checkpoint.every=3",
    "task.context_length=16",
    "task.train_bytes=20000",
    "task.eval_bytes=4000",
    "task.eval_windows=4",
    "model.d_model=16",
    "model.num_heads=2",
    "model.d_mlp=32",
    "model.num_layers=1",
    "optimizer.schedule=constant",
    "optimizer.warmup_steps=0",
    "optimizer.min_lr_ratio=0.0",
]


def _train(run_dir, overrides=()):
    rc, _ = load_config(str(ROOT / "configs/lm_tiny.yaml"), [*_OVERRIDES, *overrides])
    prepare_run_dir(run_dir, rc)
    trainer = Trainer(rc, run_dir, progress=False, stream=None, plots=False)
    return trainer, trainer.train()


def _params(run_dir):
    with np.load(run_dir / "params.npz") as z:
        return {k: z[k] for k in z.files}


def test_tiny_run_evaluates_bits_per_byte_and_resumes_exactly(tmp_path):
    trainer, result = _train(tmp_path / "a")
    assert result.status == "complete" and result.step == 6
    assert trainer.task.train[0].shape[1] == 17 and trainer.n_params > 0
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    bpb, nats = summary["final_eval_bits_per_byte"], summary["final_eval_loss"]
    assert bpb == pytest.approx(nats / math.log(2), rel=1e-5) and 6.0 < bpb < 8.2
    # lose the last checkpoint: the rerun resumes from step 3 with the same batches
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b/checkpoints/6")
    (tmp_path / "b/params.npz").unlink()
    trainer, result = _train(tmp_path / "b")
    assert trainer.resumed_from == 3 and result.step == 6
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)), k
    rows_a, rows_b = (
        read_metrics(tmp_path / "a/metrics.jsonl"),
        read_metrics(tmp_path / "b/metrics.jsonl"),
    )
    keys = ("step", "loss", "eval_bits_per_byte")
    assert [[r.get(k) for k in keys] for r in rows_b] == [[r.get(k) for k in keys] for r in rows_a]


def test_batches_depend_on_seed_and_step_only():
    rc, _ = load_config(str(ROOT / "configs/lm_tiny.yaml"), _OVERRIDES)
    s1, s2 = build_setup(rc), build_setup(rc)
    data = s1.train_data
    for step in (0, 5, 5000):
        t = jnp.asarray(step, jnp.int32)
        np.testing.assert_array_equal(s1.batch(data, t), s2.batch(data, t))
    assert not np.array_equal(s1.batch(data, jnp.int32(0)), s1.batch(data, jnp.int32(1)))


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.num_heads=3", "must be a multiple of model.num_heads"),
        ("task.eval_bytes=10", r"fewer than context_length \+ 1"),
        ("task.holdout_every=1", "task.holdout_every must be >= 2"),
    ],
)
def test_bad_configs(override, needle):
    rc, _ = load_config(str(ROOT / "configs/lm_tiny.yaml"), [*_OVERRIDES, override])
    with pytest.raises(ConfigError, match=needle):
        build_setup(rc)
