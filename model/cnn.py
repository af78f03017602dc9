"""Configurable CNN image classifier in Flax NNX: conv blocks, then dense layers and a classifier head.

Shape key: B batch, H height, W width, C channels, F dense width, Y classes.

Training mode is "a dropout key was passed": batch norm then normalises with the batch's statistics
and updates its running averages (nnx.BatchStat, kept in the train state's `rest`); without a key
it uses the running averages, so eval and reload scripts are deterministic.
"""
from dataclasses import dataclass, field
from typing import List

import jax
import jax.numpy as jnp
from flax import nnx

from errors import UserError
from model import quant

ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
TASKS = ("classify",)
INPUTS = ("images",)


@dataclass
class Config:
    family: str = "cnn"
    # The classic CIFAR-10 network: conv 32 -> pool -> conv 64 -> pool -> conv 64 -> dense 64 -> classes.
    channels: List[int] = field(default_factory=lambda: [32, 64, 64])
    pool: List[bool] = field(default_factory=lambda: [True, True, False])  # 2x2 max-pool after conv i
    kernel_size: int = 3
    stride: int = 1
    padding: str = "VALID"  # or SAME
    batch_norm: bool = False  # after each conv; statistics live in the state's `rest`
    activation: str = "relu"  # relu | gelu | tanh | silu
    dense: List[int] = field(default_factory=lambda: [64])  # hidden dense layers before the classifier
    dropout: float = 0.0  # before each dense layer
    dtype: str = "float32"
    # Set by compress.py in the runs it writes: int8 dense layers and head (model/quant.py); convs stay float.
    quant: str = "none"


def check(cfg) -> None:
    """Values the schema's types cannot rule out."""
    quant.check(cfg)
    if len(cfg.pool) != len(cfg.channels) or not cfg.channels:
        raise UserError(f"model.pool has {len(cfg.pool)} entries for {len(cfg.channels)} model.channels; "
                        f"give one true/false per conv layer")
    if cfg.padding not in ("VALID", "SAME"):
        raise UserError(f"model.padding={cfg.padding} must be VALID or SAME")
    if cfg.activation not in ACTIVATIONS:
        raise UserError(f"model.activation={cfg.activation} must be one of {', '.join(ACTIVATIONS)}")
    if min([cfg.kernel_size, cfg.stride, *cfg.channels, *cfg.dense]) <= 0:
        raise UserError("model.kernel_size, model.stride, model.channels and model.dense must be positive")


def conv_output_size(size: int, kernel: int, stride: int, padding: str, pool: bool) -> int:
    """Spatial size after one conv (and its optional 2x2 max-pool)."""
    size = -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1
    return size // 2 if pool else size


class CNN(nnx.Module):
    """conv(k x k, stride) -> [batch norm] -> act -> [2x2 max-pool], repeated; flatten; dense; head."""

    def __init__(self, cfg, *, num_classes: int, image_shape, rngs: nnx.Rngs):
        H, W, C = image_shape
        self.activation, self.pool = cfg.activation, tuple(cfg.pool)
        self.dtype = jnp.dtype(cfg.dtype)
        convs, norms = [], []
        for c_out, pool in zip(cfg.channels, cfg.pool):
            convs.append(nnx.Conv(C, c_out, (cfg.kernel_size,) * 2, strides=cfg.stride, padding=cfg.padding,
                                  use_bias=not cfg.batch_norm, dtype=self.dtype, rngs=rngs))
            if cfg.batch_norm:
                norms.append(nnx.BatchNorm(c_out, momentum=0.9, epsilon=1e-5, dtype=self.dtype, rngs=rngs))
            H = conv_output_size(H, cfg.kernel_size, cfg.stride, cfg.padding, pool)
            W = conv_output_size(W, cfg.kernel_size, cfg.stride, cfg.padding, pool)
            C = c_out
            if H <= 0 or W <= 0:
                raise UserError(f"the conv stack shrinks {image_shape[0]}x{image_shape[1]} images to nothing; "
                                f"use model.padding=SAME, fewer pools (model.pool) or fewer model.channels")
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        widths = [H * W * C, *cfg.dense]
        linear = quant.linear(cfg)
        self.dense = nnx.List([linear(a, b, dtype=self.dtype, rngs=rngs) for a, b in zip(widths, widths[1:])])
        self.head = linear(widths[-1], num_classes, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)

    def _act(self, x):
        return getattr(jax.nn, self.activation)(x)

    def __call__(self, x_BHWC, *, key=None):
        """Logits_BY (float32); `key` enables dropout and batch statistics (training)."""
        train = key is not None
        keys = jax.random.split(key, len(self.dense) + 1) if train else [None] * (len(self.dense) + 1)
        x = x_BHWC.astype(self.dtype)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if len(self.norms):
                x = self.norms[i](x, use_running_average=not train)
            x = self._act(x)
            if self.pool[i]:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x_BF = x.reshape(x.shape[0], -1)
        for layer, k in zip(self.dense, keys):
            x_BF = self._act(layer(x_BF if k is None else self.drop(x_BF, rngs=k)))
        x_BF = x_BF if keys[-1] is None else self.drop(x_BF, rngs=keys[-1])
        return self.head(x_BF).astype(jnp.float32)


Model = CNN
