"""Equinox models for the experiment tasks, in a small registry.

Every model maps ONE example to an output (the tasks ``jax.vmap`` it over the batch) and keeps
its parameters in float32, whatever ``jax_enable_x64`` says.

Each model has a config dataclass; a config's ``model:`` section is ``name`` plus those fields.
Tasks say which models they accept and may change the defaults (the autoencoder's MLP is wider
than the classifier's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxopt2.experiment.errors import ConfigError

__all__ = ["MODELS", "ModelSpec", "get_model"]

F32 = jnp.float32

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(
            f"model.activation: unknown activation {name!r}; choose one of "
            f"{', '.join(_ACTIVATIONS)}"
        ) from None


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass
class MLPConfig:
    """Fully connected network; ``hidden`` lists the hidden widths."""

    hidden: list[int] = dataclasses.field(default_factory=lambda: [128, 128])
    activation: str = "tanh"


@dataclasses.dataclass
class CNNConfig:
    """Small convnet on square images (8x8 digits, 28x28, 32x32): convs (same padding),
    2x2 average pool, linear head."""

    channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32])
    kernel_size: int = 3
    activation: str = "tanh"


@dataclasses.dataclass
class TransformerConfig:
    """Small pre-LayerNorm transformer on token sequences (modular arithmetic, byte LM)."""

    d_model: int = 128
    num_heads: int = 4
    d_mlp: int = 512
    num_layers: int = 1


@dataclasses.dataclass
class LinearConfig:
    """A linear map (one output per example when the task is scalar)."""

    use_bias: bool = False
    zero_init: bool = True


@dataclasses.dataclass
class VectorConfig:
    """The parameters are a single vector (synthetic objectives); no fields."""


# ----------------------------------------------------------------------------- modules


class MLP(eqx.Module):
    layers: list[eqx.nn.Linear]
    act_name: str = eqx.field(static=True)

    def __init__(self, sizes: list[int], act: str, *, key: jax.Array):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            eqx.nn.Linear(a, b, key=k, dtype=F32)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        ]
        self.act_name = act

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.act_name]
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return self.layers[-1](x)


def _conv2d(c_in: int, c_out: int, kernel_size: int, key: jax.Array) -> eqx.nn.Conv2d:
    """A 'same'-padded ``eqx.nn.Conv2d``: kernel ``(c_out, c_in, k, k)``, bias ``(c_out, 1, 1)``.

    Kernel and bias are drawn from ``U(±1/√fan_in)`` by `key`, in the draw order the runner's
    CNN has always used (kernel as a ``(k·k·c_in, c_out)`` patch matrix), so seeds keep their
    initial functions.
    """
    fan_in = kernel_size * kernel_size * c_in
    bound = 1.0 / fan_in**0.5
    wkey, bkey = jax.random.split(key)
    patch_matrix = jax.random.uniform(wkey, (fan_in, c_out), F32, -bound, bound)
    weight = patch_matrix.reshape(kernel_size, kernel_size, c_in, c_out).transpose(3, 2, 0, 1)
    bias = jax.random.uniform(bkey, (c_out, 1, 1), F32, -bound, bound)
    conv = eqx.nn.Conv2d(c_in, c_out, kernel_size, padding="SAME", key=wkey, dtype=F32)
    return eqx.tree_at(lambda c: (c.weight, c.bias), conv, (weight, bias))


class CNN(eqx.Module):
    """'Same'-padded convs (``eqx.nn.Conv2d``, kernels in equinox's ``(out, in, h, w)``
    layout, which AdaHessian's spatial averaging and K-FAC's conv blocks read), a 2x2 average
    pool and a linear head."""

    convs: list[eqx.nn.Conv2d]
    head: eqx.nn.Linear
    side: int = eqx.field(static=True)
    act_name: str = eqx.field(static=True)

    def __init__(
        self,
        side: int,
        channels: list[int],
        kernel_size: int,
        act: str,
        out: int,
        *,
        key: jax.Array,
        in_channels: int = 1,
    ):
        keys = jax.random.split(key, len(channels) + 1)
        chans = [in_channels, *channels]
        self.convs = [
            _conv2d(a, b, kernel_size, k)
            for a, b, k in zip(chans[:-1], chans[1:], keys[:-1], strict=True)
        ]
        pooled = side // 2
        self.head = eqx.nn.Linear(chans[-1] * pooled * pooled, out, key=keys[-1], dtype=F32)
        self.side = side
        self.act_name = act

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.act_name]
        h = x.reshape(-1, self.side, self.side)  # flat channel-major input
        for conv in self.convs:
            h = act(conv(h))
        c, s, _ = h.shape
        h = h[:, : s // 2 * 2, : s // 2 * 2].reshape(c, s // 2, 2, s // 2, 2).mean(axis=(2, 4))
        return self.head(h.reshape(-1))


class Linear(eqx.Module):
    weight: jax.Array
    bias: jax.Array | None

    def __init__(
        self, n_in: int, n_out: int | None, use_bias: bool, zero_init: bool, *, key: jax.Array
    ):
        shape = (n_in,) if n_out is None else (n_out, n_in)
        if zero_init:
            self.weight = jnp.zeros(shape, F32)
        else:
            bound = 1.0 / float(n_in) ** 0.5
            self.weight = jax.random.uniform(key, shape, F32, -bound, bound)
        bias_shape = () if n_out is None else (n_out,)
        self.bias = jnp.zeros(bias_shape, F32) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.weight @ x
        return y if self.bias is None else y + self.bias


class Vector(eqx.Module):
    x: jax.Array

    def __init__(self, x0: Any):
        self.x = jnp.asarray(x0, F32)


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model: its config dataclass and a one-line description."""

    name: str
    config_cls: type
    description: str


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", MLPConfig, "fully connected network (hidden widths, activation)"),
    "cnn": ModelSpec("cnn", CNNConfig, "small convnet for square images (channel-major input)"),
    "linear": ModelSpec("linear", LinearConfig, "linear model (regression / logistic)"),
    "vector": ModelSpec("vector", VectorConfig, "a single parameter vector (synthetic)"),
    "transformer": ModelSpec(
        "transformer", TransformerConfig, "small transformer on token sequences (modular, byte_lm)"
    ),
}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; models: {', '.join(sorted(MODELS))}") from None


def build_mlp(cfg: MLPConfig, n_in: int, n_out: int, key: jax.Array) -> MLP:
    activation(cfg.activation)
    return MLP([n_in, *cfg.hidden, n_out], cfg.activation, key=key)


def build_cnn(cfg: CNNConfig, side: int, n_out: int, key: jax.Array, in_channels: int = 1) -> CNN:
    activation(cfg.activation)
    return CNN(
        side,
        list(cfg.channels),
        cfg.kernel_size,
        cfg.activation,
        n_out,
        key=key,
        in_channels=in_channels,
    )


def build_linear(cfg: LinearConfig, n_in: int, n_out: int | None, key: jax.Array) -> Linear:
    return Linear(n_in, n_out, cfg.use_bias, cfg.zero_init, key=key)
