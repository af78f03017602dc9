"""Masked language modelling (BERT): predict a sentence's hidden tokens from the tokens on both sides.

Of each training sentence's real tokens ([PAD], [CLS] and [SEP] never), 15% are chosen; of those 80%
become [MASK], 10% a random token and 10% stay as they are, and the loss and accuracy are over the
chosen positions only. The masks are a pure function of (seed, step): drawn for the global batch
with numpy's default_rng([seed, stream, step]) and sliced to this process's rows, like data/images.py's
augmentation. Validation masks are fixed by data.eval_seed and the batch index, so every evaluation
(and every run) scores the same positions; each batch weighs by its count of masked tokens.

With data.pack=k each training row holds k consecutive sentences of the epoch's order (RoBERTa's
packing, cut to data.seq_len): short sentences otherwise leave most of a row [PAD], computed for nothing.

Next-sentence prediction is left out: RoBERTa (Liu et al. 2019) found it did not help.
"""
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import optax

from data.wordpiece import CLS, MASK, PAD, SEP, SPECIALS
from tasks import Feed

READS = "sentences"
MASK_PROB, MASK_TOKEN, RANDOM_TOKEN = 0.15, 0.8, 0.1  # BERT's: chosen; of those [MASK], random (the rest kept)
_TRAIN_STREAM, _EVAL_STREAM = 5, 6


@dataclass
class Config:
    name: str = "mlm"


def model_dims(dims: dict) -> dict:
    """The masked LM predicts tokens: built without a classifier head."""
    return {k: v for k, v in dims.items() if k != "num_classes"}


def max_predictions(L: int) -> int:
    """Positions scored per sentence (BERT's max_predictions_per_seq): a quarter of L, room for 15% by chance."""
    return max(1, -(-L // 4))


def mask_batch(ids_BL: np.ndarray, seed: int, stream: int, index: int, batch_size: int, rows: slice,
               vocab_size: int) -> dict:
    """BERT's masking of this process's `rows` of the global batch `index`: {"x", "y", "w"}.

    Drawn for the global batch (batch_size rows) then sliced, so the masks are the same whatever the
    process count. At most max_predictions(L) positions per sentence are chosen (the first ones).
    """
    L = ids_BL.shape[1]
    rng = np.random.default_rng([seed, stream, index])
    pick_BL, kind_BL = rng.random((batch_size, L))[rows], rng.random((batch_size, L))[rows]
    random_BL = rng.integers(len(SPECIALS), max(vocab_size, len(SPECIALS) + 1), (batch_size, L))[rows]
    chosen_BL = (pick_BL < MASK_PROB) & (ids_BL != PAD) & (ids_BL != CLS) & (ids_BL != SEP)
    chosen_BL &= np.cumsum(chosen_BL, axis=1) <= max_predictions(L)
    x_BL = np.where(chosen_BL & (kind_BL < MASK_TOKEN), MASK, ids_BL)
    x_BL = np.where(chosen_BL & (kind_BL >= MASK_TOKEN) & (kind_BL < MASK_TOKEN + RANDOM_TOKEN), random_BL, x_BL)
    return {"x": x_BL.astype(np.int32), "y": ids_BL.astype(np.int32), "w": chosen_BL.astype(np.float32)}


def pack(ids_NL: np.ndarray, k: int) -> np.ndarray:
    """Rows of k consecutive sentences each: [CLS] a [SEP] b [SEP] ..., cut to L and padded with [PAD]."""
    N, L = ids_NL.shape
    out_BL = np.full((N // k, L), PAD, np.int32)
    for r in range(N // k):
        row = [ids_NL[r * k]] + [ids_NL[r * k + j, 1:] for j in range(1, k)]  # one [CLS] per row
        row = np.concatenate([s[s != PAD] for s in row])[:L]
        out_BL[r, :len(row)] = row
    return out_BL


def feed(source, data_cfg, *, seed: int, batch_size: int, rows: slice, eval_batches: int) -> Feed:
    """The source's sentences (data.pack of them per training row), masked; labels are not read."""
    V, k = source.dims["vocab_size"], data_cfg.get("pack", 1)
    mine = range(batch_size)[rows]

    def train_batch(step):
        # Global row r holds sentences r*k .. r*k+k-1 of a global batch of B*k: a pure function of (seed, step).
        ids_NL = source.train_batch(seed, step, batch_size * k, slice(mine.start * k, mine.stop * k))["x"]
        return mask_batch(pack(ids_NL, k) if k > 1 else ids_NL, seed, _TRAIN_STREAM, step, batch_size, rows, V)

    def eval_batch(i):
        batch, _ = source.eval_batch(i, batch_size, slice(None))  # the whole batch: its weight counts every row
        out = mask_batch(batch["x"], data_cfg.eval_seed, _EVAL_STREAM, i, batch_size, slice(None), V)
        out["w"] *= batch["mask"][:, None]  # padding rows score nothing
        return {k: v[rows] for k, v in out.items()}, float(out["w"].sum())

    return Feed(train_batch, eval_batch, source.eval_count(batch_size, eval_batches), k)


def _predicted(model, batch, key):
    """(logits_BPV, targets_BP, weights_BP) at the masked positions only (the head runs on those alone)."""
    w_BL = batch["w"]
    P = max_predictions(w_BL.shape[1])
    # The P chosen positions of each row first (mask_batch chose at most P); the rest weigh 0.
    pos_BP = jnp.argsort(-w_BL, axis=1, stable=True)[:, :P]
    w_BP, y_BP = (jnp.take_along_axis(a, pos_BP, axis=1) for a in (w_BL, batch["y"]))
    return model(batch["x"], key=key, positions_BP=pos_BP).astype(jnp.float32), y_BP, w_BP


def outputs(model, batch, key):
    """(logits_NV, targets_N, weights_N): what a distilled student matches (core/distill.py)."""
    logits_BPV, y_BP, w_BP = _predicted(model, batch, key)
    return logits_BPV.reshape(-1, logits_BPV.shape[-1]), y_BP.reshape(-1), w_BP.reshape(-1)


def loss(model, batch, key):
    """Cross-entropy and accuracy over the masked positions."""
    logits_BPV, y_BP, w_BP = _predicted(model, batch, key)
    n = jnp.maximum(w_BP.sum(), 1.0)
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits_BPV, y_BP) * w_BP).sum() / n
    accuracy = ((logits_BPV.argmax(-1) == y_BP) * w_BP).sum() / n
    return loss, {"loss": loss, "accuracy": accuracy}
