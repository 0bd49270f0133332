"""Offline training tasks, in a small registry: ``name -> (config dataclass, builder)``.

Every task is a mean loss over a batch of rows of its training arrays (tasks without data,
such as Rosenbrock, are deterministic objectives of the parameters alone). Data are float32
numpy arrays (labels int32) made here once; the trainer passes them to its jitted step as
arguments and samples batches inside it. Tasks whose loss is a named loss of a model's
outputs tag it (:func:`jaxopt2.tag_loss`), so K-FAC and Gauss-Newton methods can train them
(quadratic and Rosenbrock have no model outputs).

Tasks:

* ``quadratic`` — noisy quadratic 0.5 (x - x* - xi)^T A (x - x* - xi), A = Q diag(lambda) Q^T
  with eigenvalues from 1 down to 1/condition_number (log- or linearly spaced); xi are rows of
  Gaussian noise (``noise_std``; 0 gives the exact quadratic).
* ``rosenbrock`` — sum_i b (x_{i+1} - x_i^2)^2 + (a - x_i)^2 from (-1.2, 1, -1.2, ...).
* ``least_squares`` — 0.5 mean (x^T w - y)^2 on Gaussian features, held-out eval rows.
* ``digits_classifier`` — scikit-learn digits, pixels/16, rows permuted with
  ``np.random.default_rng(0)``; first 1437 rows train, last 360 eval; softmax cross-entropy.
  Models: ``mlp`` (64-128-128-10 tanh) or ``cnn``. ``classes`` (e.g. ``[0, 1, 2, 3, 4]``)
  keeps only the rows of those digits, in both splits, and relabels digit ``classes[i]`` as
  ``i``; the model has ``len(classes)`` outputs (null: all 10 digits).
* ``digits_regression`` — the edge-of-stability setup of Cohen et al. (2021): the first
  ``num_train`` rows of the same training split (default 200), squared loss
  0.5 mean_batch sum_outputs (f(x) - onehot(y))^2; MLP 64-64-64-10 tanh with weights
  N(0, 1/fan_in) and zero biases (``init: normal``; ``default`` keeps equinox's init).
  Evaluation: the 360 evaluation rows (squared loss, accuracy).
* ``digits_autoencoder`` — same split; MLP 64-512-256-32-256-512-64 tanh with linear output,
  sigmoid cross-entropy summed over the 64 pixels, mean over the batch.
* ``breast_cancer`` — logistic regression on scikit-learn's breast cancer data
  (permuted with ``default_rng(0)``, 455 train / 114 eval rows, standardized with training
  statistics, plus an intercept column): mean logistic loss + ||w||^2 / (2 n_train) on the
  weights (not the intercept), i.e. scikit-learn's ``LogisticRegression(C=1)`` objective.
* ``modular_arithmetic`` — grokking (Power et al., 2022): all ``p²`` equations
  ``a op b = c (mod p)`` as tokens ``[a, b, =]``, a seeded ``train_fraction`` split;
  softmax cross-entropy over the ``p`` answers; model ``transformer``.
* ``byte_lm`` — a byte-level decoder-only transformer on the Python standard library's own
  source files (nothing to download), split by file; evaluation in bits per byte. Model
  ``transformer`` (its sizes); ``context_length`` and the byte budgets are task fields. See
  :mod:`.lm`.
* Files the user already has (nothing is downloaded; see :mod:`.loaders`): ``mnist`` and
  ``fashion_mnist`` (the four idx files in ``data_dir``), ``cifar10`` (the python batches in
  ``data_dir``), ``npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test`` in ``path``; x of
  any shape, flattened; integer labels). Softmax classifiers on flattened inputs (``mlp``)
  or, for images, the ``cnn``. A missing or malformed file is a user error naming the file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt2.curvature.tags import tag_loss
from jaxopt2.experiment import models as M
from jaxopt2.experiment.errors import ConfigError
from jaxopt2.experiment.file_tasks import (
    ImageDirConfig,
    NpzConfig,
    build_cifar10,
    build_idx,
    build_npz,
)
from jaxopt2.experiment.lm import (
    ByteLMConfig,
    ByteTransformer,
    byte_lm_data,
    lm_eval_metrics,
    lm_loss,
)
from jaxopt2.experiment.modular import OPERATIONS, ModularTransformer, modular_arithmetic_data
from jaxopt2.experiment.task_base import (
    F32,
    Task,
    TaskSpec,
    classifier_metrics,
    softmax_classifier,
)

__all__ = ["TASKS", "Task", "TaskSpec", "get_task"]

# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass
class QuadraticConfig:
    dim: int = 100
    condition_number: float = 1000.0
    spectrum: str = "log"  # log | linear
    noise_std: float = 0.0
    num_samples: int = 1024
    data_seed: int = 0


@dataclasses.dataclass
class RosenbrockConfig:
    dim: int = 2
    a: float = 1.0
    b: float = 100.0


@dataclasses.dataclass
class LeastSquaresConfig:
    dim: int = 20
    num_train: int = 1000
    num_eval: int = 200
    noise_std: float = 0.1
    data_seed: int = 0


@dataclasses.dataclass
class DigitsConfig:
    """The digits split is fixed (see the module docstring); nothing to choose."""


@dataclasses.dataclass
class DigitsClassifierConfig:
    """The split is fixed; ``classes`` picks a subset of the digits (null: all 10)."""

    classes: list[int] | None = None  # digit classes[i] becomes label i; len(classes) outputs


@dataclasses.dataclass
class DigitsRegressionConfig:
    num_train: int = 200  # the first rows of the fixed training split (0: all 1437)
    init: str = "normal"  # normal: weights N(0, 1/fan_in), zero biases | default: equinox's


@dataclasses.dataclass
class ModularConfig:
    p: int = 97  # the modulus (prime for the classic runs)
    operation: str = "add"  # add | sub | mul
    train_fraction: float = 0.3  # share of the p² equations used for training
    data_seed: int = 0  # the train/eval split


@dataclasses.dataclass
class BreastCancerConfig:
    """The split is fixed (see the module docstring); ``l2`` scales the 1/(2n) penalty."""

    l2: float = 1.0


# ----------------------------------------------------------------------------- helpers


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(F32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, ev = perm[:1437], perm[1437:]
    return x[tr], y[tr], x[ev], y[ev]


def _class_subset(
    key: str, classes: list[int] | None, n_classes: int, *splits: tuple[np.ndarray, np.ndarray]
) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Keep the rows whose label is in `classes`, relabelled ``classes[i] -> i``; returns the
    number of classes and the filtered ``(x, y)`` splits (all of them for ``None``)."""
    if classes is None:
        return n_classes, list(splits)
    classes = list(classes)
    if len(classes) < 2:
        raise ConfigError(f"{key} must list at least 2 classes (null: all), got {classes}")
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad:
        raise ConfigError(f"{key}: {bad} out of range; classes are 0..{n_classes - 1}")
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise ConfigError(f"{key}: {dup} listed more than once")
    relabel = np.full(n_classes, -1, np.int32)
    relabel[classes] = np.arange(len(classes), dtype=np.int32)
    out = []
    for x, y in splits:
        keep = relabel[y] >= 0
        out.append((x[keep], relabel[y[keep]]))
    return len(classes), out


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be positive, got {value!r}")


