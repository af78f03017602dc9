"""Multi-layer LSTM / GRU in Flax NNX, time handled by `jax.lax.scan`: a char LM, a sequence regressor or
a text classifier.

Shape key: B batch, L length, H hidden, K layer input width (H, or 2H bidirectional), G gates x H
(4H for LSTM, 3H for GRU), N layers, V vocab (LM), F input features / O outputs (regression),
Y classes.

Inputs go through an embedding (tokens) or a dense layer (real-valued features) to width K, so
every layer has the same shapes and the N layers are stored stacked (N, ...), as the transformer's
blocks are. Each layer's input projection runs as one big matmul over the whole sequence; only the
recurrent matmul sits inside the scan. The gate equations and init are PyTorch's (cuDNN's GRU
variant), so numbers can be compared with `torch.nn.LSTM`/`GRU`.

A text classifier (built with `num_classes`: data=text_classify) reads [PAD]-padded token rows: at a
[PAD] the carry is held, so padding changes no real token's output and a backward layer
(`bidirectional`) starts at each row's last real token. The real tokens' outputs are pooled (mean,
or `last`: the final states) into a dense head. Dropout also follows the embedding there, and
`word_dropout` turns word tokens into [UNK] in training (the Flax SST-2 LSTM example's regularisers).

The recurrent carry plays the role of the transformer's KV cache: `model(x, cache=carry)` returns
(outputs, carry), so the sampler in core/sampler.py drives both families.
"""
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from errors import UserError
from model.wordpiece_ids import PAD_ID, UNK_ID, word_dropout

GATES = {"lstm": 4, "gru": 3}
TASKS = ("lm", "regress", "classify")
INPUTS = ("text", "sequences")  # tokens (LM, text classes) or real-valued sequences (regression)
POOLINGS = ("mean", "last")


@dataclass
class Config:
    family: str = "rnn"
    cell: str = "lstm"  # lstm | gru
    n_layers: int = 2
    d_hidden: int = 256
    dropout: float = 0.0  # between layers and before the head (a text classifier's: after the embedding too)
    # Text classifiers only (task=classify): a second stack reads each row backwards, its outputs
    # concatenated to the forward ones; how the real tokens' outputs become one vector; and the
    # training-only share of word tokens turned into [UNK].
    bidirectional: bool = False
    pooling: str = "mean"  # mean | last
    word_dropout: float = 0.0
    dtype: str = "float32"


def check(cfg) -> None:
    """Values the schema's types cannot rule out."""
    if cfg.cell not in GATES:
        raise UserError(f"model.cell={cfg.cell} must be 'lstm' or 'gru'")
    if cfg.n_layers <= 0 or cfg.d_hidden <= 0:
        raise UserError("model.n_layers and model.d_hidden must be positive")
    if cfg.pooling not in POOLINGS:
        raise UserError(f"model.pooling={cfg.pooling} must be mean or last")
    if not 0.0 <= cfg.word_dropout < 1.0:
        raise UserError(f"model.word_dropout={cfg.word_dropout} must be in [0, 1)")


def check_task(cfg, task: str) -> None:
    """The text-classifier options are refused elsewhere rather than ignored (and named in run dirs)."""
    if task == "classify":
        return
    for key, off in (("bidirectional", False), ("pooling", "mean"), ("word_dropout", 0.0)):
        if cfg.get(key, off) != off:  # a bidirectional LM's outputs would have read the tokens they predict
            raise UserError(f"model.{key} is for text classifiers (task=classify); drop it for task={task}")


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


def _masked(cell):
    """`cell` that holds the carry where a row is [PAD] (m_B false): padding never reaches a real token."""
    def step(carry, inputs, w, b):
        xproj_BG, m_B = inputs
        new, y_BH = cell(carry, xproj_BG, w, b)
        return jax.tree.map(lambda n, o: jnp.where(m_B[:, None], n, o), new, carry), y_BH
    return step


