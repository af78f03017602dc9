"""A prepared token dataset (`prepare.py`), read through memmaps: `data=tokens data.dir=DIR`.

The splits stay on disk: a batch's windows are gathered from a memmap (data/text.py's window
functions, pure in (seed, step)), so each process reads only the pages under its own rows. Each
batch maps the file afresh (as nanoGPT does): pages a long-lived map has touched stay counted in the
process's memory, and the kernel maps whole page-cache folios around each window, so one map kept
for a run grew to the whole file (4 GB of a 4.2 GB file within seconds, benchmarks/tokens.py). The tokenizer comes from the dataset and goes into the run's
meta; a run started from another (init_from) must read a dataset of the same tokenizer.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data import shards
from errors import UserError

PROVIDES = ("tokens",)
INPUT = "text"


@dataclass
class Config:
    kind: str = "tokens"
    dir: Optional[str] = None  # a directory written by prepare.py
    seq_len: int = 64  # tokens per training window
    eval_seed: int = 1234  # validation windows are fixed by this, not by the run's seed


@dataclass
class Corpus:
    paths: tuple  # (train.bin, val.bin)
    dtype: np.dtype  # uint16 or uint32
    codec_meta: dict  # {"vocab": characters} or {"tokenizer": JSON}
    vocab_size: int
    tokens_per_byte: float  # of the validation text: turns nats per token into bits per byte
    source: str

    @property
    def train_T(self) -> np.ndarray:
        """The training split's token ids, mapped anew on each access (unmapped when dropped)."""
        return np.memmap(self.paths[0], dtype=self.dtype, mode="r")

    @property
    def val_T(self) -> np.ndarray:
        return np.memmap(self.paths[1], dtype=self.dtype, mode="r")

    @property
    def dims(self) -> dict:
        return {"vocab_size": self.vocab_size}

    @property
    def meta(self) -> dict:
        return {**self.codec_meta, "val_tokens_per_byte": self.tokens_per_byte}

    @property
    def summary(self) -> str:
        return f"vocab {self.vocab_size:,}, {len(self.train_T):,} training tokens memmapped from {self.source}"


def load(cfg, inherited: dict | None = None) -> Corpus:
    if not cfg.dir:
        raise UserError("data=tokens needs data.dir=DIR, a dataset made by python prepare.py input=TEXT dest=DIR")
    meta, train_T, val_T = shards.open_dataset(cfg.dir)
    codec_meta = {"tokenizer": meta["tokenizer_json"]} if "tokenizer_json" in meta else {"vocab": meta["vocab"]}
    if inherited:  # init_from / distillation: the params mean the source run's token ids
        theirs = {k: inherited[k] for k in ("tokenizer", "vocab") if inherited.get(k)}
        if theirs and theirs != codec_meta:
            raise UserError(f"data.dir={cfg.dir} was prepared with another tokenizer than the run this one starts "
                            f"from; prepare it with that run's tokenizer (prepare.py tokenizer=PATH) or drop init_from")
    # A source run may have more embedding rows than its tokenizer has tokens (nanoGPT pads GPT-2's
    # 50,257 to 50,304): the model keeps its shape, the extra ids never occur in the data.
    vocab_size = max(meta["vocab_size"], (inherited or {}).get("dims", {}).get("vocab_size", 0))
    return Corpus((train_T.filename, val_T.filename), train_T.dtype, codec_meta, vocab_size,
                  meta["val_tokens"] / meta["val_bytes"], cfg.dir)