# ----------------------------------------------------------------------------- builders


def _build_quadratic(cfg: QuadraticConfig, model_name: str, model_cfg: Any, key: jax.Array):
    _check_positive("task.dim", cfg.dim)
    _check_positive("task.num_samples", cfg.num_samples)
    _check_choice("task.spectrum", cfg.spectrum, ("log", "linear"))
    if not cfg.condition_number >= 1:
        raise ConfigError(f"task.condition_number must be >= 1, got {cfg.condition_number}")
    rng = np.random.default_rng(cfg.data_seed)
    if cfg.spectrum == "log":
        lam = np.logspace(0.0, -np.log10(cfg.condition_number), cfg.dim)
    else:
        lam = np.linspace(1.0, 1.0 / cfg.condition_number, cfg.dim)
    q, _ = np.linalg.qr(rng.standard_normal((cfg.dim, cfg.dim)))
    a = ((q * lam) @ q.T).astype(F32)
    a = (a + a.T) / 2
    x_star = rng.standard_normal(cfg.dim).astype(F32)
    noise = (cfg.noise_std * rng.standard_normal((cfg.num_samples, cfg.dim))).astype(F32)
    a_j, xs_j = jnp.asarray(a), jnp.asarray(x_star)

    def row_loss(x, xi):
        d = x - xs_j - xi
        return 0.5 * d @ (a_j @ d)

    def loss(model, xi):
        return jnp.mean(jax.vmap(row_loss, in_axes=(None, 0))(model.x, xi))

    def eval_metrics(model):
        exact = row_loss(model.x, jnp.zeros_like(model.x))
        return {"loss": exact, "dist_to_opt": jnp.linalg.norm(model.x - xs_j)}

    model = M.Vector(np.zeros(cfg.dim, F32))
    return Task(model, (noise,), (), loss, eval_metrics)


