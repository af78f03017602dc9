"""Regression: mean squared error of every predicted value (a sequence's next values, a row's targets).

Sources that standardise their targets (data=tabular) put the targets' std and the validation
targets' variance in meta; `finish` then adds RMSE, MAE and R² in the targets' own units.
"""
import math
from dataclasses import dataclass

import jax.numpy as jnp

from tasks import WEIGHT, examples_feed, real_rows, weighted_mean

feed = examples_feed
READS = "values"


@dataclass
class Config:
    name: str = "regress"


def loss(model, batch, key):
    pred = model(batch["x"], key=key).astype(jnp.float32)
    err = pred - batch["y"]
    B = pred.shape[0]
    loss = weighted_mean((err ** 2).reshape(B, -1).mean(axis=-1), batch)
    metrics = {"loss": loss, "abs_err": weighted_mean(jnp.abs(err).reshape(B, -1).mean(axis=-1), batch),
               WEIGHT: real_rows(batch)}
    if err.ndim == 2 and err.shape[1] > 1:  # several targets (table rows): each in its own units later
        for i in range(err.shape[1]):
            metrics[f"sq_err_{i}"] = weighted_mean(err[:, i] ** 2, batch)
            metrics[f"abs_err_{i}"] = weighted_mean(jnp.abs(err[:, i]), batch)
    if key is None and err.ndim == 2:  # the evaluated rows' target moments: R² over exactly those rows
        for i in range(err.shape[1]):
            metrics[f"y_{i}"] = weighted_mean(batch["y"][:, i], batch)
            metrics[f"y2_{i}"] = weighted_mean(batch["y"][:, i] ** 2, batch)
    return loss, metrics


def finish(val: dict, meta: dict) -> dict:
    """Validation means plus RMSE, MAE and R² in target units, where meta has the targets' scale."""
    std, var, names = meta.get("target_std"), meta.get("target_val_var"), meta.get("target")
    moments = [(val.pop(f"val_y_{i}"), val.pop(f"val_y2_{i}")) for i in range(sum(k.startswith("val_y_") for k in val))]
    if not std or not var:
        return val
    if len(moments) == len(std):  # the variance of the rows evaluated (eval_batches may cover part of the split)
        var = [(m2 - m * m) * s * s for (m, m2), s in zip(moments, std)]
    if len(std) == 1:
        pairs = [("", val["val_loss"], val["val_abs_err"])]
    else:
        pairs = [(f"_{t}", val[f"val_sq_err_{i}"], val[f"val_abs_err_{i}"]) for i, t in enumerate(names)]
        val = {k: v for k, v in val.items() if not k.startswith(("val_sq_err_", "val_abs_err_"))}
    out, r2s = dict(val), []
    for (suffix, mse, mae), s, v in zip(pairs, std, var):
        r2s.append(1.0 - mse * s * s / v if v > 0 else float("nan"))
        out |= {f"val_rmse{suffix}": math.sqrt(max(mse, 0.0)) * s, f"val_mae{suffix}": mae * s, f"val_r2{suffix}": r2s[-1]}
    if len(std) > 1:
        out["val_r2"] = sum(r2s) / len(r2s)
    return out
