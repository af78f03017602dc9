"""Character-level text: a corpus tokenised once into arrays; batches are pure functions of (seed, step).

There is no iterator state: the window starts of the global batch at `step` come from a
counter-based RNG keyed on (seed, step), and each process gathers only its own rows. Resume,
preemption and a change of device or host count therefore need nothing saved but the step.
"""
import os
import sys
from dataclasses import dataclass

import numpy as np

from core.errors import UserError
from data import download

_TRAIN_STREAM, _EVAL_STREAM = 0, 1


@dataclass
class Corpus:
    train_T: np.ndarray  # int32 token ids
    val_T: np.ndarray
    vocab: str  # vocab[i] is the character of token i

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def encode(text: str, vocab: str) -> np.ndarray:
    """Token ids of `text`; raises UserError naming characters outside the vocab."""
    index = {ch: i for i, ch in enumerate(vocab)}
    missing = sorted(set(text) - index.keys())
    if missing:
        raise UserError(f"characters {''.join(missing)!r} are not in the model's vocabulary "
                        f"of {len(vocab)} characters; use only characters seen in training")
    return np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))


def decode(ids, vocab: str) -> str:
    return "".join(vocab[i] for i in ids)


def _read_file(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise UserError(f"data.path={path} does not exist; pass data.path=/path/to/input.txt")
    if path.endswith(".npz"):
        raise UserError(f"data.path={path} is an array file, and data=text reads text; for images pass "
                        f"model=cnn data=images (or +experiment=mnist_cnn)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data.path={path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not text:
        raise UserError(f"data.path={path} is empty; point data.path at a text file with content")
    return text


def _tfds_texts(cfg) -> tuple[str, str]:
    """(train, validation) text of a TFDS text dataset."""
    builder = download.prepare(cfg, hint="pass data.path=/path/to/input.txt to train on a local text file")
    texts = []
    for split in ("train", "validation"):
        source = builder.as_data_source(split=split)
        texts.append("".join(_as_str(source[i]["text"]) for i in range(len(source))))
    return texts[0], texts[1]


def _as_str(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def load_corpus(cfg) -> Corpus:
    """Read and tokenise the text named by the data config; the vocab comes from the train part."""
    if cfg.path:
        text = _read_file(cfg.path)
        if not 0.0 < cfg.val_fraction < 1.0:
            raise UserError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
        cut = int(len(text) * (1.0 - cfg.val_fraction))
        train_text, val_text = text[:cut], text[cut:]
    else:
        train_text, val_text = _tfds_texts(cfg)
    vocab = "".join(sorted(set(train_text)))
    unseen = set(val_text) - set(vocab)
    if unseen:  # rare characters that only occur in the validation tail cannot be scored
        print(f"warning: dropping {sum(val_text.count(c) for c in unseen)} validation characters "
              f"not in the training vocabulary", file=sys.stderr)
        val_text = "".join(c for c in val_text if c not in unseen)
    return Corpus(encode(train_text, vocab), encode(val_text, vocab), vocab)


def check_fits(corpus: Corpus, block_size: int) -> None:
    """Both splits must hold at least one window of block_size + 1 tokens."""
    for name, tokens in (("training", corpus.train_T), ("validation", corpus.val_T)):
        if len(tokens) <= block_size:
            raise UserError(f"the {name} text has {len(tokens)} characters, not more than "
                            f"model.block_size={block_size}; use more text or a smaller block_size")


def window_starts(n_tokens: int, block_size: int, batch_size: int, seed: int, stream: int, step: int):
    """Start offsets of the B windows of the global batch at `step`: a pure function of its arguments."""
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, n_tokens - block_size, size=batch_size)


def batch_rows(tokens_T: np.ndarray, starts_B: np.ndarray, block_size: int) -> dict:
    """Inputs and next-token targets for the given window starts."""
    window_BL1 = tokens_T[starts_B[:, None] + np.arange(block_size + 1)]
    return {"x": window_BL1[:, :-1], "y": window_BL1[:, 1:]}


def train_batch(corpus: Corpus, seed: int, step: int, batch_size: int, block_size: int, rows: slice) -> dict:
    """This process's `rows` of the global training batch at `step`."""
    starts = window_starts(len(corpus.train_T), block_size, batch_size, seed, _TRAIN_STREAM, step)
    return batch_rows(corpus.train_T, starts[rows], block_size)


def eval_batch(corpus: Corpus, eval_seed: int, i: int, batch_size: int, block_size: int, rows: slice) -> dict:
    """Validation batch i: the same windows in every run with the same eval_seed, whatever the run's seed."""
    starts = window_starts(len(corpus.val_T), block_size, batch_size, eval_seed, _EVAL_STREAM, i)
    return batch_rows(corpus.val_T, starts[rows], block_size)
