"""Token datasets on disk: text prepared once into `train.bin` / `val.bin`, read back by memmap.

A dataset directory holds:
- `train.bin`, `val.bin`: the token ids, raw little-endian uint16 (a vocabulary of up to 65,536) or
  uint32, as nanoGPT writes them;
- `tokenizer.json` for a subword tokenizer (data/tokenizer.py), or the characters in `meta.json`;
- `meta.json`: token and UTF-8 byte counts of each split (bits per byte needs them), dtype,
  tokenizer, the inputs (paths, sizes, mtimes) and a fingerprint of inputs plus settings.

`prepare` streams the input (a corpus larger than memory never sits in it), writes the directory
beside `dest` and renames it into place only when complete: a killed prepare leaves no dataset at
`dest`, and the rerun starts afresh and writes the same bytes. A rerun whose fingerprint matches an
existing dataset does nothing.
"""
import glob
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data import tokenizer as tokenizers
from errors import UserError

FORMAT = "tokens-v1"
READ_BYTES = 1 << 22  # text read per step: what sits in memory at once
# Texts are cut for encoding after a newline that is followed by a non-space: there GPT-2's
# pre-tokenizer splits too, so pieces encode exactly as the whole text would, and in parallel.
_CUT = re.compile(r"\n(?=\S)")
PIECE = 2048  # characters per piece handed to the batch encoder: small enough to spread over cores


@dataclass
class Config:
    input: Optional[str] = None  # a text file, a directory (every file under it) or a glob
    tfds_name: Optional[str] = None  # or a TFDS text dataset (downloads; needs internet)
    tfds_data_dir: Optional[str] = None
    download_timeout: float = 60.0
    tokenizer: str = "bpe"  # char | bpe (byte-level, trained on the input) | a tokenizer.json or directory
    vocab_size: int = 4096  # bpe only
    dtype: str = "auto"  # auto (uint16 when the vocabulary fits) | uint16 | uint32
    val_fraction: float = 0.1  # the last fraction of the text (by bytes, within a piece of ~2 KB) is validation
    dest: Optional[str] = None  # the dataset directory to write
    overwrite: bool = False  # replace a dataset of other input or settings at dest


def check(cfg) -> None:
    if not cfg.input and not cfg.tfds_name:
        raise UserError("pass input=FILE|DIR|GLOB (text to prepare) or tfds_name=NAME")
    if not cfg.dest:
        raise UserError("pass dest=DIR, the dataset directory to write (then train with data=tokens data.dir=DIR)")
    if cfg.dtype not in ("auto", "uint16", "uint32"):
        raise UserError(f"dtype={cfg.dtype} must be auto, uint16 or uint32")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise UserError(f"val_fraction={cfg.val_fraction} must be in (0, 1)")


def input_files(spec: str) -> list[str]:
    """The files `spec` names: a file, every file under a directory, or a glob's matches (sorted)."""
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = sorted(os.path.join(d, f) for d, dirs, files in os.walk(path) for f in files if not f.startswith("."))
        if not found:
            raise UserError(f"input={spec} is a directory holding no files; point input at text files")
        return found
    found = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not found:
        raise UserError(f"input={spec} matches no file; pass a text file, a directory or a glob that matches files")
    return found


