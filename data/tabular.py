"""Table rows for regression or classification: a CSV/TSV with a header line, or .npz arrays.

Everything is fitted on the training split only: numeric columns are standardised, string columns
one-hot over the training split's sorted categories (an unseen category is all zeros), regression
targets standardised, class targets mapped to the ids of their sorted values (data.scale=quantile
maps numeric columns through their training quantiles to normal scores instead). That preprocessing
goes into `meta` (JSON types), so predict.py turns new rows into model inputs from a run dir alone.

Without data.val_path the split is a permutation of the file's rows keyed on data.split_seed, drawn
before any row is dropped, so a row's split never depends on other rows. Training batches follow
data/images.py: epoch e is a permutation keyed on (seed, e); each process gathers only its rows.
"""
import csv
import io
import os
import sys
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, List, Optional

import numpy as np

from data import examples
from data.examples import delimiter
from errors import UserError, missing

PROVIDES = ("values", "classes")
INPUT = "rows"
MISSING = ["", "na", "n/a", "nan", "null", "none", "?"]  # lower-cased cells that mean "no value"
_SPLIT_STREAM = 4
_QUANTILES = 256  # knots of data.scale=quantile per numeric column (they go into meta)
_MAX_CATEGORIES = 1000  # one-hot inputs per string column; more is an id, or numbers with a typo


@dataclass
class Config:
    kind: str = "tabular"
    path: Optional[str] = None  # FILE.csv / .tsv (header line; other extensions sniffed) or FILE.npz
    val_path: Optional[str] = None  # a validation file with the same columns; None: split data.path
    target: Any = None  # a column name, or a list of them (regression); .npz: its y
    features: Optional[List[str]] = None  # None: every column but the target
    target_kind: str = "auto"  # auto (numbers: values, strings: classes) | values | classes
    missing: str = "drop"  # rows with a missing or non-finite feature: drop | mean (fill with the training mean)
    # Numeric columns: standard (z-scores) | quantile (through the training split's quantiles to a
    # standard normal: heavy tails such as counts stop dominating an MLP's inputs).
    scale: str = "standard"
    split_seed: int = 0
    val_fraction: float = 0.2


def read_csv(stream, name: str) -> tuple[list, np.ndarray]:
    """(header, cells N x C as strings) of a delimited text stream whose first line names the columns."""
    text = stream.read().removeprefix("\ufeff")  # a BOM, as spreadsheet programs save UTF-8 CSV
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter(name, text[:65536])) if any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{name} is empty; give a table whose first line names the columns")
    header = [h.strip() for h in rows[0]]
    if _floats(np.array(header)) is not None:
        raise UserError(f"{name} has no header line (its first line is all numbers); add a line of column names")
    if len(set(header)) < len(header) or "" in header:
        raise UserError(f"{name}: the header must name every column once (got {', '.join(map(repr, header))})")
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise UserError(f"{name}: line {bad + 1} has {len(rows[bad])} fields and the header {len(header)}; "
                        f"is the delimiter right, or a field's quoting broken?")
    if len(rows) == 1:
        raise UserError(f"{name} has a header line but no rows")
    return header, np.array(rows[1:], dtype=str)


def read_file(path: str) -> tuple[list, np.ndarray]:
    """(header, cells) of a CSV/TSV file."""
    try:
        with open(path, newline="", encoding="utf-8") as f:  # read_csv drops a BOM
            return read_csv(f, path)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8 CSV") from None


def _floats(col: np.ndarray):
    """The column as float64 with NaN for every missing or non-finite value; None if a value is not a number."""
    if col.dtype.kind in "fiub":
        out = col.astype(np.float64)
    else:
        cells = np.char.strip(col.astype(str))
        gone = np.isin(np.char.lower(cells), MISSING)
        out = np.full(len(col), np.nan)
        try:
            out[~gone] = cells[~gone].astype(np.float64)
        except ValueError:
            return None
    out[~np.isfinite(out)] = np.nan
    return out


