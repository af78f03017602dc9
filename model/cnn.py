"""Configurable CNN image classifier in Flax NNX: conv blocks, then dense layers and a classifier head.

Shape key: B batch, H height, W width, C channels, F dense width, Y classes.

Training mode is "a dropout key was passed": batch norm then normalises with the batch's statistics
and updates its running averages (nnx.BatchStat, kept in the train state's `rest`); without a key
it uses the running averages, so eval and reload scripts are deterministic.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from core.errors import UserError


def conv_output_size(size: int, kernel: int, stride: int, padding: str, pool: bool) -> int:
    """Spatial size after one conv (and its optional 2x2 max-pool)."""
    size = -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1
    return size // 2 if pool else size


class CNN(nnx.Module):
    """conv(k x k, stride) -> [batch norm] -> act -> [2x2 max-pool], repeated; flatten; dense; head."""

    TASKS = ("classify",)  # the tasks (core/task.py) this family can train on

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
        self.dense = nnx.List([nnx.Linear(a, b, dtype=self.dtype, rngs=rngs) for a, b in zip(widths, widths[1:])])
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)
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
