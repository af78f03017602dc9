"""LM text (characters, byte-level BPE or a tokenizer file): a corpus tokenised once into arrays;
windows are pure functions of (seed, step).

There is no iterator state: the window starts of the global batch at `step` come from a
counter-based RNG keyed on (seed, step), and each process gathers only its own rows. Resume,
preemption and a change of device or host count therefore need nothing saved but the step.

With neither `path` nor `tfds_name` set, the corpus is tiny Shakespeare, shipped beside this file
(data/tinyshakespeare.txt: karpathy/char-rnn `data/tinyshakespeare/input.txt`, 1,115,394 bytes).
"""
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np

from data import download, tokenizer as tokenizers
from errors import UserError

PROVIDES = ("tokens",)
INPUT = "text"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyshakespeare.txt")
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


@dataclass
class Config:
    kind: str = "text"
    path: Optional[str] = None  # a local UTF-8 file; None: tfds_name, or the shipped tiny Shakespeare
    tfds_name: Optional[str] = None  # e.g. tiny_shakespeare (downloads; needs internet)
    tfds_data_dir: Optional[str] = None
    download_timeout: float = 60.0
    seq_len: int = 64  # tokens per training window
    val_fraction: float = 0.1  # for local files: the last fraction of the text is validation
    # char: one token per character | bpe: a byte-level BPE of vocab_size tokens trained on the training
    # text (data/tokenizer.py) | a tokenizer.json (or a directory with GPT-2's vocab.json + merges.txt)
    tokenizer: str = "char"
    vocab_size: int = 1024  # bpe only
    eval_seed: int = 1234  # validation windows are fixed by this, not by the run's seed


@dataclass
class Corpus:
    train_T: np.ndarray  # int32 token ids
    val_T: np.ndarray
    vocab: str  # vocab[i] is the character of token i ("" with a subword tokenizer)
    tokens_per_byte: float = 1.0  # of the validation text (UTF-8): turns nats per token into bits per byte
    tokenizer: str = ""  # a subword tokenizer's JSON (data/tokenizer.py)

    @cached_property
    def vocab_size(self) -> int:
        return tokenizers.load(self.tokenizer).get_vocab_size() if self.tokenizer else len(self.vocab)

    @property
    def dims(self) -> dict:
        return {"vocab_size": self.vocab_size}

    @property
    def meta(self) -> dict:
        codec = {"tokenizer": self.tokenizer} if self.tokenizer else {"vocab": self.vocab}
        return {**codec, "val_tokens_per_byte": self.tokens_per_byte}

    @property
    def summary(self) -> str:
        return f"vocab {self.vocab_size}, {len(self.train_T):,} training tokens"


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
    if os.path.isdir(path):
        raise UserError(f"data.path={path} is a directory; pass a text file, data.path=/path/to/input.txt")
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


def tfds_texts(cfg, hint: str = "pass data.path=/path/to/input.txt to train on a local text file") -> tuple[str, str]:
    """(train, validation) text of a TFDS text dataset (prepare.py reads it too)."""
    builder = download.prepare(cfg, hint=hint)
    texts = []
    for split in ("train", "validation"):
        source = builder.as_data_source(split=split)
        texts.append("".join(download.as_str(source[i]["text"]) for i in range(len(source))))
    return texts[0], texts[1]


def load(cfg, inherited: dict | None = None) -> Corpus:
    """Read and tokenise the text named by the data config; the vocab comes from the train part."""
    if cfg.path or not cfg.tfds_name:
        text = _read_file(cfg.path or SHIPPED)
        if not 0.0 < cfg.val_fraction < 1.0:
            raise UserError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
        cut = int(len(text) * (1.0 - cfg.val_fraction))
        train_text, val_text = text[:cut], text[cut:]
    else:
        train_text, val_text = tfds_texts(cfg)
    if cfg.tokenizer != "char" or (inherited and inherited.get("tokenizer")):
        return _subword(cfg, train_text, val_text, inherited)
    vocab = "".join(sorted(set(train_text)))
    if inherited and "vocab" in inherited:  # a run started from another (init_from) keeps its tokens
        extra = sorted(set(vocab) - set(inherited["vocab"]))
        if extra:
            raise UserError(f"the text holds characters {''.join(extra)!r} that the source run's vocabulary "
                            f"(init_from or distill.teacher) lacks; use a run trained on such text, or drop it")
        vocab = inherited["vocab"]
    unseen = set(val_text) - set(vocab)
    if unseen:  # rare characters that only occur in the validation tail cannot be scored
        print(f"warning: dropping {sum(val_text.count(c) for c in unseen)} validation characters "
              f"not in the training vocabulary", file=sys.stderr)
        val_text = "".join(c for c in val_text if c not in unseen)
    return Corpus(encode(train_text, vocab), encode(val_text, vocab), vocab,
                  len(val_text) / max(len(val_text.encode("utf-8")), 1))


def _subword(cfg, train_text: str, val_text: str, inherited: dict | None) -> Corpus:
    """The corpus under a subword tokenizer: the init_from run's, a file's, or a BPE fitted to train_text."""
    from data.shards import pieces

    if inherited and inherited.get("tokenizer"):  # a run started from another keeps its tokens
        tok = inherited["tokenizer"]
    elif inherited and inherited.get("vocab"):
        raise UserError("the source run (init_from or distill.teacher) is character-level; drop data.tokenizer (or set "
                        "data.tokenizer=char)")
    elif cfg.tokenizer == "bpe":
        tok = tokenizers.train_bpe(pieces(iter([train_text])), cfg.vocab_size)
    else:
        tok = tokenizers.from_files(cfg.tokenizer, tokenizers.BUILT_IN)
    codec = tokenizers.Codec(tokenizer=tok)
    train_T, val_T = (np.concatenate(codec.encode_batch(list(pieces(iter([t]))))) for t in (train_text, val_text))
    return Corpus(train_T, val_T, "", len(val_T) / max(len(val_text.encode("utf-8")), 1), tok)


def check_fits(corpus: Corpus, length: int) -> None:
    """Both splits must hold at least one window of `length` tokens."""
    for name, tokens in (("training", corpus.train_T), ("validation", corpus.val_T)):
        if len(tokens) < length:
            raise UserError(f"the {name} text has {len(tokens)} tokens, fewer than a window of {length}; "
                            f"use more text or a smaller data.seq_len")


def window_starts(n_tokens: int, length: int, batch_size: int, seed: int, stream: int, step: int):
    """Start offsets of the B windows of the global batch at `step`: a pure function of its arguments."""
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, n_tokens - length + 1, size=batch_size)


def _windows(tokens_T, seed, stream, step, batch_size, length, rows) -> np.ndarray:
    starts_B = window_starts(len(tokens_T), length, batch_size, seed, stream, step)[rows]
    return tokens_T[starts_B[:, None] + np.arange(length)].astype(np.int32, copy=False)  # a memmap: uint16


def train_windows(corpus: Corpus, seed: int, step: int, batch_size: int, length: int, rows: slice) -> np.ndarray:
    """This process's `rows` of the global batch of training windows (B x length token ids) at `step`."""
    return _windows(corpus.train_T, seed, _TRAIN_STREAM, step, batch_size, length, rows)


def eval_windows(corpus: Corpus, eval_seed: int, i: int, batch_size: int, length: int, rows: slice) -> np.ndarray:
    """Validation batch i: the same windows in every run with the same eval_seed, whatever the run's seed."""
    return _windows(corpus.val_T, eval_seed, _EVAL_STREAM, i, batch_size, length, rows)
