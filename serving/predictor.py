"""Prediction for classifier and regressor runs: JSON inputs to model rows, batching, JSON results.

Inputs are read from the run's meta alone, as the training rows were: table rows as objects
({"feature": value}), images as nested lists (H x W x C or H x W, the training pixels' units) or
base64 PNG strings, texts as strings (WordPiece runs). Concurrent requests are gathered into one
batch (what queued meanwhile, or for `batch_wait_ms`), run in fixed row buckets compiled at
start-up, and split back.
"""
import base64
import io
import sys
import threading
import time
from concurrent.futures import Future
from queue import Empty, Queue

import jax
import numpy as np
from flax import nnx

from errors import UserError
from serving.programs import bucket_of, buckets


def kind_of(run) -> str | None:
    """The input kind a run predicts from: "table", "image" or "text"; None for runs /v1/predict does not serve."""
    if run.task not in ("classify", "regress"):
        return None
    meta = run.meta
    return "table" if "features" in meta else "image" if "image_shape" in meta else "text" if "tokenizer" in meta \
        else None


def _image(item, shape: list, i: int) -> np.ndarray:
    if isinstance(item, str):
        from PIL import Image

        try:
            img = np.asarray(Image.open(io.BytesIO(base64.b64decode(item, validate=True))))
        except Exception:  # noqa: BLE001 - whatever PIL or base64 make of bad bytes, the client's mistake
            raise UserError(f"inputs[{i}] is a string but not a base64 PNG image") from None
    else:
        try:
            img = np.asarray(item, np.float32)
        except (ValueError, TypeError):
            raise UserError(f"inputs[{i}] is not a rectangular array of numbers") from None
    img = img[..., None] if img.ndim == 2 else img
    if not np.isfinite(img).all():
        raise UserError(f"inputs[{i}] holds values that are not finite numbers (NaN, inf); send pixel values")
    if list(img.shape) != list(shape):
        raise UserError(f"inputs[{i}] has shape {list(img.shape)}; the model reads images of {shape} (H x W x C)")
    return img


def to_rows(run, kind: str, inputs: list) -> np.ndarray:
    """The model inputs x_N for a request's `inputs`, preprocessed as the run's training rows were."""
    meta = run.meta
    if kind == "image":
        from data.images import normalise

        return normalise(np.stack([_image(x, meta["image_shape"], i) for i, x in enumerate(inputs)]),
                         meta["mean"], meta["std"])
    if kind == "text":
        from data import wordpiece

        bad = [i for i, x in enumerate(inputs) if not isinstance(x, str) or not x.strip()]
        if bad:
            raise UserError(f"inputs[{bad[0]}] must be a non-empty string (this run classifies texts)")
        return wordpiece.encode(meta["tokenizer"], inputs, run.cfg.data.seq_len)[0]
    from data import tabular

    features = [c["name"] for c in meta["features"]]
    for i, row in enumerate(inputs):
        if not isinstance(row, dict):
            raise UserError(f"inputs[{i}] must be an object of feature values, e.g. {{\"{features[0]}\": ...}}")
        lacking = [f for f in features if f not in row]
        if lacking:
            raise UserError(f"inputs[{i}] lacks {', '.join(lacking)} (the model reads {', '.join(features)})")
        extra = [k for k in row if k not in meta.get("columns", features)]  # the training file's others may stay
        if extra:  # a misspelt feature, as predict.py refuses it
            raise UserError(f"inputs[{i}] has {', '.join(map(repr, extra))}, not a column of the training file "
                            f"(the model reads {', '.join(features)})")
        odd = [f for f in features if not isinstance(row[f], (int, float, str, type(None))) or isinstance(row[f], bool)]
        if odd:
            raise UserError(f"inputs[{i}][{odd[0]!r}] must be a number, a string or null")
    table = {f: np.array(["" if r[f] is None else str(r[f]) for r in inputs]) for f in features}
    return tabular.encode(table, meta, "the request")[0]


def results(meta: dict, task: str, out_N) -> list[dict]:
    """One JSON-ready dict per row: a value in target units, or a label and its class probabilities."""
    if task == "regress":
        y_NO = out_N * np.array(meta["target_std"]) + np.array(meta["target_mean"])
        names = meta["target"]
        return [{"prediction": float(y[0]) if len(names) == 1 else dict(zip(names, map(float, y)))} for y in y_NO]
    labels = meta.get("labels") or list(range(meta["num_classes"]))
    z = out_N - out_N.max(axis=-1, keepdims=True)
    probs_NY = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return [{"label": labels[int(p.argmax())], "probs": {str(k): float(v) for k, v in zip(labels, p)}}
            for p in probs_NY]


class Predictor:
    """A thread that owns JAX: gathers requests' rows into batches of at most `max_rows`."""

    def __init__(self, run, *, max_rows: int, max_queue: int, wait_s: float, metrics):
        self.run, self.max_rows, self.max_queue, self.wait_s, self.metrics = run, max_rows, max_queue, wait_s, metrics
        self.kind = kind_of(run)
        graphdef = nnx.graphdef(run.model)
        sample = to_rows(run, self.kind, [self._example()])
        apply = jax.jit(lambda params, rest, x: nnx.merge(graphdef, params, rest)(x))
        params, rest = run.state["params"], run.state["rest"]
        self.forward = {n: apply.lower(params, rest, jax.ShapeDtypeStruct((n, *sample.shape[1:]), sample.dtype))
                        .compile() for n in buckets(max_rows)}
        self.queue: Queue = Queue()
        self.thread = threading.Thread(target=self._run, name="predictor", daemon=True)

    def _example(self):
        meta = self.run.meta
        if self.kind == "image":
            return np.zeros(meta["image_shape"]).tolist()
        return "a" if self.kind == "text" else {c["name"]: None for c in meta["features"]}

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def submit(self, x_N: np.ndarray) -> Future:
        from serving.scheduler import QueueFull

        if self.queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self.queue.qsize()} requests are already waiting (max_queue={self.max_queue}); retry later")
        future: Future = Future()
        self.queue.put((x_N, future))
        self.metrics.queue_depth.set(self.queue.qsize())
        return future

    def _run(self) -> None:
        params, rest = self.run.state["params"], self.run.state["rest"]
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch, rows = [first], len(first[0])
            deadline = time.perf_counter() + self.wait_s
            while rows < self.max_rows:  # concurrent requests share one batch
                try:
                    item = self.queue.get(timeout=max(deadline - time.perf_counter(), 0))
                except Empty:
                    break
                if item is None:
                    self.queue.put(None)
                    break
                batch.append(item)
                rows += len(item[0])
            self.metrics.queue_depth.set(self.queue.qsize())
            self.metrics.batch_size.observe(rows)
            try:
                x_N = np.concatenate([x for x, _ in batch])
                outs = []
                for i in range(0, len(x_N), self.max_rows):
                    part = x_N[i:i + self.max_rows]
                    n = bucket_of(len(part), sorted(self.forward))
                    padded = np.concatenate([part, np.zeros((n - len(part), *part.shape[1:]), part.dtype)])
                    outs.append(np.asarray(self.forward[n](params, rest, padded))[:len(part)])
                out_N = np.concatenate(outs)
                start = 0
                for x, future in batch:
                    future.set_result(results(self.run.meta, self.run.task, out_N[start:start + len(x)]))
                    start += len(x)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the server
                print(f"error: predictor: {type(e).__name__}: {e}", file=sys.stderr)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