class RNN(nnx.Module):
    """Embedding or input dense -> N recurrent layers (dropout between) -> dense head (per step, or on the
    pooled outputs of a classifier)."""

    def __init__(self, cfg, *, vocab_size: int | None = None, in_features: int | None = None,
                 out_features: int | None = None, num_classes: int | None = None, rngs: nnx.Rngs):
        N, H = cfg.n_layers, cfg.d_hidden
        G = GATES[cfg.cell] * H
        self.is_classifier = num_classes is not None
        self.is_lm = vocab_size is not None and not self.is_classifier
        bidirectional = cfg.get("bidirectional", False)
        if bidirectional and not self.is_classifier:  # a step's output would have read the tokens it predicts
            raise UserError("model.bidirectional=true reads each row backwards too: it is for task=classify only")
        K = H * (2 if bidirectional else 1)
        self.cell, self.n_layers, self.d_hidden, self.bidirectional = cfg.cell, N, H, bidirectional
        self.pooling, self.word_dropout = cfg.get("pooling", "mean"), cfg.get("word_dropout", 0.0)
        self.dtype = jnp.dtype(cfg.dtype)
        if vocab_size is not None:
            self.embed = nnx.Embed(vocab_size, K, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        else:
            self.embed = nnx.Linear(in_features, K, rngs=rngs)
        bound = H ** -0.5  # PyTorch's U(-1/sqrt(H), 1/sqrt(H)) for every recurrent weight and bias
        uniform = lambda *shape: nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))  # noqa: E731
        # One set of stacked weights per direction: w_in_NHG ... alone (the names of runs saved before
        # `bidirectional`), or w_in_fwd_NKG ... and w_in_bwd_NKG ... with bidirectional.
        self._dirs = ("_fwd", "_bwd") if bidirectional else ("",)
        for d in self._dirs:
            setattr(self, f"w_in{d}_N{'K' if d else 'H'}G", uniform(N, K, G))
            setattr(self, f"w_rec{d}_NHG", uniform(N, H, G))
            setattr(self, f"b_in{d}_NG", uniform(N, G))
            setattr(self, f"b_rec{d}_NG", uniform(N, G))
        out = num_classes if self.is_classifier else vocab_size if self.is_lm else out_features
        self.head = nnx.Linear(K, out, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)

    def init_cache(self, batch: int):
        """Zero carry, stacked over layers: (h_NBH, c_NBH)."""
        zeros = jnp.zeros((self.n_layers, batch, self.d_hidden), self.dtype)
        return zeros, zeros

    def _layer(self, i, x_BLK, carry, m_BL=None, backward=False):
        """((h_BH, c_BH), y_BLH): layer i over the sequence, from `carry`; with m_BL the carry skips [PAD]."""
        d = self._dirs[-1] if backward else self._dirs[0]
        w_in, w_rec, b_in, b_rec = (getattr(self, name)[i].astype(self.dtype) for name in
                                    (f"w_in{d}_N{'K' if d else 'H'}G", f"w_rec{d}_NHG", f"b_in{d}_NG", f"b_rec{d}_NG"))
        xproj_LBG = (x_BLK @ w_in + b_in).swapaxes(0, 1)
        cell = CELLS[self.cell]
        if m_BL is None:
            step = lambda c, xp: cell(c, xp, w_rec, b_rec)  # noqa: E731
            carry, y_LBH = jax.lax.scan(step, carry, xproj_LBG)
        else:
            masked = _masked(cell)
            step = lambda c, xm: masked(c, xm, w_rec, b_rec)  # noqa: E731
            carry, y_LBH = jax.lax.scan(step, carry, (xproj_LBG, m_BL.swapaxes(0, 1)), reverse=backward)
        return carry, y_LBH.swapaxes(0, 1)

    def __call__(self, x_BL, *, key=None, cache=None, pos=0):
        """Outputs_BLV (LM logits), _BLO (regression) or logits_BY (classifier) for inputs x_BL (tokens)
        or x_BLF (features).

        Every call starts from the zero carry unless `cache` (a carry) is passed; then it returns
        (outputs, carry). `pos` is accepted for the sampler's interface and unused: an RNN has no
        positions. `key` enables dropout (training).
        """
        if self.is_classifier:
            return self._classify(x_BL, key)
        keys = [None] * (self.n_layers + 1) if key is None else list(jax.random.split(key, self.n_layers + 1))
        B = x_BL.shape[0]
        x_BLH = self.embed(x_BL).astype(self.dtype)
        h0_NBH, c0_NBH = self.init_cache(B) if cache is None else cache
        hs, cs = [], []
        for i in range(self.n_layers):
            if i > 0 and keys[i] is not None:
                x_BLH = self.drop(x_BLH, rngs=keys[i])
            (h_BH, c_BH), x_BLH = self._layer(i, x_BLH, (h0_NBH[i], c0_NBH[i]))
            hs.append(h_BH)
            cs.append(c_BH)
        if keys[-1] is not None:
            x_BLH = self.drop(x_BLH, rngs=keys[-1])
        out = self.head(x_BLH.astype(jnp.float32))
        return out if cache is None else (out, (jnp.stack(hs), jnp.stack(cs)))

    def _classify(self, x_BL, key):
        """logits_BY from [PAD]-padded token rows: the real tokens' outputs pooled into the head."""
        m_BL = x_BL != PAD_ID
        keys = [None] * (self.n_layers + 2) if key is None else list(jax.random.split(key, self.n_layers + 2))
        if keys[0] is not None and self.word_dropout > 0:
            x_BL = word_dropout(x_BL, keys[0], self.word_dropout, UNK_ID)
        x_BLK = self.embed(x_BL).astype(self.dtype)
        B = x_BL.shape[0]
        zero = (jnp.zeros((B, self.d_hidden), self.dtype),) * 2
        finals = []
        for i in range(self.n_layers):
            if keys[i + 1] is not None:  # after the embedding and between layers
                x_BLK = self.drop(x_BLK, rngs=keys[i + 1])
            (h_BH, _), y_BLH = self._layer(i, x_BLK, zero, m_BL)
            outs, finals = [y_BLH], [h_BH]
            if self.bidirectional:
                (hb_BH, _), yb_BLH = self._layer(i, x_BLK, zero, m_BL, backward=True)
                outs, finals = [y_BLH, yb_BLH], [h_BH, hb_BH]
            x_BLK = jnp.concatenate(outs, axis=-1)
        if self.pooling == "last":  # forward state at the last real token, backward at the first
            pooled_BK = jnp.concatenate(finals, axis=-1).astype(jnp.float32)
        else:  # in float32, as the encoder pools: a bfloat16 sum over a long row loses its low bits
            w_BL1 = m_BL[..., None].astype(jnp.float32)
            pooled_BK = (x_BLK.astype(jnp.float32) * w_BL1).sum(1) / jnp.maximum(w_BL1.sum(1), 1.0)
        if keys[-1] is not None:
            pooled_BK = self.drop(pooled_BK, rngs=keys[-1])
        return self.head(pooled_BK)


Model = RNN
