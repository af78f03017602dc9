"""Masked language modelling (BERT): predict a sentence's hidden tokens from the tokens on both sides.

Of each training sentence's real tokens ([PAD], [CLS] and [SEP] never), 15% are chosen (task.mask_prob);
of those 80% become [MASK], 10% a random token and 10% stay as they are, and the loss and accuracy are
over the chosen positions only. The masks are a pure function of (seed, step): drawn for the global batch
with numpy's default_rng([seed, stream, step]) and sliced to this process's rows, like data/images.py's
augmentation. Validation masks are fixed by data.eval_seed and the batch index, so every evaluation
(and every run) scores the same positions; each batch weighs by its count of masked tokens.

With data.pack=k each training row holds k consecutive sentences of the epoch's order (RoBERTa's
packing, cut to data.seq_len): short sentences otherwise leave most of a row [PAD], computed for nothing.

task.nsp=true adds BERT's next-sentence prediction (off by default: RoBERTa, Liu et al. 2019, found it
did not help). Each row is [CLS] A [SEP] B [SEP] with segment ids 0 then 1: A a sentence of the epoch's
order, B the sentence after it half of the time and any other sentence otherwise (the coin and the
other sentence drawn from (seed, step) like the masks; validation pairs fixed by data.eval_seed). The
sentences are the source's in order, so read a text whose lines follow each other (data.format=lines).
The loss is the masked-LM loss plus the pair's cross-entropy; `mlm_loss` is logged beside `loss`.
"""
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import optax

from data import examples
from data.wordpiece import CLS, MASK, PAD, SEP, SPECIALS
from errors import UserError
from tasks import WEIGHT, Feed

READS = "sentences"
BASELINES = ("baseline_unigram_loss",)  # not the labels' majority accuracy a labelled TSV also gives
MASK_PROB, MASK_TOKEN, RANDOM_TOKEN = 0.15, 0.8, 0.1  # BERT's: chosen; of those [MASK], random (the rest kept)
_TRAIN_STREAM, _EVAL_STREAM, _PAIR_TRAIN_STREAM, _PAIR_EVAL_STREAM = 5, 6, 7, 8
_NSP_COUNTS = ("val_nsp_rows", "val_nsp_correct", "val_nsp_loss_sum")


@dataclass
class Config:
    name: str = "mlm"
    nsp: bool = False  # next-sentence prediction on consecutive sentences (needs model.type_vocab=2)
    mask_prob: float = MASK_PROB  # share of real tokens chosen (Wettig et al. 2023 argue for up to 40%)


class Sentences:
    """A source of sentences with the task's masking rate (task.mask_prob) attached for its feed."""

    def __init__(self, source, mask_prob: float = MASK_PROB):
        self.source, self.mask_prob = source, mask_prob

    def __getattr__(self, name):  # everything else is the source's
        return getattr(self.source, name)


class NextSentences(Sentences):
    """A source of sentences in order, read as next-sentence pairs (task.nsp): its model has the NSP head."""

    @property
    def dims(self) -> dict:
        return {**self.source.dims, "nsp": True}


def prepare(source, task_cfg):
    """The source as this task's settings read it: its masking rate, next-sentence pairs with task.nsp."""
    p = task_cfg.get("mask_prob", MASK_PROB)
    if not 0 < p < 1:
        raise UserError(f"task.mask_prob={p} is the share of tokens masked: use a value in (0, 1), e.g. 0.15")
    if not task_cfg.get("nsp"):
        return Sentences(source, p)
    if min(len(source.x_train), len(source.x_val)) < 2:
        raise UserError("task.nsp=true pairs each sentence with the next: the training and validation splits need "
                        "2 sentences or more each")
    return NextSentences(source, p)


def model_dims(dims: dict) -> dict:
    """The masked LM predicts tokens: built without a classifier head."""
    return {k: v for k, v in dims.items() if k != "num_classes"}


def pairs(x_NL: np.ndarray, first_B: np.ndarray, rng: np.random.Generator, L: int) -> dict:
    """Rows [CLS] A [SEP] B [SEP] (cut to L, the longer sentence first) of the sentences first_B and,
    by a fair coin from `rng`, the one after each (is_next 1) or another drawn uniformly (is_next 0).

    {"ids": B x L, "segments": B x L (0 for [CLS] A [SEP], 1 for B [SEP], 0 on [PAD]), "is_next": B}.
    """
    N, B = len(x_NL), len(first_B)
    is_next_B = rng.random(B) < 0.5
    other_B = rng.integers(0, N - 1, B)
    other_B += other_B >= first_B + 1  # any sentence but the true next one
    second_B = np.where(is_next_B, first_B + 1, other_B)
    ids_BL, seg_BL = np.full((B, L), PAD, np.int32), np.zeros((B, L), np.int32)
    for r in range(B):
        a, b = (x_NL[i][1:][x_NL[i][1:] != PAD][:-1] for i in (first_B[r], second_B[r]))  # tokens between [CLS] and [SEP]
        while len(a) + len(b) > L - 3:  # BERT's truncate_seq_pair
            a, b = (a[:-1], b) if len(a) >= len(b) else (a, b[:-1])
        row = np.concatenate([[CLS], a, [SEP], b, [SEP]])
        ids_BL[r, :len(row)], seg_BL[r, len(a) + 2:len(row)] = row, 1
    return {"ids": ids_BL, "segments": seg_BL, "is_next": is_next_B.astype(np.int32)}


