"""Classification: softmax cross-entropy and accuracy of one label per example (images, text, rows)."""
from dataclasses import dataclass

import jax.numpy as jnp
import optax

from tasks import examples_feed, weighted_mean

feed = examples_feed
READS = "classes"


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
    accuracy = weighted_mean((logits_BY.argmax(-1) == batch["y"]).astype(jnp.float32), batch)
    return loss, {"loss": loss, "accuracy": accuracy}