def _build_rosenbrock(cfg: RosenbrockConfig, model_name: str, model_cfg: Any, key: jax.Array):
    if cfg.dim < 2:
        raise ConfigError(f"task.dim must be >= 2 for rosenbrock, got {cfg.dim}")
    a, b = cfg.a, cfg.b

    def loss(model):
        x = model.x
        return jnp.sum(b * (x[1:] - x[:-1] ** 2) ** 2 + (a - x[:-1]) ** 2)

    def eval_metrics(model):
        return {"loss": loss(model), "dist_to_opt": jnp.linalg.norm(model.x - a)}

    x0 = np.array([-1.2 if i % 2 == 0 else 1.0 for i in range(cfg.dim)], F32)
    return Task(M.Vector(x0), (), (), loss, eval_metrics)


def _build_least_squares(cfg: LeastSquaresConfig, model_name: str, model_cfg: Any, key: jax.Array):
    for k in ("dim", "num_train", "num_eval"):
        _check_positive(f"task.{k}", getattr(cfg, k))
    rng = np.random.default_rng(cfg.data_seed)
    w_star = rng.standard_normal(cfg.dim)
    n = cfg.num_train + cfg.num_eval
    x = rng.standard_normal((n, cfg.dim))
    y = x @ w_star + cfg.noise_std * rng.standard_normal(n)
    x, y = x.astype(F32), y.astype(F32)

    def loss(model, xb, yb):
        out = tag_loss("squared_error", jax.vmap(model)(xb)[:, None], yb[:, None])
        return 0.5 * jnp.mean(jnp.sum((out - yb[:, None]) ** 2, axis=-1))

    def eval_metrics(model, xb, yb):
        return {"loss": loss(model, xb, yb)}

    model = M.build_linear(model_cfg, cfg.dim, None, key)
    tr, ev = slice(0, cfg.num_train), slice(cfg.num_train, n)
    return Task(model, (x[tr], y[tr]), (x[ev], y[ev]), loss, eval_metrics)


def _digits_model(model_name: str, model_cfg: Any, n_out: int, key: jax.Array) -> eqx.Module:
    if model_name == "cnn":
        return M.build_cnn(model_cfg, 8, n_out, key)
    return M.build_mlp(model_cfg, 64, n_out, key)