def max_predictions(L: int, mask_prob: float = MASK_PROB) -> int:
    """Positions scored per sentence (BERT's max_predictions_per_seq): 5/3 of the expected count (a quarter
    of L at 15%), room for the chance excess."""
    return max(1, min(L, int(np.ceil(L * mask_prob * 5 / 3 - 1e-9))))  # 1e-9: 64 * 0.15 * 5/3 is 16.000...04


def mask_batch(ids_BL: np.ndarray, seed: int, stream: int, index: int, batch_size: int, rows: slice,
               vocab_size: int, mask_prob: float = MASK_PROB) -> dict:
    """BERT's masking of this process's `rows` of the global batch `index`: {"x", "y", "w", "pos"}.

    Drawn for the global batch (batch_size rows) then sliced, so the masks are the same whatever the
    process count. At most P = max_predictions(L, mask_prob) positions per sentence are chosen (the first
    ones); pos_BP lists them first, then unchosen ones (weight 0), so the head runs on P positions only.
    """
    L = ids_BL.shape[1]
    rng = np.random.default_rng([seed, stream, index])
    pick_BL, kind_BL = rng.random((batch_size, L))[rows], rng.random((batch_size, L))[rows]
    random_BL = rng.integers(len(SPECIALS), max(vocab_size, len(SPECIALS) + 1), (batch_size, L))[rows]
    chosen_BL = (pick_BL < mask_prob) & (ids_BL != PAD) & (ids_BL != CLS) & (ids_BL != SEP)
    P = max_predictions(L, mask_prob)
    chosen_BL &= np.cumsum(chosen_BL, axis=1) <= P
    x_BL = np.where(chosen_BL & (kind_BL < MASK_TOKEN), MASK, ids_BL)
    x_BL = np.where(chosen_BL & (kind_BL >= MASK_TOKEN) & (kind_BL < MASK_TOKEN + RANDOM_TOKEN), random_BL, x_BL)
    pos_BP = np.argsort(~chosen_BL, axis=1, kind="stable")[:, :P]
    return {"x": x_BL.astype(np.int32), "y": ids_BL.astype(np.int32), "w": chosen_BL.astype(np.float32),
            "pos": pos_BP.astype(np.int32)}


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
    p = getattr(source, "mask_prob", MASK_PROB)  # set by prepare (task.mask_prob)
    if data_cfg.get("group_by_length", 0):
        raise UserError("data.group_by_length is for task=classify; task=mlm fills its rows with data.pack instead")
    mine = range(batch_size)[rows]
    if isinstance(source, NextSentences):
        if k > 1:
            raise UserError(f"task.nsp=true makes each row a pair of sentences; drop data.pack={k} (use 1)")
        return _pair_feed(source, data_cfg, p, seed=seed, batch_size=batch_size, rows=rows, eval_batches=eval_batches)

    def train_batch(step):
        # Global row r holds sentences r*k .. r*k+k-1 of a global batch of B*k: a pure function of (seed, step).
        ids_NL = source.train_batch(seed, step, batch_size * k, slice(mine.start * k, mine.stop * k))["x"]
        return mask_batch(pack(ids_NL, k) if k > 1 else ids_NL, seed, _TRAIN_STREAM, step, batch_size, rows, V, p)

    def eval_batch(i):
        batch, _ = source.eval_batch(i, batch_size, slice(None))  # the whole batch: its weight counts every row
        out = mask_batch(batch["x"], data_cfg.eval_seed, _EVAL_STREAM, i, batch_size, slice(None), V, p)
        out["w"] *= batch["mask"][:, None]  # padding rows score nothing
        return {k: v[rows] for k, v in out.items()}, float(out["w"].sum())

    return Feed(train_batch, eval_batch, source.eval_count(batch_size, eval_batches), k)


