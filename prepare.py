"""Turn text into a token dataset: `python prepare.py input=FILE|DIR|GLOB tokenizer=bpe vocab_size=N dest=DIR`.

Writes DIR/train.bin and DIR/val.bin (uint16 token ids when the vocabulary fits, else uint32), the
tokenizer and DIR/meta.json (data/shards.py); train on it with `data=tokens data.dir=DIR`. tokenizer=
char | bpe (byte-level BPE of vocab_size tokens, trained on the input) | a tokenizer.json or a
directory with one or with GPT-2's vocab.json + merges.txt. Or tfds_name=NAME for a TFDS text set
(downloads). Options: val_fraction=0.1 (the last part of the text), dtype=auto|uint16|uint32,
overwrite=true. DIR appears only when complete; rerunning on the same input does nothing.
"""
import os
import sys
import time

import hydra

from core import cli, config
from errors import UserError

config.register()


@hydra.main(config_path="configs", config_name="prepare", version_base="1.3")
def main(cfg) -> None:
    try:
        from tqdm import tqdm

        from data import shards

        shards.check(cfg)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the Rust encoder on every core
        start = time.perf_counter()
        with tqdm(total=None, unit="B", unit_scale=True, desc="encoding", file=sys.stderr,
                  disable=not sys.stderr.isatty()) as bar:
            meta, wrote = shards.prepare(cfg, progress=bar.update)
        if not wrote:
            return
        seconds = time.perf_counter() - start
        text_bytes = meta["train_bytes"] + meta["val_bytes"]
        print(f"wrote {cfg.dest}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
              f"({meta['dtype']}, vocab {meta['vocab_size']:,}) from {text_bytes:,} bytes in {seconds:.1f} s "
              f"({text_bytes / 1e6 / seconds:.1f} MB/s)", file=sys.stderr)
    except UserError as e:
        cli.fail(e)


if __name__ == "__main__":
    cli.preflight("prepare", sys.argv[1:])
    main()