def _build_digits_classifier(
    cfg: DigitsClassifierConfig, model_name: str, model_cfg: Any, key: jax.Array
):
    xtr, ytr, xev, yev = _digits_split()
    n_out, [(xtr, ytr), (xev, yev)] = _class_subset(
        "task.classes", cfg.classes, 10, (xtr, ytr), (xev, yev)
    )

    def loss(model, xb, yb):
        logits = tag_loss("softmax_cross_entropy", jax.vmap(model)(xb), yb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def eval_metrics(model, xb, yb):
        return classifier_metrics(model, xb, yb)

    model = _digits_model(model_name, model_cfg, n_out, key)
    return Task(model, (xtr, ytr), (xev, yev), loss, eval_metrics)


_ModuleT = TypeVar("_ModuleT", bound=eqx.Module)


def _normal_init(model: _ModuleT, key: jax.Array) -> _ModuleT:
    """Every ``eqx.nn.Linear`` of `model`: weights N(0, 1/fan_in), biases zero (float32)."""

    def is_linear(m: Any) -> bool:
        return isinstance(m, eqx.nn.Linear)

    linears = [m for m in jax.tree.leaves(model, is_leaf=is_linear) if is_linear(m)]
    keys = iter(jax.random.split(key, len(linears)))

    def fresh(m: Any) -> Any:
        if not is_linear(m):
            return m
        fan_in = m.weight.shape[1]
        w = jax.random.normal(next(keys), m.weight.shape, jnp.float32) / np.sqrt(fan_in)
        m = eqx.tree_at(lambda lin: lin.weight, m, w.astype(jnp.float32))
        if m.bias is not None:
            m = eqx.tree_at(lambda lin: lin.bias, m, jnp.zeros(m.bias.shape, jnp.float32))
        return m

    return jax.tree.map(fresh, model, is_leaf=is_linear)


def _build_digits_regression(
    cfg: DigitsRegressionConfig, model_name: str, model_cfg: Any, key: jax.Array
):

    _check_choice("task.init", cfg.init, ("normal", "default"))
    xtr, ytr, xev, yev = _digits_split()
    if not 0 <= cfg.num_train <= len(xtr):
        raise ConfigError(
            f"task.num_train must be in [0, {len(xtr)}] (0: all), got {cfg.num_train}"
        )
    n = cfg.num_train or len(xtr)
    eye = np.eye(10, dtype=F32)
    ttr, tev = eye[ytr[:n]], eye[yev]

    def loss(model, xb, tb):
        out = tag_loss("squared_error", jax.vmap(model)(xb), tb)
        return 0.5 * jnp.mean(jnp.sum((out - tb) ** 2, axis=-1))

    def eval_metrics(model, xb, tb):
        out = jax.vmap(model)(xb)
        acc = jnp.mean((jnp.argmax(out, -1) == jnp.argmax(tb, -1)).astype(jnp.float32))
        return {"loss": 0.5 * jnp.mean(jnp.sum((out - tb) ** 2, axis=-1)), "accuracy": acc}

    k_model, k_init = jax.random.split(key)
    model = M.build_mlp(model_cfg, 64, 10, k_model)
    if cfg.init == "normal":
        model = _normal_init(model, k_init)
    return Task(model, (xtr[:n], ttr), (xev, tev), loss, eval_metrics)


def _build_digits_autoencoder(cfg: DigitsConfig, model_name: str, model_cfg: Any, key: jax.Array):
    xtr, _, xev, _ = _digits_split()

    def loss(model, xb):
        logits = tag_loss("sigmoid_cross_entropy", jax.vmap(model)(xb), xb)
        return optax.sigmoid_binary_cross_entropy(logits, xb).sum(axis=-1).mean()

    def eval_metrics(model, xb):
        return {"loss": loss(model, xb)}

    model = M.build_mlp(model_cfg, 64, 64, key)
    return Task(model, (xtr,), (xev,), loss, eval_metrics)


def _build_breast_cancer(cfg: BreastCancerConfig, model_name: str, model_cfg: Any, key: jax.Array):
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    perm = np.random.default_rng(0).permutation(len(d.data))
    n_train = int(0.8 * len(perm))
    tr, ev = perm[:n_train], perm[n_train:]
    mean, std = d.data[tr].mean(0), d.data[tr].std(0)

    def design(rows):
        z = (d.data[rows] - mean) / std
        return np.concatenate([z, np.ones((len(rows), 1))], axis=1).astype(F32)

    xtr, xev = design(tr), design(ev)
    ytr, yev = d.target[tr].astype(F32), d.target[ev].astype(F32)
    reg = cfg.l2 / (2.0 * n_train)

    def data_loss(model, xb, yb):
        z = tag_loss("sigmoid_cross_entropy", jax.vmap(model)(xb)[:, None], yb[:, None])
        return optax.sigmoid_binary_cross_entropy(z, yb[:, None]).mean()

    def loss(model, xb, yb):
        w = model.weight[:-1]  # the last column is the intercept: not penalized
        return data_loss(model, xb, yb) + reg * jnp.sum(w * w)

    def eval_metrics(model, xb, yb):
        z = jax.vmap(model)(xb)
        acc = jnp.mean(((z > 0).astype(jnp.float32) == yb).astype(jnp.float32))
        return {"loss": data_loss(model, xb, yb), "accuracy": acc}

    model = M.build_linear(model_cfg, xtr.shape[1], None, key)
    return Task(model, (xtr, ytr), (xev, yev), loss, eval_metrics)


def _float32_model(model: eqx.Module) -> eqx.Module:
    """Floating parameters in float32 (equinox layers follow jax_enable_x64 otherwise)."""
    return jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model)


def _check_transformer(model_cfg: Any) -> None:
    """The transformer model's sizes: positive, and heads that divide the width."""
    for k in ("d_model", "num_heads", "d_mlp", "num_layers"):
        _check_positive(f"model.{k}", getattr(model_cfg, k))
    if model_cfg.d_model % model_cfg.num_heads:
        raise ConfigError(
            f"model.d_model ({model_cfg.d_model}) must be a multiple of model.num_heads "
            f"({model_cfg.num_heads})"
        )


def _build_modular(cfg: ModularConfig, model_name: str, model_cfg: Any, key: jax.Array):
    _check_choice("task.operation", cfg.operation, OPERATIONS)
    if cfg.p < 2:
        raise ConfigError(f"task.p must be an integer >= 2, got {cfg.p}")
    if not 0.0 < cfg.train_fraction < 1.0:
        raise ConfigError(f"task.train_fraction must lie in (0, 1), got {cfg.train_fraction}")
    _check_transformer(model_cfg)
    xtr, ytr, xev, yev = modular_arithmetic_data(
        cfg.p, cfg.operation, cfg.train_fraction, cfg.data_seed
    )
    model = ModularTransformer(
        cfg.p,
        d_model=model_cfg.d_model,
        num_heads=model_cfg.num_heads,
        d_mlp=model_cfg.d_mlp,
        num_layers=model_cfg.num_layers,
        key=key,
    )
    return softmax_classifier(_float32_model(model), (xtr, ytr), (xev, yev))


