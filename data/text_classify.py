"""Labelled sentences from a TSV/CSV (e.g. GLUE SST-2), WordPiece-tokenised: for task=classify or task=mlm.

Each row becomes [CLS] tokens [SEP], cut to data.seq_len and padded with [PAD]=0. Labels (ints or
strings) map to the ids of the sorted distinct training labels; `meta["labels"]` keeps them as the
file writes them. The tokenizer is trained on the training text only (data/wordpiece.py) and goes
whole into `meta["tokenizer"]`, unless the run starts from another (`init_from`): then that run's
tokenizer and labels are reused, so its embeddings and head keep meaning the same tokens and classes.

Without data.val_path the validation split is a permutation keyed on data.split_seed. Training
batches follow data/images.py: epoch e is a permutation keyed on (seed, e), each process gathers
only its rows; validation batches are in file order, the last padded with rows of `mask` 0.
With data.tfds_name (e.g. glue/sst2) the sentences and labels are the TFDS dataset's
data.text_column and data.label_column features, its train and validation splits (a
data.val_fraction of train where it has no validation split), downloaded through data/download.py
within data.download_timeout.
"""
import csv
import functools
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data import download, examples, wordpiece
from errors import UserError, missing

PROVIDES = ("classes", "sentences")
INPUT = "text"
_SPLIT_STREAM = 4
_LENGTH_STEP = 8  # data.group_by_length cuts batches to multiples of this
# Steps that share a cut length: a call of that many steps (steps_per_call) stacks them. Their length
# is the block's, never the call's, so dropout masks (shaped by it) do not depend on the call grouping.
_LENGTH_BLOCK = 10


@dataclass
class Config:
    kind: str = "text_classify"
    path: Optional[str] = None  # FILE.tsv / .csv (delimiter by extension; other names: sniffed)
    tfds_name: Optional[str] = None  # instead of path: a TFDS dataset, e.g. glue/sst2 (downloads; needs internet)
    tfds_data_dir: Optional[str] = None
    download_timeout: float = 60.0
    val_path: Optional[str] = None  # None: a data.val_fraction of data.path, drawn with data.split_seed
    text_column: str = "sentence"  # a header name (TFDS: a feature), or with data.header=false a column index
    label_column: str = "label"
    header: bool = True
    # table: a TSV/CSV of sentences and labels | lines: each non-empty line of a text file is one
    # sentence, in order and unlabelled (task=mlm; task.nsp pairs consecutive lines); without
    # data.val_path its last data.val_fraction of lines is validation, kept in order.
    format: str = "table"
    seq_len: int = 128  # tokens per sentence with [CLS] and [SEP]; longer ones are cut
    vocab_size: int = 8000  # WordPiece vocabulary, five special tokens included
    val_fraction: float = 0.1
    split_seed: int = 0
    eval_seed: int = 1234  # task=mlm: the validation masks are fixed by this, not by the run's seed
    # task=mlm: training sentences per row (RoBERTa's packing): short sentences leave most of a row
    # [PAD], which costs as much compute as text; validation rows stay one sentence each.
    pack: int = 1
    # Keep only the rows whose words are not a run of adjacent words of a longer row, before the
    # validation split. SST lists every phrase of each parse tree (67,349 rows, 6,886 of them not
    # inside another): a masked LM pretrained on the phrases predicts most tokens from a fragment.
    drop_subphrases: bool = False
    # task=classify: sort each window of this many training batches by length (at most an epoch's), and
    # cut the batches of each 10 steps to their longest sentence, rounded up to a multiple of 8: batches
    # of short phrases skip most [PAD] columns. 0: every row keeps data.seq_len. Hugging Face's
    # group_by_length sorts 50 batches at a time; with 10 steps sharing a length, 100 cuts more.
    group_by_length: int = 0
    # A trained data=text_classify run whose WordPiece this run reads instead of fitting its own (as
    # init_from and distill.teacher do): models of two families on the same tokens can be distilled
    # into each other or averaged.
    tokenizer_from: Optional[str] = None


