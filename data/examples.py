"""A labelled split held as arrays (x_train, y_train, x_val, y_val): the batches every example source reads;
and the files such splits are read from (the delimiter of CSV/TSV tables, .npz arrays).

The global batch at `step` takes examples step*B .. step*B+B-1 of an endless stream in which epoch
e is a permutation of the training split keyed on (seed, e); validation runs in order, its last
batch padded with rows of mask 0. Each process gathers only its own rows. Grouped by length, the W
batches of steps w*W .. w*W+W-1 hold the same examples, sorted by length, so each can be cut short.
"""
import csv
import functools
import os
import zipfile

import numpy as np

from errors import UserError, missing

_ORDER_STREAM = 2


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n training examples in `epoch`: a permutation keyed on (seed, epoch)."""
    return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n)


def stream_indices(n: int, seed: int, stream_S: np.ndarray) -> np.ndarray:
    """Indices into the training split at positions `stream_S` of the endless stream of epochs."""
    epochs_S, pos_S = np.divmod(stream_S, n)
    idx_S = np.empty(len(stream_S), np.int64)
    for epoch in np.unique(epochs_S):  # a batch may straddle an epoch boundary
        here = epochs_S == epoch
        idx_S[here] = epoch_order(n, seed, int(epoch))[pos_S[here]]
    return idx_S


def train_indices(n: int, seed: int, step: int, batch_size: int) -> np.ndarray:
    """Indices into the training split of the B examples of the global batch at `step`."""
    return stream_indices(n, seed, step * batch_size + np.arange(batch_size))


def length_window(lengths_N: np.ndarray, seed: int, w: int, window: int, batch_size: int) -> np.ndarray:
    """The examples of steps w*window .. w*window+window-1 (the ones they take ungrouped), sorted by length,
    shortest first and ties in stream order: batched B at a time, they group like lengths (Hugging Face's
    group_by_length). A pure function of (seed, w), like the stream itself."""
    idx_S = stream_indices(len(lengths_N), seed, w * window * batch_size + np.arange(window * batch_size))
    return idx_S[np.argsort(lengths_N[idx_S], kind="stable")]


def val_indices(n: int, i: int, batch_size: int, rows: slice) -> tuple[np.ndarray, np.ndarray, int]:
    """(this process's indices of validation batch i, their mask, the batch's count of real examples)."""
    idx_B = i * batch_size + np.arange(batch_size)
    mask_B = idx_B < n
    return np.where(mask_B, idx_B, 0)[rows], mask_B[rows].astype(np.float32), int(mask_B.sum())


def eval_count(n: int, batch_size: int, max_batches: int) -> int:
    """Batches that cover n validation examples, capped at eval_batches."""
    return min(max_batches, -(-n // batch_size))


def train_batch(split, seed: int, step: int, batch_size: int, rows: slice) -> dict:
    """{"x", "y"}: this process's rows of the global training batch at `step` of any array split."""
    idx_B = train_indices(len(split.x_train), seed, step, batch_size)[rows]
    return {"x": split.x_train[idx_B], "y": split.y_train[idx_B]}


def eval_batch(split, i: int, batch_size: int, rows: slice) -> tuple[dict, int]:
    """({"x", "y", "mask"}, real examples) of validation batch i of any array split."""
    idx_B, mask_B, n_real = val_indices(len(split.x_val), i, batch_size, rows)
    return {"x": split.x_val[idx_B], "y": split.y_val[idx_B], "mask": mask_B}, n_real


def delimiter(name: str, sample: str) -> str:
    """A table file's field delimiter: by its extension (.tsv, .csv), else sniffed from its first bytes."""
    ext = os.path.splitext(name)[1].lower()
    if ext in (".tsv", ".tab"):
        return "\t"
    if ext == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def read_npz(path: str, key: str, hint: str = "") -> dict:
    """The arrays of an .npz file: x_train, y_train, x_test, y_test (or x, y). UserError for a missing,
    unreadable (empty, cut short, pickled) file or one without those arrays; `hint` ends each message."""
    tail = f"; {hint}" if hint else ""
    if not os.path.isfile(path):
        raise UserError(f"{key}={path} {missing(path)}{tail}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, AttributeError, TypeError) as e:
        raise UserError(f"{key}={path} is not a readable .npz file ({e}){tail}") from None
    if not ({"x_train", "y_train", "x_test", "y_test"} <= arrays.keys() or {"x", "y"} <= arrays.keys()):
        raise UserError(f"{path} holds arrays {sorted(arrays)}; it needs x_train, y_train, x_test, y_test (or x, y)")
    return arrays
