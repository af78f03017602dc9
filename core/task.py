"""A run's task wired to its data: the loss, and batches that are pure functions of (seed, step).

`task=` picks the loss and metrics (tasks/), `data=` the source (data/); config.check has already
made sure the task can read what the source provides. The loop sees only this `Task`.
"""
import hashlib
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np

import tasks
from core import mesh as mesh_lib
from core.config import module, usable
from core.step import first
from errors import UserError


@dataclass
class Task:
    name: str  # lm | classify | regress ...
    loss_fn: Callable  # (model, batch, key) -> (loss, metrics)
    dims: dict  # the model constructor's data-dependent arguments (JSON types: they go into the checkpoint)
    meta: dict  # what reload scripts need besides the config (vocab; class count and normalisation)
    feed: tasks.Feed  # train_batch(step), eval_batch(i) -> (batch, weight), eval_count, units_per_example
    unit: str  # what throughput counts: tokens, images, values
    summary: str  # one line for the log
    finish: Callable = lambda val, meta: val  # validation means -> the logged metrics (e.g. in target units)
    baseline: dict = None  # a reference model's validation metrics, logged once at the start (baseline_*)
    extent: dict = None  # per split: its length and a hash of its ends (hosts' copies of the data compared)


def validate(task: Task, runner, state, meta: dict) -> dict:
    """The logged validation metrics: each batch's means weighted by its weight (real examples or scored
    tokens), then the task's `finish` with the run's `meta`. `state` is in the runner's layout."""
    totals, weight, feed = {}, 0.0, task.feed
    for i in range(feed.eval_count):
        rows, w = feed.eval_batch(i)
        for k, v in jax.device_get(runner.evaluate(state, runner.batch(rows))).items():
            totals[k] = totals.get(k, 0.0) + first(v) * w
        weight += w
    return task.finish({f"val_{k}": v / weight for k, v in totals.items()}, meta)


def load(cfg, inherited: dict | None = None) -> Task:
    """Read the data the config names (UserError if it cannot) and wire it to the task.

    inherited: the meta of the run this one starts from (init_from), whose tokenizer and labels the
    data must reuse so that the params mean the same tokens and classes.
    """
    source = module("data", cfg.data.kind).load(cfg.data, inherited)
    task = module("task", cfg.task.name)
    provides = getattr(source, "provides", None)  # a source whose file decides what it gives (data=tabular)
    if provides is not None and provides != task.READS:
        fits = [n for n in usable("task") if module("task", n).READS == provides]
        hint = f", or data.target_kind={task.READS}" if "target_kind" in cfg.data else ""
        raise UserError(f"data={cfg.data.kind} gives {provides} here, and task={cfg.task.name} reads {task.READS}; "
                        f"use task={' or task='.join(fits)}{hint}")
    source = getattr(task, "prepare", lambda source, task_cfg: source)(source, cfg.task)  # its settings: task.nsp
    feed = task.feed(source, cfg.data, seed=cfg.seed, batch_size=cfg.batch_size,
                     rows=mesh_lib.process_rows(cfg.batch_size), eval_batches=cfg.eval_batches)
    unit = "tokens" if task.READS == "tokens" else getattr(source, "unit", "examples")
    finish = getattr(task, "finish", lambda val, meta: val)
    dims = getattr(task, "model_dims", lambda d: d)(source.dims)  # e.g. masked LM: no classifier head
    baseline = getattr(source, "baseline", None)
    if baseline and hasattr(task, "BASELINES"):  # a masked LM's data may hold labels it never predicts
        baseline = {k: v for k, v in baseline.items() if k in task.BASELINES}
    return Task(cfg.task.name, task.loss, dims, source.meta, feed, unit, source.summary, finish, baseline,
                _extent(source))


def _extent(source) -> dict:
    """Each split's length and a hash of its first and last rows: cheap even memmapped, and what tells a
    host's stale or partial copy of the data from process 0's."""
    out = {}
    for name in ("train_T", "val_T", "x_train", "y_train", "x_val", "y_val"):
        a = getattr(source, name, None)
        if isinstance(a, np.ndarray) and len(a):
            ends = np.concatenate([np.ravel(a[:64]), np.ravel(a[-64:])])
            out[name] = [len(a), hashlib.sha256(ends.tobytes()).hexdigest()[:8]]
    return out


# The output a task's loss reads, from a batch's targets y: one score per class or token, or y's own shape.
_OUTPUTS = {"classify": lambda y, dims: (*y.shape, dims.get("num_classes")),
            "lm": lambda y, dims: (*y.shape, dims.get("vocab_size")),
            "regress": lambda y, dims: tuple(y.shape)}


def check_outputs(task: Task, spec, family: str) -> None:
    """UserError if the model's output on a validation batch is not the shape the task's loss reads (a
    classifier with the wrong number of outputs would broadcast or index silently), before anything compiles."""
    from flax import nnx

    expected = _OUTPUTS.get(task.name)
    if expected is None:
        return
    batch, _ = task.feed.eval_batch(0)
    want = expected(batch["y"], task.dims)
    try:
        out = jax.eval_shape(lambda state, x: nnx.merge(spec.graphdef, state["params"], state["rest"])(x),
                             spec.abstract, batch["x"])
    except Exception:  # noqa: BLE001 - a model that cannot run at all fails where it always did (restore, compile)
        return
    if not hasattr(out, "shape") or tuple(out.shape) != want:
        got = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
        raise UserError(f"model={family} returns {got} for a batch of x {tuple(batch['x'].shape)}, and task={task.name} "
                        f"reads {want} (dims {task.dims}); fix the Model's output in model/{family}.py")
