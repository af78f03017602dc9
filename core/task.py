"""Tasks: a loss plus metrics, wired to the data source that feeds it. The loop does not care which.

`data.kind` picks the task (text -> next-token LM, images -> classification, series -> regression);
`model.family` picks the module, whose class must list the task in its TASKS. A loss function is
`(model, batch, key) -> (loss, metrics)`: `key` set means training (dropout, batch statistics).
Metrics are means over the batch's real examples (eval batches may carry a `mask` of padding).
"""
from dataclasses import dataclass
from typing import Callable

import jax.numpy as jnp
import optax

from core import mesh as mesh_lib

TASK_OF_DATA = {"text": "lm", "images": "classify", "series": "regress"}


@dataclass
class Task:
    kind: str  # lm | classify | regress
    loss_fn: Callable  # (model, batch, key) -> (loss, metrics)
    dims: dict  # the model constructor's data-dependent arguments (JSON types: they go into the checkpoint)
    meta: dict  # what reload scripts need besides the config (vocab; class count and normalisation)
    train_batch: Callable  # step -> this process's rows of the global batch
    eval_batch: Callable  # i -> (this process's rows of validation batch i, its count of real examples)
    eval_count: int  # validation batches per evaluation
    unit: str  # what throughput counts: tokens, images, values
    units_per_example: int
    summary: str  # one line for the log


def _weighted_mean(x_B, batch):
    if "mask" not in batch:
        return x_B.mean()
    w_B = batch["mask"]
    return (x_B * w_B).sum() / jnp.maximum(w_B.sum(), 1.0)


def lm_loss(model, batch, key):
    """Next-token cross-entropy."""
    logits_BLV = model(batch["x"], key=key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32), batch["y"]).mean()
    return loss, {"loss": loss}


def classify_loss(model, batch, key):
    """Softmax cross-entropy and accuracy."""
    logits_BY = model(batch["x"], key=key).astype(jnp.float32)
    loss = _weighted_mean(optax.softmax_cross_entropy_with_integer_labels(logits_BY, batch["y"]), batch)
    accuracy = _weighted_mean((logits_BY.argmax(-1) == batch["y"]).astype(jnp.float32), batch)
    return loss, {"loss": loss, "accuracy": accuracy}


def regress_loss(model, batch, key):
    """Mean squared error of every predicted value."""
    pred_BLO = model(batch["x"], key=key).astype(jnp.float32)
    loss = jnp.mean((pred_BLO - batch["y"]) ** 2)
    return loss, {"loss": loss}


def load(cfg) -> Task:
    """Read the data the config names (UserError if it cannot) and wire it to its task."""
    from data import images, series, text

    B, d = cfg.batch_size, cfg.data
    rows = mesh_lib.process_rows(B)
    if d.kind == "text":
        block = cfg.model.block_size
        corpus = text.load_corpus(d)
        text.check_fits(corpus, block)
        return Task("lm", lm_loss, {"vocab_size": corpus.vocab_size}, {"vocab": corpus.vocab},
                    lambda step: text.train_batch(corpus, cfg.seed, step, B, block, rows),
                    lambda i: (text.eval_batch(corpus, d.eval_seed, i, B, block, rows), B), cfg.eval_batches,
                    "tokens", block, f"vocab {corpus.vocab_size}, {len(corpus.train_T):,} training tokens")
    if d.kind == "images":
        data = images.load(d)
        meta = {"num_classes": data.num_classes, "image_shape": list(data.image_shape),
                "mean": data.mean_C.tolist(), "std": data.std_C.tolist()}
        shape = "x".join(map(str, data.image_shape))
        pad = d.crop_padding if d.augment else 0
        return Task("classify", classify_loss, {"num_classes": data.num_classes, "image_shape": list(data.image_shape)},
                    meta, lambda step: images.train_batch(data, cfg.seed, step, B, rows, pad),
                    lambda i: images.eval_batch(data, i, B, rows),
                    images.eval_batch_count(data, B, cfg.eval_batches), "images", 1,
                    f"{len(data.x_train):,} training / {len(data.x_val):,} validation images of {shape}, "
                    f"{data.num_classes} classes")
    if d.kind == "series":
        L = cfg.model.block_size
        return Task("regress", regress_loss, {"in_features": 1, "out_features": 1}, {},
                    lambda step: series.train_batch(cfg.seed, step, B, L, d.noise, rows),
                    lambda i: (series.eval_batch(d.eval_seed, i, B, L, d.noise, rows), B), cfg.eval_batches,
                    "values", L, f"generated noisy sines, windows of {L}, noise {d.noise}")
    raise AssertionError(d.kind)  # config.check_keys rejects unknown kinds first
