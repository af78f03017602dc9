"""Tokenizers of language-model text: characters, or a subword tokenizer kept as a JSON string.

One codec for every LM path (training data, `prepare.py`, `sample.py`, the server, imported
checkpoints), chosen by what the run's meta holds:
- `meta["vocab"]`: a string whose i-th character is token i (character-level runs);
- `meta["tokenizer"]`: a Hugging Face `tokenizers` JSON string (byte-level BPE trained here, a GPT-2
  `tokenizer.json` or `vocab.json` + `merges.txt` read from disk, or data/wordpiece.py's WordPiece).

Why byte-level BPE through `tokenizers` (the library the encoder's WordPiece already uses): it is
GPT-2's scheme, so any UTF-8 text round-trips exactly and GPT-2's own files load into the same
object; its Rust trainer and batch encoder use every core.
"""
import json
import os
from dataclasses import dataclass

import numpy as np

from errors import UserError

EOT = "<|endoftext|>"  # GPT-2's document separator, the one special token of the BPE trained here
BUILT_IN = ("char", "bpe")  # what a `tokenizer=` key takes besides a tokenizer file


def lib():
    try:
        import tokenizers
    except ImportError:
        raise UserError("subword tokenizers need the `tokenizers` package: pip install tokenizers==0.23.3") from None
    return tokenizers


def load(json_str: str):
    """The tokenizer of a JSON string (a run's meta["tokenizer"])."""
    return lib().Tokenizer.from_str(json_str)


def train_bpe(texts, vocab_size: int) -> str:
    """A byte-level BPE fitted to the iterable of strings `texts`, as its JSON string.

    Token 0 is <|endoftext|>, then the 256 byte symbols, then merges: the same texts give the same string.
    """
    tk = lib()
    if vocab_size < 257 + 1:
        raise UserError(f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs 257 + merges; "
                        f"use 512 or more, or tokenizer=char")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                     initial_alphabet=sorted(tk.pre_tokenizers.ByteLevel.alphabet()))
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def from_files(path: str, names: tuple = ()) -> str:
    """The JSON string of a tokenizer on disk: a `tokenizer.json`, or a directory holding one or GPT-2's
    `vocab.json` + `merges.txt`. UserError naming the file if it does not parse; where it does not exist, the
    error offers `names` too (the built-in tokenizers of the key the path came from)."""
    tk = lib()
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            path = os.path.join(path, "tokenizer.json")
        elif all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
            vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
            try:
                tok = tk.Tokenizer(tk.models.BPE.from_file(vocab, merges))
            except Exception as e:
                raise UserError(f"{path}: vocab.json/merges.txt do not parse as a BPE tokenizer ({_first(e)})") from None
            tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tk.decoders.ByteLevel()
            if tok.token_to_id(EOT) is not None:
                tok.add_special_tokens([EOT])
            return tok.to_str()
        else:
            raise UserError(f"{path} holds neither tokenizer.json nor vocab.json + merges.txt; pass a tokenizer file")
    if not os.path.isfile(path):
        raise UserError(f"tokenizer file {path} does not exist; pass {''.join(n + ', ' for n in names)}a "
                        f"tokenizer.json or a directory holding one")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return tk.Tokenizer.from_str(text).to_str()
    except Exception as e:
        raise UserError(f"{path} does not parse as a tokenizers JSON file ({_first(e)}); pass a tokenizer.json") from None


def _first(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


@dataclass
class Codec:
    """text <-> token ids for a run: `vocab` (characters) or `tokenizer` (JSON) is set."""
    vocab: str = ""
    tokenizer: str = ""

    def __post_init__(self):
        self._tok = load(self.tokenizer) if self.tokenizer else None
        self._index = {ch: i for i, ch in enumerate(self.vocab)}

    @property
    def kind(self) -> str:
        return "subword" if self._tok is not None else "char"

    @property
    def size(self) -> int:
        return self._tok.get_vocab_size() if self._tok is not None else len(self.vocab)

    @property
    def meta(self) -> dict:
        return {"tokenizer": self.tokenizer} if self._tok is not None else {"vocab": self.vocab}

    @property
    def eot(self):
        """The document separator's id, or None (character vocabularies have none)."""
        return self._tok.token_to_id(EOT) if self._tok is not None else None

    def encode(self, text: str) -> np.ndarray:
        """int32 token ids of `text`; UserError naming characters a character vocabulary lacks."""
        if self._tok is not None:
            return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)
        missing = sorted(set(text) - self._index.keys())
        if missing:
            raise UserError(f"characters {''.join(missing)!r} are not in the model's vocabulary "
                            f"of {len(self.vocab)} characters; use only characters seen in training")
        return np.fromiter((self._index[ch] for ch in text), dtype=np.int32, count=len(text))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text; a subword tokenizer spreads them over every core."""
        if self._tok is None:
            return [self.encode(t) for t in texts]
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of token ids. Ids past the tokenizer's end (a model's padded vocabulary: nanoGPT rounds
        GPT-2's 50,257 up to 50,304) are dropped, as `tokenizers` itself drops them."""
        if self._tok is not None:
            return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
        return "".join(self.vocab[i] for i in map(int, ids) if i < len(self.vocab))


def codec(meta: dict) -> Codec:
    """The codec a run's (or a prepared dataset's) meta records."""
    if meta.get("tokenizer"):
        return Codec(tokenizer=meta["tokenizer"])
    if "vocab" in meta:
        return Codec(vocab=meta["vocab"])
    raise UserError("this run records no tokenizer or vocabulary; it was not trained on text")


def summary(json_str: str) -> str:
    """A short name of a tokenizer JSON (its model type and size), for logs and dataset meta."""
    model = json.loads(json_str).get("model", {})
    return f"{model.get('type', '?')} ({load(json_str).get_vocab_size():,} tokens)"