def _build_byte_lm(cfg: ByteLMConfig, model_name: str, model_cfg: Any, key: jax.Array):
    for k in ("context_length", "train_bytes", "eval_bytes", "eval_windows"):
        _check_positive(f"task.{k}", getattr(cfg, k))
    if cfg.holdout_every < 2:
        raise ConfigError(f"task.holdout_every must be >= 2, got {cfg.holdout_every}")
    _check_transformer(model_cfg)
    try:
        train, valid = byte_lm_data(cfg)
    except ValueError as e:
        raise ConfigError(f"{e} (raise task.train_bytes / task.eval_bytes)") from None
    model = ByteTransformer(
        cfg.context_length,
        d_model=model_cfg.d_model,
        num_heads=model_cfg.num_heads,
        d_mlp=model_cfg.d_mlp,
        num_layers=model_cfg.num_layers,
        key=key,
    )
    return Task(model, (train,), (valid,), lm_loss, lm_eval_metrics)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec(
            "quadratic",
            QuadraticConfig,
            ("vector",),
            _build_quadratic,
            "noisy quadratic with a chosen eigen-spectrum (dim, condition_number)",
        ),
        TaskSpec(
            "rosenbrock",
            RosenbrockConfig,
            ("vector",),
            _build_rosenbrock,
            "Rosenbrock function from (-1.2, 1, ...)",
        ),
        TaskSpec(
            "least_squares",
            LeastSquaresConfig,
            ("linear",),
            _build_least_squares,
            "linear least squares on Gaussian features",
        ),
        TaskSpec(
            "digits_classifier",
            DigitsClassifierConfig,
            ("mlp", "cnn"),
            _build_digits_classifier,
            "scikit-learn digits, softmax classifier over 10 (or task.classes) digits "
            "(1437 train / 360 eval)",
        ),
        TaskSpec(
            "digits_regression",
            DigitsRegressionConfig,
            ("mlp",),
            _build_digits_regression,
            "digits, squared loss on one-hot targets, small subset: edge of stability demo",
            model_defaults={"mlp": {"hidden": [64, 64]}},
        ),
        TaskSpec(
            "digits_autoencoder",
            DigitsConfig,
            ("mlp",),
            _build_digits_autoencoder,
            "scikit-learn digits, deep MLP autoencoder, sigmoid cross-entropy",
            model_defaults={"mlp": {"hidden": [512, 256, 32, 256, 512]}},
        ),
        TaskSpec(
            "modular_arithmetic",
            ModularConfig,
            ("transformer",),
            _build_modular,
            "grokking: (a op b) mod p with a small transformer, train on a fraction of pairs",
        ),
        TaskSpec(
            "byte_lm",
            ByteLMConfig,
            ("transformer",),
            _build_byte_lm,
            "byte-level transformer LM on the Python standard library's source, bits per byte "
            "(split by file)",
            model_defaults={
                "transformer": {"d_model": 64, "num_heads": 4, "d_mlp": 256, "num_layers": 2}
            },
        ),
        TaskSpec(
            "mnist",
            ImageDirConfig,
            ("mlp", "cnn"),
            build_idx("mnist"),
            "MNIST from your idx files in data_dir ({train,t10k}-{images-idx3,labels-idx1}"
            "-ubyte[.gz])",
            needs_files=True,
        ),
        TaskSpec(
            "fashion_mnist",
            ImageDirConfig,
            ("mlp", "cnn"),
            build_idx("fashion_mnist"),
            "Fashion-MNIST from your idx files in data_dir (same names as MNIST)",
            needs_files=True,
        ),
        TaskSpec(
            "cifar10",
            ImageDirConfig,
            ("mlp", "cnn"),
            build_cifar10,
            "CIFAR-10 from your python batches in data_dir (data_batch_1..5, test_batch)",
            needs_files=True,
        ),
        TaskSpec(
            "npz",
            NpzConfig,
            ("mlp",),
            build_npz,
            "your .npz file (path): x_train, y_train, x_test, y_test; x flattened, integer y",
            needs_files=True,
        ),
        TaskSpec(
            "breast_cancer",
            BreastCancerConfig,
            ("linear",),
            _build_breast_cancer,
            "L2 logistic regression on breast cancer (= scikit-learn C=1)",
        ),
    ]
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(sorted(TASKS))}") from None