def _strings(col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cells as stripped strings, mask of missing ones)."""
    cells = np.char.strip(col.astype(str))
    return cells, np.isin(np.char.lower(cells), MISSING)


def _table(path: str, key: str) -> tuple[dict, Optional[dict], list]:
    """({column: cells} of the file, the same of its test split (.npz x_test/y_test) or None, default target)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise UserError(f"{key}={path} {missing(path)}; pass a CSV/TSV file with a header line, or a .npz")
    if not path.endswith(".npz"):
        header, cells = read_file(path)
        return dict(zip(header, cells.T)), None, None
    arrays = examples.read_npz(path, key)
    names = [("x_train", "y_train"), ("x_test", "y_test")] if "x_train" in arrays else [("x", "y")]
    tables = []
    for xk, yk in names:
        x, y = arrays[xk].reshape(len(arrays[xk]), -1), arrays[yk].reshape(len(arrays[yk]), -1)
        if len(x) != len(y):
            raise UserError(f"{path}: {xk} has {len(x)} rows and {yk} {len(y)}")
        y_names = ["y"] if y.shape[1] == 1 else [f"y{i}" for i in range(y.shape[1])]
        tables.append({**{f"x{i}": x[:, i] for i in range(x.shape[1])}, **dict(zip(y_names, y.T))})
    return tables[0], tables[1] if len(tables) > 1 else None, y_names


