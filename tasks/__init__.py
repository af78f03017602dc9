"""Tasks: `task=NAME` is `configs/task/NAME.yaml` plus the module file `tasks/NAME.py`.

A task is a loss plus metrics and the batches they read. Its file holds a `Config` dataclass
(`name` plus its settings), `READS` (what it needs from a data source: "tokens", "classes",
"values" or "sentences"), `feed(...) -> Feed` (the source's rows turned into the fields its loss
reads) and `loss(model, batch, key) -> (loss, metrics)`; `key` set means training. Metrics are means over the
batch's real examples; an eval batch comes with its weight (real examples, or scored tokens), so
the validation metrics are exact means over the split whatever its padding. An optional
`finish(val, meta) -> val` turns those means into the logged metrics (e.g. errors in target units),
an optional `model_dims(dims) -> dims` picks the source's dims the model is built with, and an
optional `prepare(source, task_cfg) -> source` hands the task's own settings to the source before
its feed is built (e.g. `task.nsp` pairs sentences).
"""
from typing import Callable, NamedTuple

import jax.numpy as jnp


# A loss whose means are over a number of items that differs between shards of one batch (real rows
# of a padded batch, masked tokens) adds that number as metrics[WEIGHT]: pmap's devices and gradient
# accumulation's micro-batches are then pooled by it (core/step.py), so they give the whole batch's
# means as jit does. It is never logged. Without it, shards count equally.
WEIGHT = "_weight"


def real_rows(batch):
    """The number of rows weighted_mean averages over (WEIGHT)."""
    return batch["mask"].sum() if "mask" in batch else jnp.float32(batch["y"].shape[0])


def weighted_mean(x_B, batch):
    """Mean of x_B over the rows whose `mask` is 1 (all rows when the batch has no mask)."""
    if "mask" not in batch:
        return x_B.mean()
    w_B = batch["mask"]
    return (x_B * w_B).sum() / jnp.maximum(w_B.sum(), 1.0)


class Feed(NamedTuple):
    """What the loop draws from a source for a task: batches are pure functions of their index."""
    train_batch: Callable  # step -> this process's rows of the global batch
    eval_batch: Callable  # i -> (this process's rows of validation batch i, its weight)
    eval_count: int  # validation batches per evaluation
    units_per_example: int  # what throughput counts per example (tokens per window, 1 per image)


def examples_feed(source, data_cfg, *, seed: int, batch_size: int, rows: slice, eval_batches: int) -> Feed:
    """A labelled-examples source as it is: its batches carry x, y (and a mask of padding for eval)."""
    return Feed(lambda step: source.train_batch(seed, step, batch_size, rows),
                lambda i: source.eval_batch(i, batch_size, rows),
                source.eval_count(batch_size, eval_batches), getattr(source, "units_per_example", 1))
