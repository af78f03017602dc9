"""Predict with a trained regressor or classifier: `python predict.py out_dir=RUN [path=FILE] [step=N]`.

Table runs (data=tabular) read CSV/TSV rows with a header line, from path= or stdin, and preprocess
them from the run's meta alone, as the training rows were; image classifiers read path=FILE.npy
(N x H x W x C, or N x H x W). Each input row gives one JSON object on stdout: {"prediction": value}
in target units (a dict of them for several targets), or {"label": ..., "probs": {label: p}}.
Logs go to stderr.
"""
from core import runtime

if __name__ == "__main__":
    runtime.configure()  # before JAX is imported: core/runtime.py

import json
import os
import sys

from core import cli
from errors import UserError

USAGE = "python predict.py out_dir=RUN [path=FILE.csv|FILE.npy] [step=N] (rows on stdin without path=)"
CHUNK = 1024  # rows per forward call: one compiled shape, whatever the row count


def parse(argv: list[str]) -> dict:
    """`key=value` arguments (out_dir, path, text, step) as a dict."""
    args = {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in ("out_dir", "path", "text", "step"):
            raise UserError(f"unknown argument {arg!r}; usage: {USAGE}")
        args[key] = value
    if not args.get("out_dir"):
        raise UserError(f"pass out_dir=RUN, the directory of a training run; usage: {USAGE}")
    if "text" in args:
        raise UserError("text= is kept for text classifiers, which no run trains yet; give table rows with path= or stdin")
    if "step" in args and not args["step"].isdigit():
        raise UserError(f"step={args['step']} must be a checkpoint's step number")
    return args


def table_inputs(meta: dict, path: str | None):
    """The rows of a CSV/TSV (path, or stdin) as model inputs x_NF, preprocessed as the run's training rows were."""
    from data import tabular

    if not path and sys.stdin.isatty():
        raise UserError(f"pass path=FILE.csv, or pipe CSV rows (with their header line) into stdin; usage: {USAGE}")
    where = path or "stdin"
    header, cells = tabular.read_file(path) if path else tabular.read_csv(sys.stdin, "stdin")
    features = [c["name"] for c in meta["features"]]
    lacking = [c for c in features if c not in header]
    extra = [c for c in header if c not in meta["columns"]]  # the training file's other columns may stay
    if lacking or extra:
        raise UserError(f"{where}: the rows' columns differ from the training file's: "
                        + "; ".join(([f"missing {', '.join(lacking)}"] if lacking else [])
                                    + ([f"not in training {', '.join(extra)}"] if extra else []))
                        + f" (the model reads {', '.join(features)})")
    x_NF, gone_N = tabular.encode(dict(zip(header, cells.T)), meta, where)
    if gone_N.any():
        print(f"note: {int(gone_N.sum())} row(s) have missing or non-finite features; those cells read as the "
              f"training mean", file=sys.stderr)
    return x_NF


def image_inputs(meta: dict, path: str | None):
    """The images of an .npy file, normalised as the run's training images were."""
    import numpy as np

    from data.images import normalise

    if not path or not path.endswith(".npy"):
        raise UserError(f"this run classifies images: pass path=FILE.npy holding N x H x W x C images of "
                        f"{'x'.join(map(str, meta['image_shape']))}")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable .npy array ({e})") from None
    x = x[..., None] if x.ndim == 3 else x
    if list(x.shape[1:]) != list(meta["image_shape"]):
        raise UserError(f"{path} holds images of shape {x.shape[1:]}; the model reads {tuple(meta['image_shape'])}")
    return normalise(x, meta["mean"], meta["std"])


def forward(run, x_N):
    """The model's outputs for every row of x_N, in chunks of one compiled shape."""
    import jax
    import numpy as np
    from flax import nnx

    graphdef = nnx.graphdef(run.model)
    apply = jax.jit(lambda params, rest, x: nnx.merge(graphdef, params, rest)(x))
    size = min(CHUNK, len(x_N))
    outs = []
    for i in range(0, len(x_N), size):
        part = x_N[i:i + size]
        padded = np.concatenate([part, np.zeros((size - len(part), *part.shape[1:]), part.dtype)])
        outs.append(np.asarray(apply(run.state["params"], run.state["rest"], padded))[:len(part)])
    return np.concatenate(outs)


def results(meta: dict, task: str, out_N) -> list[dict]:
    """One JSON-ready dict per row: a value in target units, or a label and its class probabilities."""
    import numpy as np

    if task == "regress":
        y_NO = out_N * np.array(meta["target_std"]) + np.array(meta["target_mean"])
        names = meta["target"]
        return [{"prediction": float(y[0]) if len(names) == 1 else dict(zip(names, map(float, y)))} for y in y_NO]
    labels = meta.get("labels") or list(range(meta["num_classes"]))
    z = out_N - out_N.max(axis=-1, keepdims=True)
    probs_NY = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return [{"label": labels[int(p.argmax())], "probs": {str(k): float(v) for k, v in zip(labels, p)}}
            for p in probs_NY]


def main(argv: list[str]) -> None:
    try:
        args = parse(argv)
        if args.get("path") and not os.path.isfile(os.path.expanduser(args["path"])):
            raise UserError(f"path={args['path']} does not exist")
        runtime.compile_cache("auto")
        from core.state import load_run

        run = load_run(args["out_dir"], int(args["step"]) if "step" in args else None)
        meta, path = run.meta, args.get("path") and os.path.expanduser(args["path"])
        if run.task not in ("regress", "classify") or not ("features" in meta or "image_shape" in meta):
            raise UserError(f"{args['out_dir']} holds a task={run.task} model on data={run.cfg.data.kind}; predict.py "
                            f"serves regressors and classifiers of table rows or images (sample.py: language models)")
        x = table_inputs(meta, path) if "features" in meta else image_inputs(meta, path)
        print(f"predicting {len(x):,} rows with step {run.step} of {run.cfg.model.family} ({run.task}) in "
              f"{args['out_dir']}", file=sys.stderr)
        rows = results(meta, run.task, forward(run, x))
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in rows))
    except UserError as e:
        cli.fail(e)


if __name__ == "__main__":
    main(sys.argv[1:])