@dataclass
class Sentences:
    x_train: np.ndarray  # N x L int32 token ids, [PAD]=0
    y_train: np.ndarray  # N int32 label ids
    x_val: np.ndarray
    y_val: np.ndarray
    labels: list  # labels[i] is label id i as the file writes it
    tokenizer: str  # wordpiece JSON
    vocab_size: int
    summary: str
    baseline: dict
    provides: Optional[str] = None  # "sentences" for unlabelled lines: core/task.py then refuses task=classify
    group_by_length: int = 0  # data.group_by_length
    unit, units_per_example = "sentences", 1

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Each training row's length up to its last token that is not [PAD] ([SEP]); grouped runs only."""
        L = self.x_train.shape[1]
        return np.where(self.x_train != wordpiece.PAD, np.arange(1, L + 1), 0).max(axis=1)

    @functools.cached_property
    def _window(self):
        """A window's sorted order, computed once for its steps (a length block can span two windows)."""
        return functools.lru_cache(maxsize=2)(functools.partial(examples.length_window, self.lengths))

    @property
    def dims(self) -> dict:
        return {"vocab_size": self.vocab_size, "num_classes": len(self.labels)}

    @property
    def meta(self) -> dict:
        return {**self.dims, "labels": self.labels, "tokenizer": self.tokenizer}

    def train_batch(self, seed: int, step: int, batch_size: int, rows: slice) -> dict:
        """This process's rows of the global batch at `step`: {"x": B x L int32, "y": B int32}. Grouped by
        length, L is the longest row of the global batches of the step's block of 10 rounded up to a
        multiple of 8: a function of (seed, step), the same on every process and whatever the calls."""
        if not self.group_by_length:
            return examples.train_batch(self, seed, step, batch_size, rows)
        first = step - step % _LENGTH_BLOCK
        longest = max(int(self.lengths[self._grouped(seed, s, batch_size)].max())
                      for s in range(first, first + _LENGTH_BLOCK))
        L = min(-(-longest // _LENGTH_STEP) * _LENGTH_STEP, self.x_train.shape[1])
        idx_B = self._grouped(seed, step, batch_size)[rows]
        return {"x": self.x_train[idx_B, :L], "y": self.y_train[idx_B]}

    def _grouped(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """The global batch at `step` grouped by length: within an epoch, so no example meets itself."""
        W = min(self.group_by_length, max(len(self.x_train) // batch_size, 1))
        w, j = divmod(step, W)
        return self._window(seed, w, W, batch_size)[j * batch_size:(j + 1) * batch_size]

    def eval_batch(self, i: int, batch_size: int, rows: slice) -> tuple[dict, int]:
        return examples.eval_batch(self, i, batch_size, rows)

    def eval_count(self, batch_size: int, max_batches: int) -> int:
        return examples.eval_count(len(self.x_val), batch_size, max_batches)


def _read(path: str, key: str, header: bool) -> tuple[list, list]:
    """(column names, rows of cells) of a delimited file; names are "0", "1", ... without a header."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise UserError(f"{key}={path} {missing(path)}; pass a TSV/CSV file (e.g. GLUE's SST-2 train.tsv)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{key}={path} is not UTF-8 text; save it as UTF-8") from None
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tsv", ".tab"):  # GLUE's TSVs do not quote: a " is part of the sentence
        rows = list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    else:
        rows = list(csv.reader(text.splitlines(), delimiter=examples.delimiter(path, text[:65536])))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows or (header and len(rows) == 1):
        raise UserError(f"{key}={path} holds no rows; give one sentence and its label per line")
    names = [c.strip() for c in rows[0]] if header else [str(i) for i in range(len(rows[0]))]
    return names, rows[1:] if header else rows


def _column(names: list, name: str, key: str, path: str, header: bool) -> int:
    if name not in names:
        hint = "" if header else " (data.header=false: columns are numbered from 0)"
        raise UserError(f"{path} has no column {key}={name!r}{hint}; its columns are {', '.join(names)}")
    return names.index(name)


def _table(path: str, key: str, cfg) -> tuple[list, list]:
    """(texts, label cells as stripped strings) of one file."""
    names, rows = _read(path, key, cfg.header)
    t = _column(names, str(cfg.text_column), "data.text_column", path, cfg.header)
    y = _column(names, str(cfg.label_column), "data.label_column", path, cfg.header)
    first = 2 if cfg.header else 1
    for n, r in enumerate(rows):
        if len(r) <= max(t, y):
            raise UserError(f"{path}: line {n + first} has {len(r)} fields, fewer than the columns read; "
                            f"is the delimiter right?")
        if not r[y].strip():
            raise UserError(f"{path}: line {n + first} has no label in column {cfg.label_column}")
    return [r[t] for r in rows], [r[y].strip() for r in rows]


def _as_label(cell: str):
    """A label as the file writes it: an int where the cell is a whole number, else the string."""
    try:
        return int(cell)
    except ValueError:
        pass
    try:
        value = float(cell)
    except ValueError:
        return cell
    if value.is_integer():
        return int(value)
    raise UserError(f"label {cell!r} is a fraction, and classes are ints or names; is data.label_column "
                    f"a score (use data=tabular task=regress) or the wrong column?")


def _label_ids(cells: list, labels: list, where: str, known: str = "the training labels") -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    values = [_as_label(c) for c in cells]
    unseen = sorted({repr(v) for v in values if v not in index and str(v) not in index})  # str: mixed kinds
    if unseen:
        raise UserError(f"{where} has labels {', '.join(unseen[:5])} that {known} "
                        f"({', '.join(map(repr, labels[:10]))}) lack; a classifier cannot predict them")
    return np.array([index[v] if v in index else index[str(v)] for v in values], np.int32)


def _sorted_labels(cells: list) -> list:
    values = {_as_label(c) for c in cells}
    if len({type(v) for v in values}) > 1:  # numbers and names mixed: keep them all as names
        values = {str(v) for v in values}
    return sorted(values)


def _split(n: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) in file order, keyed on (seed, n)."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"data.val_fraction={fraction} must be in (0, 1)")
    if n < 2:
        raise UserError(f"data.path holds {n} row; give more rows or a data.val_path")
    n_val = min(max(int(round(n * fraction)), 1), n - 1)
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def maximal_phrases(texts: list, cells: list) -> tuple[list, list]:
    """The rows (in file order, duplicates once) whose words are not a contiguous run of a longer row's."""
    words = [tuple(t.split()) for t in texts]
    rows, inside, keep = set(words), set(), []
    for i in sorted(range(len(texts)), key=lambda i: -len(words[i])):  # longest first: their runs are marked
        if words[i] in inside:
            continue
        keep.append(i)
        n = len(words[i])
        inside.add(words[i])  # an empty row too: a duplicate is kept once
        # Only runs that are rows: every run of 6,886 sentences would hold ~300 MB of tuples.
        inside.update(run for a in range(n) for b in range(a + 1, n + 1) if (run := words[i][a:b]) in rows)
    keep.sort()
    return [texts[i] for i in keep], [cells[i] for i in keep]


def unigram_entropy(x_NL: np.ndarray) -> float:
    """Entropy (nats) of the token frequencies, specials left out: the loss of guessing a masked
    token from frequencies alone, the floor a masked LM has to beat."""
    ids = x_NL[x_NL >= len(wordpiece.SPECIALS)]
    p = np.bincount(ids)[len(wordpiece.SPECIALS):] / max(len(ids), 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _tfds_tables(cfg) -> tuple[list, list, list | None, list | None]:
    """(texts, label cells) of a TFDS dataset's train split, and of its validation split (None: it has none)."""
    hint = "pass data.path=TRAIN.tsv data.val_path=DEV.tsv (e.g. GLUE's SST-2 TSVs) instead"
    builder = download.prepare(cfg, hint=hint)
    features, splits = builder.info.features, builder.info.splits
    for key in ("text_column", "label_column"):
        if str(cfg[key]) not in features:
            raise UserError(f"TFDS dataset {cfg.tfds_name!r} has no feature data.{key}={cfg[key]!r}; its features "
                            f"are {', '.join(features)}")
    if "train" not in splits:
        raise UserError(f"TFDS dataset {cfg.tfds_name!r} has no train split (it has {', '.join(splits)}); {hint}")
    out = []
    for split in ("train", "validation"):
        if split not in splits:
            out += [None, None]
            continue
        rows = builder.as_data_source(split=split)
        examples_ = [rows[i] for i in range(len(rows))]
        out += [[download.as_str(e[str(cfg.text_column)]) for e in examples_],
                [download.as_str(e[str(cfg.label_column)]).strip() for e in examples_]]
    return tuple(out)


def _lines(path: str, key: str) -> list:
    """The non-empty lines of a UTF-8 text file, stripped."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise UserError(f"{key}={path} {missing(path)}; pass a text file with one sentence per line")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError:
        raise UserError(f"{key}={path} is not UTF-8 text; save it as UTF-8") from None
    lines = [line for line in lines if line]
    if len(lines) < 2:
        raise UserError(f"{key}={path} holds {len(lines)} non-empty lines; data.format=lines needs a sentence per line")
    return lines


def _tokenizer(inherited: dict, texts: list[str], vocab_size: int) -> str:
    """The WordPiece of the run this one reads (init_from, distill.teacher, data.tokenizer_from), else one
    fitted to `texts`."""
    tokenizer = inherited.get("tokenizer")
    if "vocab" in inherited or (tokenizer is not None and not wordpiece.has_specials(tokenizer)):
        # Its ids would be read as [PAD]=0, [CLS]=2 ...: the embeddings would mean other tokens.
        raise UserError("the run named by init_from (or distill.teacher, data.tokenizer_from) has a vocabulary "
                        "without WordPiece's "
                        "[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, which data=text_classify reads: name a "
                        "data=text_classify run there, or drop it")
    return tokenizer or wordpiece.train(texts, vocab_size)


def _load_lines(cfg, inherited: dict) -> Sentences:
    """data.format=lines: unlabelled sentences in file order (validation: the tail, or data.val_path)."""
    if cfg.tfds_name:
        raise UserError("data.format=lines reads data.path, a text file; data.tfds_name is for tables of labels")
    texts = _lines(cfg.path, "data.path")
    if cfg.val_path:
        val_texts = _lines(cfg.val_path, "data.val_path")
    else:
        if not 0.0 < cfg.val_fraction < 1.0:
            raise UserError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
        cut = min(max(int(round(len(texts) * (1 - cfg.val_fraction))), 1), len(texts) - 1)
        texts, val_texts = texts[:cut], texts[cut:]
    tokenizer = _tokenizer(inherited, texts, cfg.vocab_size)
    x_train, cut = wordpiece.encode(tokenizer, texts, cfg.seq_len)
    x_val, cut_val = wordpiece.encode(tokenizer, val_texts, cfg.seq_len)
    if cut or cut_val:
        print(f"note: {cut + cut_val:,} lines are longer than data.seq_len={cfg.seq_len} tokens and were cut",
              file=sys.stderr)
    V = wordpiece.vocab_size(tokenizer)
    summary = (f"{len(texts):,} training / {len(val_texts):,} validation lines, WordPiece vocab {V}"
               f"{' (read from another run)' if inherited.get('tokenizer') else ''}, "
               f"{(x_train != wordpiece.PAD).sum(axis=1).mean():.1f} tokens per line of {cfg.seq_len}")
    zeros = lambda x: np.zeros(len(x), np.int32)  # noqa: E731 - no labels: the arrays' shape only
    return Sentences(x_train, zeros(x_train), x_val, zeros(x_val), [], tokenizer, V, summary,
                     {"baseline_unigram_loss": unigram_entropy(x_train)}, provides="sentences")


def load(cfg, inherited: dict | None = None) -> Sentences:
    """Read, split, tokenise and label the sentences the data config names."""
    if cfg.path and cfg.tfds_name:
        raise UserError(f"data.path and data.tfds_name={cfg.tfds_name} are both set; pass one of them")
    if not cfg.path and not cfg.tfds_name:
        raise UserError("data=text_classify needs data.path=TRAIN.tsv (and data.val_path=DEV.tsv, or a "
                        "data.val_fraction of it held out), or data.tfds_name=glue/sst2")
    if cfg.tfds_name and cfg.val_path:
        raise UserError("data.val_path is for data.path; with data.tfds_name the dataset's validation split is used")
    if cfg.pack < 1:
        raise UserError(f"data.pack={cfg.pack} must be 1 (one sentence per row) or more")
    group = cfg.get("group_by_length", 0)  # (configs from before the key lack it)
    if group < 0:
        raise UserError(f"data.group_by_length={group} must be 0 (off) or a number of batches to sort by length")
    if cfg.seq_len < 3:
        raise UserError(f"data.seq_len={cfg.seq_len} leaves no room beside [CLS] and [SEP]; use 3 or more")
    if cfg.format not in ("table", "lines"):
        raise UserError(f"data.format={cfg.format} must be table (sentences and labels) or lines (one sentence a line)")
    if cfg.format == "lines":
        if cfg.get("drop_subphrases"):
            raise UserError("data.drop_subphrases=true drops rows of a table (SST's phrases); data.format=lines "
                            "keeps every line in order: leave it false")
        return _load_lines(cfg, inherited or {})
    if cfg.tfds_name:
        texts, cells, val_texts, val_cells = _tfds_tables(cfg)
    else:
        texts, cells = _table(cfg.path, "data.path", cfg)
        val_texts, val_cells = _table(cfg.val_path, "data.val_path", cfg) if cfg.val_path else (None, None)
    if cfg.get("drop_subphrases"):  # (configs from before the key lack it)
        texts, cells = maximal_phrases(texts, cells)
    if val_texts is None:
        tr, va = _split(len(texts), cfg.split_seed, cfg.val_fraction)
        texts, cells, val_texts, val_cells = ([texts[i] for i in tr], [cells[i] for i in tr],
                                              [texts[i] for i in va], [cells[i] for i in va])
    inherited = inherited or {}
    # A classifier's classes carry over (its head means them); a pretraining's labels, if its file had
    # any, were never learnt.
    kept = inherited.get("labels") if inherited.get("task", "classify") == "classify" else None
    labels = kept or _sorted_labels(cells)
    known = "the training labels" if not kept else \
        "the labels of the run it starts from or distils (init_from, distill.teacher)"
    y_train = _label_ids(cells, labels, "the training data", known)
    y_val = _label_ids(val_cells, labels, "the validation data", known)
    tokenizer = _tokenizer(inherited, texts, cfg.vocab_size)
    x_train, cut = wordpiece.encode(tokenizer, texts, cfg.seq_len)
    x_val, cut_val = wordpiece.encode(tokenizer, val_texts, cfg.seq_len)
    if cut or cut_val:
        print(f"note: {cut:,} of {len(texts):,} training and {cut_val:,} of {len(val_texts):,} validation "
              f"sentences are longer than data.seq_len={cfg.seq_len} tokens and were cut", file=sys.stderr)
    V = wordpiece.vocab_size(tokenizer)
    majority = float(np.mean(y_val == np.bincount(y_train, minlength=len(labels)).argmax()))
    real = (x_train != wordpiece.PAD).sum(axis=1)
    summary = (f"{len(texts):,} training / {len(val_texts):,} validation sentences, {len(labels)} classes, "
               f"WordPiece vocab {V}{' (read from another run)' if inherited.get('tokenizer') else ''}, "
               f"{real.mean():.1f} tokens per sentence of {cfg.seq_len}")
    return Sentences(x_train, y_train, x_val, y_val, labels, tokenizer, V, summary,
                     {"baseline_accuracy": majority, "baseline_unigram_loss": unigram_entropy(x_train)},
                     group_by_length=group)