def _read(path: str):
    """The file's text, READ_BYTES at a time; UserError at its first byte that is not UTF-8."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            try:
                yield decoder.decode(block)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text (byte {offset + e.start}); convert it to UTF-8") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{path} ends inside a UTF-8 character; the file is cut or not UTF-8") from None


def pieces(blocks):
    """Pieces of about PIECE characters, cut where encoding them apart equals encoding them together."""
    rest = ""
    for block in blocks:
        text, start = rest + block, 0
        while (m := _CUT.search(text, start + PIECE)) is not None:
            yield text[start:m.end()]
            start = m.end()
        rest = text[start:]
    if rest:
        yield rest


def fingerprint(files: list[dict], cfg, file_tokenizer: str = "") -> str:
    settings = {k: getattr(cfg, k) for k in ("tfds_name", "tokenizer", "vocab_size", "dtype", "val_fraction")}
    if file_tokenizer:  # a tokenizer file: its content counts, not its name
        settings["tokenizer"] = hashlib.sha256(file_tokenizer.encode()).hexdigest()
    return hashlib.sha256(json.dumps([files, settings, FORMAT], sort_keys=True).encode()).hexdigest()


class _Source:
    """The corpus as documents (files, or a TFDS split), each a stream of text blocks."""

    def __init__(self, cfg):
        self.cfg, self.tfds = cfg, None
        if cfg.input:
            self.files = input_files(cfg.input)
            self.described = [{"path": f, "bytes": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns}
                              for f in self.files]
            self.total = sum(d["bytes"] for d in self.described)
        else:
            from data import text

            self.tfds = text.tfds_texts(cfg, hint="pass input=FILE|DIR|GLOB to prepare local text")  # TFDS's split
            self.described = [{"tfds": cfg.tfds_name, "bytes": len(t.encode())} for t in self.tfds]
            self.total = sum(d["bytes"] for d in self.described)
        if self.total == 0:
            raise UserError(f"input={cfg.input or cfg.tfds_name} holds no text (every file is empty)")

    def documents(self):
        """(split, blocks) per document: split 'train' or 'val' is decided by bytes before the document
        and, within the last train document, by the cut point `blocks` reports."""
        if self.tfds is not None:
            yield from ((s, iter([t])) for s, t in zip(("train", "val"), self.tfds))
        else:
            yield from ((None, _read(f)) for f in self.files)


def _tokenizer_json(cfg, source: _Source, file_tokenizer: str) -> str:
    if cfg.tokenizer == "bpe":
        return tokenizers.train_bpe((p for _, blocks in source.documents() for p in pieces(blocks)), cfg.vocab_size)
    return file_tokenizer  # "" for char


def _codec(cfg, source: _Source, tok_json: str) -> tokenizers.Codec:
    if tok_json:
        return tokenizers.Codec(tokenizer=tok_json)
    chars = set()
    for _, blocks in source.documents():
        for block in blocks:
            chars.update(block)
    return tokenizers.Codec(vocab="".join(sorted(chars)))


def _dtype(cfg, vocab_size: int):
    dtype = cfg.dtype if cfg.dtype != "auto" else ("uint16" if vocab_size <= 1 << 16 else "uint32")
    if dtype == "uint16" and vocab_size > 1 << 16:
        raise UserError(f"the vocabulary has {vocab_size:,} tokens, more than uint16 holds; pass dtype=uint32 "
                        f"or dtype=auto")
    return np.dtype(dtype)


def prepare(cfg, progress=None) -> tuple[dict, bool]:
    """Write the dataset `cfg` describes to cfg.dest: (its meta, False if dest was already up to date)."""
    dest = os.path.abspath(os.path.expanduser(cfg.dest))
    source = _Source(cfg)
    built_in = cfg.tokenizer in tokenizers.BUILT_IN
    file_tokenizer = "" if built_in else tokenizers.from_files(cfg.tokenizer, tokenizers.BUILT_IN)
    fp = fingerprint(source.described, cfg, file_tokenizer)
    existing = _dataset_meta(dest)
    if existing is not None and existing.get("fingerprint") == fp:
        print(f"{dest} is up to date ({existing['train_tokens']:,} + {existing['val_tokens']:,} tokens); nothing to do",
              file=sys.stderr)
        return existing, False
    if existing is None and os.path.exists(dest) and not (os.path.isdir(dest) and not os.listdir(dest)):
        # overwrite=true replaces a dataset, never a run or anything else a mistyped dest names
        raise UserError(f"dest={dest} holds other files than a prepared dataset; not replacing them, even with "
                        f"overwrite=true: pass another dest")
    if existing is not None and not cfg.overwrite:
        raise UserError(f"dest={dest} holds a dataset of other input or settings; pass overwrite=true to replace "
                        f"it, or another dest")
    parent = os.path.dirname(dest)
    if not os.access(parent if os.path.isdir(parent) else os.path.dirname(parent), os.W_OK):
        raise UserError(f"cannot write beside dest={dest}; pass a dest in a writable directory")
    _clear_stale(dest)
    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
    except OSError as e:  # a parent that is a file, or a read-only or virtual file system
        raise UserError(f"cannot create dest={dest} ({e.strerror}); pass a dest in a writable directory") from None
    try:
        tok_json = _tokenizer_json(cfg, source, file_tokenizer)
        codec = _codec(cfg, source, tok_json)
        dtype = _dtype(cfg, codec.size)
        meta = _write(cfg, source, codec, dtype, tmp, progress)
        meta.update(format=FORMAT, fingerprint=fp, inputs=source.described, dtype=dtype.name,
                    vocab_size=codec.size, tokenizer=cfg.tokenizer if built_in else "file",
                    tokenizer_source=None if built_in else os.path.abspath(cfg.tokenizer))
        if tok_json:
            with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
                f.write(tok_json)
        else:
            meta["vocab"] = codec.vocab
        if meta["train_tokens"] == 0 or meta["val_tokens"] == 0:
            raise UserError(f"the input is too short to split: {meta['train_tokens']} training and "
                            f"{meta['val_tokens']} validation tokens; give more text or another val_fraction")
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if existing is not None:  # overwrite: the old dataset goes only once the new one is complete
            old = f"{dest}.old-{os.getpid()}"
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old)
        else:
            if os.path.isdir(dest):  # an empty directory
                os.rmdir(dest)
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta, True


def _clear_stale(dest: str) -> None:
    """Remove what killed prepares left beside dest (their process is gone)."""
    for leftover in glob.glob(glob.escape(dest) + ".tmp-*") + glob.glob(glob.escape(dest) + ".old-*"):
        pid = leftover.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write(cfg, source: _Source, codec, dtype, tmp: str, progress) -> dict:
    """Encode every document into tmp/train.bin and tmp/val.bin; the counts bits per byte needs."""
    cut = (1.0 - cfg.val_fraction) * source.total  # bytes of text before validation starts
    counts = {"train_tokens": 0, "val_tokens": 0, "train_bytes": 0, "val_bytes": 0}
    outs = {s: open(os.path.join(tmp, f"{s}.bin"), "wb") for s in ("train", "val")}
    done, batch, eot, first = 0, [], codec.eot, {"train": True, "val": True}

    def flush():
        for (split, piece), ids in zip(batch, codec.encode_batch([p for _, p in batch])):
            outs[split].write(ids.astype(dtype).tobytes())
            counts[f"{split}_tokens"] += len(ids)
        batch.clear()

    try:
        for given, blocks in source.documents():
            starts_doc = True
            for piece in pieces(blocks):
                n = len(piece.encode())
                split = given or ("train" if done + n / 2 <= cut else "val")
                if starts_doc and eot is not None and not first[split]:  # documents are separated by <|endoftext|>
                    batch.append((split, tokenizers.EOT))
                first[split], starts_doc = False, False
                batch.append((split, piece))
                counts[f"{split}_bytes"] += n
                done += n
                if progress is not None:
                    progress(n)
                if len(batch) >= 512:
                    flush()
        flush()
    finally:
        for f in outs.values():
            f.close()
    return counts


def _dataset_meta(dest: str) -> dict | None:
    """dest's meta when dest is a prepared dataset (a meta.json of this format), else None."""
    try:
        meta = read_meta(dest) if os.path.isdir(dest) else None
    except (OSError, ValueError):  # unreadable or not JSON: not a dataset of ours
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def read_meta(directory: str) -> dict | None:
    """A dataset's meta.json, or None where there is none."""
    path = os.path.join(directory, "meta.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def open_dataset(directory: str):
    """(meta, train_T, val_T): the dataset's meta (with its tokenizer JSON or characters) and its splits as
    read-only memmaps (pages are read only where windows fall). UserError for a directory that is not one."""
    directory = os.path.abspath(os.path.expanduser(directory))
    meta = read_meta(directory) if os.path.isdir(directory) else None
    if meta is None or meta.get("format") != FORMAT:
        raise UserError(f"data.dir={directory} is not a prepared dataset (no meta.json of {FORMAT}); make one with "
                        f"python prepare.py input=TEXT dest={directory}")
    splits = []
    for split in ("train", "val"):
        path = os.path.join(directory, f"{split}.bin")
        dtype = np.dtype(meta["dtype"])
        if not os.path.isfile(path) or os.path.getsize(path) != meta[f"{split}_tokens"] * dtype.itemsize:
            raise UserError(f"{path} is missing or not the size meta.json records; prepare the dataset again")
        splits.append(np.memmap(path, dtype=dtype, mode="r"))
    tok_path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tok_path):
        with open(tok_path, encoding="utf-8") as f:
            meta["tokenizer_json"] = f.read()
    return meta, splits[0], splits[1]