def _split(n: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of an n-row file, each in file order; keyed on (seed, fraction, n)."""
    n_val = min(max(int(round(n * fraction)), 1), n - 1)
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _label(v):
    """A class label as JSON has it: the file's string, or a number (int when whole)."""
    return v if isinstance(v, str) else int(v) if float(v).is_integer() else float(v)


def _parse(col: np.ndarray, numeric: bool, where: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values: float64, or stripped strings; mask of missing cells) of a column of known kind."""
    if not numeric:
        return _strings(col)
    v = _floats(col)
    if v is None:
        bad = next(c for c in col.tolist() if _floats(np.array([c])) is None)
        raise UserError(f"{where}: column {name} holds {bad!r}, and it is numeric in the training file; "
                        f"give numbers (or leave the cell empty)")
    return v, np.isnan(v)


def _missing(table: dict, names: list, numeric: dict, where: str) -> np.ndarray:
    """Rows in which any of the columns `names` has no value."""
    gone_N = np.zeros(len(next(iter(table.values()))), bool)
    for name in names:
        gone_N |= _parse(table[name], numeric[name], where, name)[1]
    return gone_N


def fit(train: dict, numeric: dict, features: list, target: list, target_kind: str, scale: str = "standard") -> dict:
    """The preprocessing fitted on the training rows kept, as JSON types (it goes into the run's meta)."""
    spec = []
    for name in features:
        v, gone = _parse(train[name], numeric[name], "training", name)
        if numeric[name]:
            mean, std = (float(np.mean(v[~gone])), float(np.std(v[~gone]))) if (~gone).any() else (0.0, 1.0)
            spec.append({"name": name, "mean": mean, "std": std if std > 0 else 1.0})
            if scale == "quantile" and (~gone).any():
                spec[-1]["quantiles"] = np.quantile(v[~gone], np.linspace(0, 1, _QUANTILES)).tolist()
        else:
            spec.append({"name": name, "categories": sorted(set(v[~gone].tolist()))})
            if len(spec[-1]["categories"]) > _MAX_CATEGORIES:
                odd = next((c for c in v[~gone].tolist() if _floats(np.array([c])) is None), "")
                raise UserError(f"feature column {name} holds {len(spec[-1]['categories']):,} distinct strings, each "
                                f"a one-hot input; leave it out with data.features=[...] (an id?), or fix the "
                                f"cells that are not numbers (e.g. {odd!r})")
    prep = {"features": spec, "target": target, "target_kind": target_kind}
    if target_kind == "values":
        y_NO = np.stack([_floats(train[t]) for t in target], axis=1)
        std = y_NO.std(axis=0)
        return {**prep, "target_mean": y_NO.mean(axis=0).tolist(), "target_std": np.where(std > 0, std, 1.0).tolist()}
    v, _ = _parse(train[target[0]], numeric[target[0]], "training", target[0])
    return {**prep, "labels": [_label(x) for x in sorted(set(v.tolist()))]}


def _normal_scores(v: np.ndarray, knots_Q: list) -> np.ndarray:
    """v mapped through the quantile knots to standard-normal scores (ties averaged, as sklearn's QuantileTransformer)."""
    p_Q = (np.arange(len(knots_Q)) + 0.5) / len(knots_Q)  # the extremes land at +-2.7, not sklearn's +-5.2
    z_Q, k_Q = np.array([NormalDist().inv_cdf(p) for p in p_Q]), np.array(knots_Q)
    return 0.5 * (np.interp(v, k_Q, z_Q) - np.interp(-v, -k_Q[::-1], -z_Q[::-1]))


def encode(table: dict, prep: dict, where: str, standard: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(x_NF float32, rows with a missing feature) under the fitted `prep`; a missing cell is 0 (the mean).

    `standard` z-scores every numeric column even where `prep` has quantiles (the linear baseline's inputs).
    """
    n = len(next(iter(table.values())))
    parts, gone_N = [], np.zeros(n, bool)
    for col in prep["features"]:
        cats = col.get("categories")
        v, gone = _parse(table[col["name"]], cats is None, where, col["name"])
        if cats is None:
            z = _normal_scores(v, col["quantiles"]) if "quantiles" in col and not standard else (v - col["mean"]) / col["std"]
            parts.append(np.where(gone, 0.0, z).astype(np.float32)[:, None])
        else:
            known = np.array(cats or [""], dtype=str)
            pos = np.minimum(np.searchsorted(known, v), len(known) - 1)
            hit = (known[pos] == v) & ~gone & bool(cats)
            part = np.zeros((n, len(cats)), np.float32)
            part[hit, pos[hit]] = 1.0  # an unseen category stays all zeros
            parts.append(part)
        gone_N |= gone
    return np.concatenate(parts, axis=1), gone_N


def targets(table: dict, prep: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(y_NO standardised float32, or y_N class ids int32; rows whose target is missing or an unseen class)."""
    if prep["target_kind"] == "values":
        y_NO = np.stack([_parse(table[t], True, where, t)[0] for t in prep["target"]], axis=1)
        gone_N = np.isnan(y_NO).any(axis=1)
        y_NO = (np.where(np.isnan(y_NO), 0.0, y_NO) - prep["target_mean"]) / prep["target_std"]
        return y_NO.astype(np.float32), gone_N
    labels, name = prep["labels"], prep["target"][0]
    numeric = not any(isinstance(x, str) for x in labels)
    v, gone = _parse(table[name], numeric, where, name)
    known = np.array(labels, np.float64 if numeric else str)
    pos = np.minimum(np.searchsorted(known, v), len(known) - 1)
    ok = (known[pos] == v) & ~gone
    return np.where(ok, pos, 0).astype(np.int32), ~ok


@dataclass
class Rows:
    """The encoded splits: features standardised, targets standardised (values) or class ids."""
    x_train: np.ndarray  # N x F float32
    y_train: np.ndarray  # N x O float32 | N int32
    x_val: np.ndarray
    y_val: np.ndarray
    meta: dict
    summary: str
    baseline: dict
    unit, units_per_example = "rows", 1

    @property
    def provides(self) -> str:
        """What the target became: "values" (regression) or "classes"; the task must read that."""
        return self.meta["target_kind"]

    @property
    def dims(self) -> dict:
        return {k: self.meta[k] for k in ("in_features", "out_features", "num_classes") if k in self.meta}

    def train_batch(self, seed: int, step: int, batch_size: int, rows: slice) -> dict:
        return examples.train_batch(self, seed, step, batch_size, rows)

    def eval_batch(self, i: int, batch_size: int, rows: slice) -> tuple[dict, int]:
        return examples.eval_batch(self, i, batch_size, rows)

    def eval_count(self, batch_size: int, max_batches: int) -> int:
        # The first call that knows the batch size, made while the run is wired, before any compile.
        if len(self.x_train) < batch_size:
            raise UserError(f"the training split holds {len(self.x_train)} rows, fewer than batch_size={batch_size}; "
                            f"lower batch_size or give more rows")
        count = examples.eval_count(len(self.x_val), batch_size, len(self.x_val))
        if count > max_batches:
            print(f"note: validation scores {max_batches * batch_size:,} of its {len(self.x_val):,} rows; "
                 f"eval_batches={count} scores them all", file=sys.stderr)
        return min(count, max_batches)


def _baseline(x_tr, y_tr, x_va, y_va, prep: dict) -> dict:
    """Least squares (with intercept) on the standardised features, scored on validation in target units."""
    if prep["target_kind"] == "classes":
        return {"baseline_accuracy": float(np.mean(y_va == np.bincount(y_tr).argmax()))}
    std, mean = np.array(prep["target_std"]), np.array(prep["target_mean"])
    w, *_ = np.linalg.lstsq(np.c_[x_tr, np.ones(len(x_tr))].astype(np.float64), y_tr * std + mean, rcond=None)
    err_NO = np.c_[x_va, np.ones(len(x_va))] @ w - (y_va * std + mean)
    rmse, mae = np.sqrt((err_NO ** 2).mean(0)), np.abs(err_NO).mean(0)
    var = np.array(prep["target_val_var"])
    r2 = np.where(var > 0, 1.0 - (err_NO ** 2).mean(0) / np.where(var > 0, var, 1.0), np.nan)
    if len(prep["target"]) == 1:
        return {"baseline_rmse": float(rmse[0]), "baseline_mae": float(mae[0]), "baseline_r2": float(r2[0])}
    out = {f"baseline_{k}_{t}": float(v[i]) for i, t in enumerate(prep["target"])
           for k, v in (("rmse", rmse), ("mae", mae), ("r2", r2))}
    return {**out, "baseline_r2": float(r2.mean())}


def _columns(cfg, table: dict, default_target, default_features=None) -> tuple[list, list, dict, str]:
    """(target columns, feature columns, which are numeric, target kind) as the config and the file say."""
    columns = list(table)
    one = isinstance(cfg.target, (str, int, float))  # a column name YAML read as a number is still a name
    target = default_target if cfg.target is None else [str(cfg.target)] if one else [str(t) for t in cfg.target]
    if not target:
        raise UserError(f"pass data.target=COLUMN, the column to predict; {cfg.path} has columns {', '.join(columns)}")
    features = list(cfg.features) if cfg.features is not None else default_features or [c for c in columns if c not in target]
    for key, names in (("data.target", target), ("data.features", features)):
        twice = next((c for i, c in enumerate(names) if c in names[:i]), None)
        if twice is not None:  # two heads or inputs of one column: predict.py's output keys would collide
            raise UserError(f"{key} names {twice} twice; name each column once")
        unknown = [c for c in names if c not in table]
        if unknown:
            raise UserError(f"{key}: {unknown[0]} is not a column of {cfg.path}; its columns are {', '.join(columns)}")
    if not features or set(features) & set(target):
        raise UserError(f"data.features must name at least one column, and not the target ({', '.join(target)})")
    # A column's kind is a property of the file (all its rows), not a statistic of the training split.
    numeric = {c: _floats(table[c]) is not None for c in features + target}
    empty = [c for c in features if _missing(table, [c], numeric, cfg.path).all()]
    if empty:
        raise UserError(f"feature column {empty[0]} of {cfg.path} has no values (all missing or non-finite); "
                        f"leave it out with data.features=[...]")
    kind = cfg.target_kind if cfg.target_kind != "auto" else "values" if all(numeric[t] for t in target) else "classes"
    if kind == "values" and not all(numeric[t] for t in target):
        bad = next(t for t in target if not numeric[t])
        raise UserError(f"data.target={bad} holds non-numbers, and regression (data.target_kind={cfg.target_kind}) "
                        f"needs numbers; to classify it use task=classify data.target_kind=classes")
    if kind == "classes" and len(target) > 1:
        raise UserError(f"data.target lists {len(target)} columns; only regression (data.target_kind=values) takes several")
    return target, features, numeric, kind


def _splits(cfg, table: dict, test, needed: list) -> tuple[dict, dict, dict]:
    """(training table, validation table, how they were split: it goes into meta)."""
    n = len(next(iter(table.values())))
    if cfg.val_path or test is not None:
        val = _table(cfg.val_path, "data.val_path")[0] if cfg.val_path else test
        lacking = [c for c in needed if c not in val]
        if lacking:
            raise UserError(f"the validation rows of {cfg.val_path or cfg.path} lack column(s) {', '.join(lacking)}")
        return table, val, {"rows": n}
    if not 0.0 < cfg.val_fraction < 1.0 or n < 2:
        raise UserError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1) and {cfg.path} hold 2+ rows")
    tr, va = _split(n, cfg.split_seed, cfg.val_fraction)
    train, val = ({k: v[idx] for k, v in table.items()} for idx in (tr, va))
    return train, val, {"rows": n, "seed": cfg.split_seed, "val_fraction": cfg.val_fraction, "val_rows": va.tolist()}


def _inherit(source: dict, target: list, features: list, kind: str) -> dict:
    """The preprocessing of the run this one starts from (init_from), so its params read the same inputs."""
    ours, theirs = (target, features, kind), (source["target"], [c["name"] for c in source["features"]], source["target_kind"])
    if ours != theirs:
        raise UserError(f"the source run (init_from or distill.teacher) predicts {', '.join(theirs[0])} ({theirs[2]}) from {', '.join(theirs[1])}; "
                        f"this run's data.target, data.features or data.target_kind differ: make them the same")
    return {k: source[k] for k in ("features", "target", "target_kind", "target_mean", "target_std", "labels") if k in source}


def load(cfg, inherited: dict | None = None) -> Rows:
    """The train and validation rows named by the data config, preprocessed with training statistics.

    `inherited`: the meta of the run this one starts from (init_from); a table run's preprocessing is reused.
    """
    if not cfg.path:
        raise UserError("pass data.path=FILE.csv (a header line, then rows) or FILE.npz, and data.target=COLUMN")
    for key, allowed in (("target_kind", ("auto", "values", "classes")), ("missing", ("drop", "mean")),
                         ("scale", ("standard", "quantile"))):
        if cfg[key] not in allowed:
            raise UserError(f"data.{key}={cfg[key]} must be {', '.join(allowed[:-1])} or {allowed[-1]}")
    table, test, default_target = _table(cfg.path, "data.path")
    source = inherited if inherited and "features" in inherited else None
    target, features, numeric, kind = _columns(cfg, table, source["target"] if source else default_target,
                                               [c["name"] for c in source["features"]] if source else None)
    train, val, split = _splits(cfg, table, test, features + target)
    keep = ~_missing(train, target + (features if cfg.missing == "drop" else []), numeric, "training")
    _dropped(keep, "training", cfg, kind)
    train = {k: v[keep] for k, v in train.items()}
    prep = _inherit(source, target, features, kind) if source else fit(train, numeric, features, target, kind, cfg.scale)
    (x_tr, _), (y_tr, unknown) = encode(train, prep, "training"), targets(train, prep, "training")
    if unknown.any():  # only inherited labels can miss a training class
        raise UserError(f"the training rows hold classes the source run's labels ({prep['labels']}) lack (init_from or "
                        f"distill.teacher)")
    (x_va, x_gone), (y_va, y_gone) = encode(val, prep, "validation"), targets(val, prep, "validation")
    keep = ~(y_gone | (x_gone if cfg.missing == "drop" else False))
    _dropped(keep, "validation", cfg, kind)
    x_va, y_va = x_va[keep], y_va[keep]
    if kind == "values":
        prep["target_val_var"] = np.var(y_va.astype(np.float64) * prep["target_std"], axis=0).tolist()
        dims = {"in_features": x_tr.shape[1], "out_features": y_tr.shape[1]}
    else:
        dims = {"in_features": x_tr.shape[1], "num_classes": len(prep["labels"])}
    meta = {**dims, "columns": list(table), **prep, "missing": cfg.missing, "split": split}
    n_num = sum("mean" in c for c in prep["features"])
    summary = (f"{len(x_tr):,} training / {len(x_va):,} validation rows of {os.path.basename(cfg.path)}, "
               f"{n_num} numeric + {len(features) - n_num} categorical columns -> {x_tr.shape[1]} inputs; target "
               f"{', '.join(target)} " + (f"({len(prep['labels'])} classes)" if kind == "classes" else "(values)"))
    if cfg.scale != "standard":  # the baseline is the linear model on z-scored features whatever the MLP reads
        x_tr_z, x_va_z = encode(train, prep, "training", True)[0], encode(val, prep, "validation", True)[0][keep]
    else:
        x_tr_z, x_va_z = x_tr, x_va
    return Rows(x_tr, y_tr, x_va, y_va, meta, summary, _baseline(x_tr_z, y_tr, x_va_z, y_va, meta))


def _dropped(keep: np.ndarray, split: str, cfg, kind: str) -> None:
    """Log the rows a split loses; none left is an error."""
    if keep.all():
        return
    why = "a missing target" + (" or an unseen class" if kind == "classes" and split == "validation" else "") + \
        (", or a missing or non-finite feature (data.missing=drop)" if cfg.missing == "drop" else "")
    print(f"data: dropped {int((~keep).sum()):,} of {len(keep):,} {split} rows with {why}", file=sys.stderr)
    if not keep.any():
        raise UserError(f"no {split} row of {cfg.path} is left after dropping rows with missing or non-finite "
                        f"values; fix the file" + (" or pass data.missing=mean" if cfg.missing == "drop" else ""))

