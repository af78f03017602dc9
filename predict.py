"""Predict with a trained regressor or classifier: `python predict.py out_dir=RUN [path=FILE] [step=N]`.

`out_dir=RUN_A out_dir=RUN_B ...` predicts with the runs' ensemble: the mean of their class probabilities (or
of their predictions, in target units). Each run reads the inputs with its own preprocessing, so the
runs may be of different families and tokenizers; they must predict the same labels or targets.

Table runs (data=tabular) read CSV/TSV rows with a header line, from path= or stdin, and preprocess
them from the run's meta alone, as the training rows were; image classifiers read path=FILE.npy
(N x H x W x C, or N x H x W); text classifiers read text="...", or one text per line of path= or
stdin. Each input row gives one JSON object on stdout: {"prediction": value}
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

USAGE = ("python predict.py out_dir=RUN [out_dir=RUN ...] [path=FILE.csv|FILE.npy|FILE.txt] [text=\"...\"] [step=N] "
         "(rows or lines on stdin without path=)")
CHUNK = 1024  # rows per forward call: one compiled shape, whatever the row count


def parse(argv: list[str]) -> dict:
    """`key=value` arguments (path, text, step) as a dict, and "out_dirs": every out_dir= in order."""
    args, out_dirs = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key in ("out_dir", "path") and len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # Hydra-style quoting, as train.py prints run directories
        if not eq or key not in ("out_dir", "path", "text", "step"):
            raise UserError(f"unknown argument {arg!r}; usage: {USAGE}")
        if key == "out_dir":  # run directories may hold commas (runs/NAME,seed=1): each run is its own argument
            out_dirs += [value] if value else []
        elif key in args:
            raise UserError(f"{key}= is given twice; pass it once")
        else:
            args[key] = value
    if not out_dirs:
        raise UserError(f"pass out_dir=RUN, the directory of a training run; usage: {USAGE}")
    args["out_dirs"] = out_dirs
    if "step" in args and not args["step"].isdigit():
        raise UserError(f"step={args['step']} must be a checkpoint's step number")
    if "step" in args and len(out_dirs) > 1:
        raise UserError("step= picks one run's checkpoint; with several out_dir= runs, drop it")
    if "text" in args and "path" in args:
        raise UserError("pass text=\"...\" or path=FILE, not both")
    return args


def read_table(path: str | None):
    """(header, cells) of a CSV/TSV: path, or stdin."""
    from data import tabular

    if not path and sys.stdin.isatty():
        raise UserError(f"pass path=FILE.csv, or pipe CSV rows (with their header line) into stdin; usage: {USAGE}")
    return tabular.read_file(path) if path else tabular.read_csv(sys.stdin, "stdin")


def table_inputs(meta: dict, path: str | None, table):
    """The rows of a CSV/TSV (read_table's) as model inputs x_NF, preprocessed as the run's training rows were."""
    from data import tabular

    where = path or "stdin"
    header, cells = table
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
    if list(x.shape[1:]) != list(meta["image_shape"]) or not len(x):
        raise UserError(f"{path} holds {len(x)} images of shape {x.shape[1:]}; the model reads N >= 1 of "
                        f"{tuple(meta['image_shape'])}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise UserError(f"{path} holds values that are not finite numbers (NaN, inf); pass pixel values")
    return normalise(x, meta["mean"], meta["std"])


def text_inputs(text: str | None, path: str | None) -> list[str]:
    """The texts to classify: text=, else one per line of path= or stdin."""
    if text is not None:
        return [text]
    if not path and sys.stdin.isatty():
        raise UserError(f"pass text=\"...\", path=FILE (one text per line), or pipe lines into stdin; usage: {USAGE}")
    try:
        if path:
            with open(path, encoding="utf-8-sig") as f:
                lines = f.read().splitlines()
        else:
            lines = sys.stdin.buffer.read().decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = "is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"cannot be read ({e.strerror or e})"
        raise UserError(f"{path or 'stdin'} {why}; a text classifier reads one text per line") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise UserError(f"{path or 'stdin'} holds no text to classify")
    return texts


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


def ensemble_kind(runs, out_dirs: list[str]) -> str:
    """The input kind every run reads; UserError for a run predict.py does not serve, or runs that disagree."""
    from serving.predictor import kind_of

    def predicts(run) -> tuple:
        return (kind_of(run), run.task, *(run.meta.get(k) for k in ("labels", "num_classes", "target")))

    first = predicts(runs[0])
    for run, d in zip(runs, out_dirs):
        mine = predicts(run)
        if mine[0] is None:
            raise UserError(f"{d} holds a task={run.task} model on data={run.cfg.data.kind}; predict.py serves "
                            f"regressors and classifiers of table rows, images or texts (sample.py: language models)")
        if mine != first:
            raise UserError(f"{d} and {out_dirs[0]} predict different things (task, labels or targets, inputs); "
                            f"an ensemble averages runs trained on the same task")
    return first[0]


def mean_output(runs, outs: list):
    """One run's outputs as `results` reads them, for the runs' average: log of the mean class probability,
    or the mean prediction in target units put back in the first run's standardised units."""
    import numpy as np

    if len(outs) == 1:
        return outs[0]
    if runs[0].task == "regress":
        mean, std = ([np.array(r.meta[k]) for r in runs] for k in ("target_mean", "target_std"))
        y = np.mean([o * s + m for o, s, m in zip(outs, std, mean)], 0)
        return (y - mean[0]) / std[0]
    logp_KNY = np.stack([o - o.max(-1, keepdims=True) for o in outs])
    logp_KNY -= np.log(np.exp(logp_KNY).sum(-1, keepdims=True))
    top_NY = logp_KNY.max(0)  # log-mean-exp over the runs: no log(0) where every run is sure
    return top_NY + np.log(np.exp(logp_KNY - top_NY).mean(0))


def main(argv: list[str]) -> None:
    try:
        args = parse(argv)
        path = os.path.expanduser(args.get("path") or "")
        if path and not os.path.isfile(path):
            raise UserError(f"path={args['path']} " + ("is a directory; pass a file" if os.path.isdir(path) else
                                                       "does not exist"))
        runtime.compile_cache("auto")
        from core.state import load_run
        from serving.predictor import results, to_rows

        out_dirs = args["out_dirs"]
        runs = [load_run(d, int(args["step"]) if "step" in args else None) for d in out_dirs]
        kind = ensemble_kind(runs, out_dirs)
        if kind == "text":
            texts = text_inputs(args.get("text"), path)
            xs = [to_rows(run, kind, texts) for run in runs]
        elif "text" in args:
            raise UserError(f"text= is for text classifiers; this run reads {kind}s: pass path=")
        elif kind == "table":
            table = read_table(path)  # stdin is read once, whatever the number of runs
            xs = [table_inputs(run.meta, path, table) for run in runs]
        else:
            xs = [image_inputs(run.meta, path) for run in runs]
        print(f"predicting {len(xs[0]):,} rows with " + ", ".join(
            f"step {run.step} of {run.cfg.model.family} ({run.task}) in {d}" for run, d in zip(runs, out_dirs)),
              file=sys.stderr)
        rows = results(runs[0].meta, runs[0].task, mean_output(runs, [forward(run, x) for run, x in zip(runs, xs)]))
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in rows))
    except UserError as e:
        cli.fail(e)


if __name__ == "__main__":
    main(sys.argv[1:])