def _pair_feed(source, data_cfg, mp: float, *, seed: int, batch_size: int, rows: slice, eval_batches: int) -> Feed:
    """Next-sentence pairs, masked: the first sentences in the epoch order (data/examples.py), pairs of
    the global batch drawn from (seed, step) and sliced to this process's rows."""
    V, L = source.dims["vocab_size"], source.x_train.shape[1]

    def train_batch(step):
        first_B = examples.train_indices(len(source.x_train) - 1, seed, step, batch_size)  # any with a next one
        p = pairs(source.x_train, first_B, np.random.default_rng([seed, _PAIR_TRAIN_STREAM, step]), L)
        out = mask_batch(p["ids"][rows], seed, _TRAIN_STREAM, step, batch_size, rows, V, mp)
        return out | {"segments": p["segments"][rows], "is_next": p["is_next"][rows],
                      "row_w": np.ones(len(out["x"]), np.float32)}

    n_first = len(source.x_val) - 1

    def eval_batch(i):
        first_B, mask_B, _ = examples.val_indices(n_first, i, batch_size, slice(None))
        p = pairs(source.x_val, first_B, np.random.default_rng([data_cfg.eval_seed, _PAIR_EVAL_STREAM, i]), L)
        out = mask_batch(p["ids"], data_cfg.eval_seed, _EVAL_STREAM, i, batch_size, slice(None), V, mp)
        out["w"] *= mask_B[:, None]
        out |= {"segments": p["segments"], "is_next": p["is_next"], "row_w": mask_B}
        return {k: v[rows] for k, v in out.items()}, float(out["w"].sum())

    return Feed(train_batch, eval_batch, examples.eval_count(n_first, batch_size, eval_batches), 1)


def _scored(batch):
    """(positions_BP, targets_BP, weights_BP): the chosen positions of each row first (mask_batch), the rest weigh 0."""
    pos_BP = batch["pos"]
    return (pos_BP, *(jnp.take_along_axis(a, pos_BP, axis=1) for a in (batch["y"], batch["w"])))


def _predicted(model, batch, key):
    """(logits_BPV, targets_BP, weights_BP) at the masked positions only (the head runs on those alone)."""
    pos_BP, y_BP, w_BP = _scored(batch)
    return model(batch["x"], key=key, positions_BP=pos_BP).astype(jnp.float32), y_BP, w_BP


def outputs(model, batch, key):
    """(logits_NV, targets_N, weights_N): what a distilled student matches (core/distill.py)."""
    logits_BPV, y_BP, w_BP = _predicted(model, batch, key)
    return logits_BPV.reshape(-1, logits_BPV.shape[-1]), y_BP.reshape(-1), w_BP.reshape(-1)


def loss(model, batch, key):
    """Cross-entropy and accuracy over the masked positions (plus next-sentence prediction on pairs)."""
    if "is_next" in batch:
        return _loss_with_nsp(model, batch, key)
    logits_BPV, y_BP, w_BP = _predicted(model, batch, key)
    n = jnp.maximum(w_BP.sum(), 1.0)
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits_BPV, y_BP) * w_BP).sum() / n
    accuracy = ((logits_BPV.argmax(-1) == y_BP) * w_BP).sum() / n
    return loss, {"loss": loss, "accuracy": accuracy, WEIGHT: w_BP.sum()}  # shards pool by masked tokens


def _loss_with_nsp(model, batch, key):
    """Masked-LM plus next-sentence loss. Evaluation batches weigh by masked tokens, and the pair metrics
    are per row: they go out as sums over rows per masked token, which `finish` turns into exact means."""
    pos_BP, y_BP, w_BP = _scored(batch)
    logits_BPV, nsp_B2 = model.pretrain(batch["x"], batch["segments"], pos_BP, key=key)
    n = jnp.maximum(w_BP.sum(), 1.0)
    mlm_loss = (optax.softmax_cross_entropy_with_integer_labels(logits_BPV, y_BP) * w_BP).sum() / n
    accuracy = ((logits_BPV.argmax(-1) == y_BP) * w_BP).sum() / n
    row_B = batch["row_w"]
    nsp_loss_B = optax.softmax_cross_entropy_with_integer_labels(nsp_B2, batch["is_next"])
    correct_B = (nsp_B2.argmax(-1) == batch["is_next"]).astype(jnp.float32)
    rows = jnp.maximum(row_B.sum(), 1.0)
    nsp_loss = (nsp_loss_B * row_B).sum() / rows
    # Shards pool by masked tokens: exact for the masked-LM terms and the eval sums below; the training
    # NSP term, a mean over rows, is then weighted by masked tokens rather than rows (nearly proportional).
    metrics = {"loss": mlm_loss + nsp_loss, "accuracy": accuracy, "mlm_loss": mlm_loss, WEIGHT: w_BP.sum()}
    if key is None:
        metrics |= {"nsp_rows": row_B.sum() / n, "nsp_correct": (correct_B * row_B).sum() / n,
                    "nsp_loss_sum": (nsp_loss_B * row_B).sum() / n}
    else:
        metrics |= {"nsp_loss": nsp_loss, "nsp_accuracy": (correct_B * row_B).sum() / rows}
    return mlm_loss + nsp_loss, metrics


def finish(val: dict, meta: dict) -> dict:
    """With next-sentence prediction: val_nsp_loss and val_nsp_accuracy per pair, val_loss the sum of both losses."""
    if "val_nsp_rows" not in val:
        return val
    rows = max(val["val_nsp_rows"], 1e-12)
    out = {k: v for k, v in val.items() if k not in _NSP_COUNTS}
    out |= {"val_nsp_loss": val["val_nsp_loss_sum"] / rows, "val_nsp_accuracy": val["val_nsp_correct"] / rows}
    out["val_loss"] = out["val_mlm_loss"] + out["val_nsp_loss"]
    return out
