"""Import a nanoGPT or GPT-2 checkpoint as a run: `python import_checkpoint.py source=nanogpt|hf path=P out_dir=RUN`.

source=nanogpt: path is nanoGPT's ckpt.pt; a char-level run also needs meta=PATH/meta.pkl (its dataset's
character table), a GPT-2 BPE run tokenizer=PATH (GPT-2's tokenizer.json, or a directory with vocab.json
and merges.txt). source=hf: path is a Hugging Face GPT-2 directory (config.json + model.safetensors or
pytorch_model.bin) with its tokenizer files, or tokenizer=PATH. No torch is needed (core/tensorfile.py).
RUN is a new run directory that sample.py, serve.py, export.py and init_from=RUN read; its logits equal
the source's (docs/import.md). It is written beside RUN and renamed onto it only once complete.
"""
from core import runtime

if __name__ == "__main__":
    runtime.configure()  # before JAX is imported: core/runtime.py

import sys

import hydra
from hydra.core.config_store import ConfigStore

from core import cli, config
from core.importer import ImportConfig
from errors import UserError

config.register()
ConfigStore.instance().store(name="import_checkpoint_schema", node=ImportConfig)


@hydra.main(config_path="configs", config_name="import_checkpoint", version_base="1.3")
def main(cfg) -> None:
    try:
        from core import importer

        r = importer.run(cfg)
        print(f"imported {cfg.source} {r['path']} (step {r['step']}, vocab {r['vocab_size']:,}) to {cfg.out_dir}; "
              f"sample with `python sample.py out_dir={cfg.out_dir}`; a run started from it with init_from= needs "
              f"its model: {' '.join(r['model_overrides'])}", file=sys.stderr)
    except UserError as e:
        cli.fail(e)


if __name__ == "__main__":
    cli.preflight("import_checkpoint", sys.argv[1:])
    main()
