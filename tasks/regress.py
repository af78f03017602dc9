"""Regression: mean squared error of every predicted value (a sequence's next values, a row's target)."""
from dataclasses import dataclass

import jax.numpy as jnp

from tasks import examples_feed, weighted_mean

feed = examples_feed
READS = "values"


@dataclass
class Config:
    name: str = "regress"


def loss(model, batch, key):
    pred = model(batch["x"], key=key).astype(jnp.float32)
    err2_B = ((pred - batch["y"]) ** 2).reshape(pred.shape[0], -1).mean(axis=-1)
    loss = weighted_mean(err2_B, batch)
    return loss, {"loss": loss}
