"""Multi-layer perceptron in Flax NNX: a regressor or classifier of feature vectors (table rows).

Shape key: B batch, F input features, D hidden width, O regression outputs, Y classes.

Each hidden block is dense -> [norm] -> activation -> [dropout]; with `residual` a block whose input
and output widths are equal adds its input back. Weights use Flax's default init (LeCun-normal
kernels, zero biases). Training mode is "a key was passed": dropout is on and batch norm uses the
batch's statistics and updates its running averages (nnx.BatchStat, kept in the train state's
`rest`, as model/cnn.py does); without a key the model is deterministic.
"""
import math
from dataclasses import dataclass, field
from typing import List

import jax
import jax.numpy as jnp
from flax import nnx

from errors import UserError
from model import quant

ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
NORMS = ("none", "layer", "batch")
TASKS = ("classify", "regress")
INPUTS = ("rows", "images")  # images are flattened


@dataclass
class Config:
    family: str = "mlp"
    hidden: List[int] = field(default_factory=lambda: [256, 256])  # widths of the hidden layers
    activation: str = "relu"  # relu | gelu | tanh | silu
    dropout: float = 0.0  # after each hidden layer's activation
    norm: str = "none"  # none | layer | batch, before each hidden activation
    residual: bool = False  # x + block(x) where a block keeps the width
    dtype: str = "float32"
    quant: str = "none"  # set by compress.py in the runs it writes: int8 dense layers (model/quant.py)


def check(cfg) -> None:
    """Values the schema's types cannot rule out."""
    quant.check(cfg)
    if cfg.activation not in ACTIVATIONS:
        raise UserError(f"model.activation={cfg.activation} must be one of {', '.join(ACTIVATIONS)}")
    if cfg.norm not in NORMS:
        raise UserError(f"model.norm={cfg.norm} must be one of {', '.join(NORMS)}")
    if any(d <= 0 for d in cfg.hidden):
        raise UserError(f"model.hidden={list(cfg.hidden)} must hold positive widths ([] is a linear model)")


class MLP(nnx.Module):
    """[dense -> norm -> act -> dropout (+ input)] per hidden width, then a dense head."""

    def __init__(self, cfg, *, in_features: int | None = None, out_features: int | None = None,
                 num_classes: int | None = None, image_shape=None, rngs: nnx.Rngs):
        self.flatten = in_features is None  # image rows (N x H x W x C) are flattened
        F = math.prod(image_shape) if self.flatten else in_features
        self.activation, self.residual = cfg.activation, cfg.residual
        self.dtype = jnp.dtype(cfg.dtype)
        widths = [F, *cfg.hidden]
        linear = quant.linear(cfg)
        self.layers = nnx.List([linear(a, b, dtype=self.dtype, rngs=rngs) for a, b in zip(widths, widths[1:])])
        norm = {"layer": lambda d: nnx.LayerNorm(d, dtype=self.dtype, rngs=rngs),
                "batch": lambda d: nnx.BatchNorm(d, momentum=0.9, epsilon=1e-5, dtype=self.dtype, rngs=rngs)}
        self.norm_kind = cfg.norm
        self.norms = nnx.List([norm[cfg.norm](d) for d in cfg.hidden] if cfg.norm != "none" else [])
        self.head = linear(widths[-1], num_classes if num_classes is not None else out_features, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BF, *, key=None):
        """Outputs y_BO (regression) or logits_BY (classification), float32; `key` means training."""
        train = key is not None
        keys = list(jax.random.split(key, len(self.layers))) if train else [None] * len(self.layers)
        x = (x_BF.reshape(x_BF.shape[0], -1) if self.flatten else x_BF).astype(self.dtype)
        for i, (layer, k) in enumerate(zip(self.layers, keys)):
            h = layer(x)
            if self.norm_kind == "batch":
                h = self.norms[i](h, use_running_average=not train)
            elif self.norm_kind == "layer":
                h = self.norms[i](h)
            h = getattr(jax.nn, self.activation)(h)
            if k is not None:
                h = self.drop(h, rngs=k)
            x = x + h if self.residual and h.shape == x.shape else h
        return self.head(x).astype(jnp.float32)


Model = MLP
