"""Multi-layer LSTM / GRU in Flax NNX, time handled by `jax.lax.scan`; a char LM or a sequence regressor.

Shape key: B batch, L length, H hidden, G gates x H (4H for LSTM, 3H for GRU), N layers,
V vocab (LM), F input features / O outputs (regression).

Inputs go through an embedding (tokens) or a dense layer (real-valued features) to width H, so
every layer has the same shapes and the N layers are stored stacked (N, ...), as the transformer's
blocks are. Each layer's input projection runs as one big matmul over the whole sequence; only the
recurrent matmul sits inside the scan. The gate equations and init are PyTorch's (cuDNN's GRU
variant), so numbers can be compared with `torch.nn.LSTM`/`GRU`.

The recurrent carry plays the role of the transformer's KV cache: `model(x, cache=carry)` returns
(outputs, carry), so the sampler in core/sampler.py drives both families.
"""
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from errors import UserError

GATES = {"lstm": 4, "gru": 3}
TASKS = ("lm", "regress")
INPUTS = ("text", "sequences")  # tokens (LM) or real-valued sequences (regression)


@dataclass
class Config:
    family: str = "rnn"
    cell: str = "lstm"  # lstm | gru
    n_layers: int = 2
    d_hidden: int = 256
    dropout: float = 0.0  # between layers and before the head
    dtype: str = "float32"


def check(cfg) -> None:
    """Values the schema's types cannot rule out."""
    if cfg.cell not in GATES:
        raise UserError(f"model.cell={cfg.cell} must be 'lstm' or 'gru'")
    if cfg.n_layers <= 0 or cfg.d_hidden <= 0:
        raise UserError("model.n_layers and model.d_hidden must be positive")


def lstm_cell(carry, xproj_BG, w_rec_HG, b_rec_G):
    h_BH, c_BH = carry
    i, f, g, o = jnp.split(xproj_BG + h_BH @ w_rec_HG + b_rec_G, 4, axis=-1)
    c_BH = jax.nn.sigmoid(f) * c_BH + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_BH = jax.nn.sigmoid(o) * jnp.tanh(c_BH)
    return (h_BH, c_BH), h_BH


def gru_cell(carry, xproj_BG, w_rec_HG, b_rec_G):
    h_BH, c_BH = carry  # c is unused by the GRU; kept so both cells share one carry layout
    x_r, x_z, x_n = jnp.split(xproj_BG, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(h_BH @ w_rec_HG + b_rec_G, 3, axis=-1)
    r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    h_BH = (1.0 - z) * n + z * h_BH
    return (h_BH, c_BH), h_BH


CELLS = {"lstm": lstm_cell, "gru": gru_cell}


class RNN(nnx.Module):
    """Embedding or input dense -> N recurrent layers (dropout between) -> dense head."""

    def __init__(self, cfg, *, vocab_size: int | None = None, in_features: int | None = None,
                 out_features: int | None = None, rngs: nnx.Rngs):
        N, H = cfg.n_layers, cfg.d_hidden
        G = GATES[cfg.cell] * H
        self.cell, self.n_layers, self.d_hidden = cfg.cell, N, H
        self.dtype = jnp.dtype(cfg.dtype)
        self.is_lm = vocab_size is not None
        if self.is_lm:
            self.embed = nnx.Embed(vocab_size, H, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        else:
            self.embed = nnx.Linear(in_features, H, rngs=rngs)
        bound = H ** -0.5  # PyTorch's U(-1/sqrt(H), 1/sqrt(H)) for every recurrent weight and bias
        uniform = lambda *shape: nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))  # noqa: E731
        self.w_in_NHG, self.w_rec_NHG = uniform(N, H, G), uniform(N, H, G)
        self.b_in_NG, self.b_rec_NG = uniform(N, G), uniform(N, G)
        self.head = nnx.Linear(H, vocab_size if self.is_lm else out_features, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)

    def init_cache(self, batch: int):
        """Zero carry, stacked over layers: (h_NBH, c_NBH)."""
        zeros = jnp.zeros((self.n_layers, batch, self.d_hidden), self.dtype)
        return zeros, zeros

    def __call__(self, x_BL, *, key=None, cache=None, pos=0):
        """Outputs_BLV (LM logits) or _BLO (regression) for inputs x_BL (tokens) or x_BLF (features).

        Every call starts from the zero carry unless `cache` (a carry) is passed; then it returns
        (outputs, carry). `pos` is accepted for the sampler's interface and unused: an RNN has no
        positions. `key` enables dropout (training).
        """
        keys = [None] * (self.n_layers + 1) if key is None else list(jax.random.split(key, self.n_layers + 1))
        B = x_BL.shape[0]
        x_BLH = self.embed(x_BL).astype(self.dtype)
        h0_NBH, c0_NBH = self.init_cache(B) if cache is None else cache
        cell = CELLS[self.cell]
        hs, cs = [], []
        for i in range(self.n_layers):
            if i > 0 and keys[i] is not None:
                x_BLH = self.drop(x_BLH, rngs=keys[i])
            w_in, w_rec = self.w_in_NHG[i].astype(self.dtype), self.w_rec_NHG[i].astype(self.dtype)
            xproj_LBG = (x_BLH @ w_in + self.b_in_NG[i].astype(self.dtype)).swapaxes(0, 1)
            step = lambda carry, xp, w=w_rec, b=self.b_rec_NG[i].astype(self.dtype): cell(carry, xp, w, b)  # noqa: E731
            (h_BH, c_BH), y_LBH = jax.lax.scan(step, (h0_NBH[i], c0_NBH[i]), xproj_LBG)
            x_BLH = y_LBH.swapaxes(0, 1)
            hs.append(h_BH)
            cs.append(c_BH)
        if keys[-1] is not None:
            x_BLH = self.drop(x_BLH, rngs=keys[-1])
        out = self.head(x_BLH.astype(jnp.float32))
        return out if cache is None else (out, (jnp.stack(hs), jnp.stack(cs)))


Model = RNN
