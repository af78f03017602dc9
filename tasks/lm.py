"""Next-token language modelling: cross-entropy of every position's prediction of the token after it."""
import math
from dataclasses import dataclass

import jax.numpy as jnp
import optax

from data import text
from tasks import Feed

READS = "tokens"


@dataclass
class Config:
    name: str = "lm"


def _split(window_BL1) -> dict:
    return {"x": window_BL1[:, :-1], "y": window_BL1[:, 1:]}  # targets: the inputs shifted by one


def feed(corpus, data_cfg, *, seed: int, batch_size: int, rows: slice, eval_batches: int) -> Feed:
    """Windows of seq_len + 1 tokens: inputs x_BL and next-token targets y_BL."""
    L1 = data_cfg.seq_len + 1
    text.check_fits(corpus, L1)
    return Feed(lambda step: _split(text.train_windows(corpus, seed, step, batch_size, L1, rows)),
                lambda i: (_split(text.eval_windows(corpus, data_cfg.eval_seed, i, batch_size, L1, rows)), batch_size),
                eval_batches, data_cfg.seq_len)


def finish(val: dict, meta: dict) -> dict:
    """Adds val_bpb: nats per token x tokens per UTF-8 byte of the validation text / ln 2, one scale
    for every tokenizer (characters, BPE, an imported model's)."""
    ratio = meta.get("val_tokens_per_byte")
    if ratio:
        val["val_bpb"] = val["val_loss"] * ratio / math.log(2)
    return val


def outputs(model, batch, key):
    """(logits_NV, targets_N, weights_N) over every position: what a distilled student matches (core/distill.py)."""
    logits_BLV = model(batch["x"], key=key).astype(jnp.float32)
    return logits_BLV.reshape(-1, logits_BLV.shape[-1]), batch["y"].reshape(-1), jnp.ones(batch["y"].size)


def loss(model, batch, key):
    logits_BLV = model(batch["x"], key=key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32), batch["y"]).mean()
    return loss, {"loss": loss}
