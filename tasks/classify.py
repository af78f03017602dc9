"""Classification: softmax cross-entropy and accuracy of one label per example (images, text, rows).

With more than two classes validation also logs `val_f1`, the macro F1. F1 is not a mean of per-batch
values, so each eval batch reports per-class counts as means over its real examples (`tp_c`, `pred_c`,
`true_c`); core/task.py weighs them by the batch's real-example count, which makes the sums over the
split exact counts (up to a common factor), and `finish` turns them into F1 and drops them.
"""
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from tasks import WEIGHT, examples_feed, real_rows, weighted_mean

feed = examples_feed
READS = "classes"
_COUNTS = ("val_tp_", "val_pred_", "val_true_")


@dataclass
class Config:
    name: str = "classify"


def outputs(model, batch, key):
    """(logits_NY, labels_N, weights_N): what a distilled student matches (core/distill.py)."""
    y_B = batch["y"]
    return model(batch["x"], key=key).astype(jnp.float32), y_B, batch.get("mask", jnp.ones(y_B.shape))


def loss(model, batch, key):
    logits_BY = model(batch["x"], key=key).astype(jnp.float32)
    loss = weighted_mean(optax.softmax_cross_entropy_with_integer_labels(logits_BY, batch["y"]), batch)
    pred_B = logits_BY.argmax(-1)
    accuracy = weighted_mean((pred_B == batch["y"]).astype(jnp.float32), batch)
    metrics = {"loss": loss, "accuracy": accuracy, WEIGHT: real_rows(batch)}
    Y = logits_BY.shape[-1]
    if key is None and Y > 2:  # evaluation: the counts macro F1 needs
        pred_BY, true_BY = jax.nn.one_hot(pred_B, Y), jax.nn.one_hot(batch["y"], Y)
        for c in range(Y):
            metrics[f"tp_{c}"] = weighted_mean(pred_BY[:, c] * true_BY[:, c], batch)
            metrics[f"pred_{c}"] = weighted_mean(pred_BY[:, c], batch)
            metrics[f"true_{c}"] = weighted_mean(true_BY[:, c], batch)
    return loss, metrics


def finish(val: dict, meta: dict) -> dict:
    """Validation means plus val_f1: the mean over classes of 2·tp / (predicted + actual).

    A class that neither occurs in the split nor is ever predicted is left out of the mean, as
    scikit-learn's f1_score(average="macro") leaves out labels absent from both.
    """
    n = sum(k.startswith("val_tp_") for k in val)
    if not n:
        return val
    f1s = []
    for c in range(n):
        tp, pred, true = (val[f"{p}{c}"] for p in _COUNTS)
        if pred + true > 0:
            f1s.append(2.0 * tp / (pred + true))
    out = {k: v for k, v in val.items() if not k.startswith(_COUNTS)}
    out["val_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    return out
