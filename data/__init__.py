"""Data sources: `data=NAME` is `configs/data/NAME.yaml` plus the module file `data/NAME.py`.

A source file holds a `Config` dataclass (`kind` plus its settings), `PROVIDES` (what it can feed a
task: "tokens", "classes", "values", "sentences"), `INPUT` (what a model reads from it: "text", "images",
"rows", "sequences") and `load(cfg, inherited)`, which reads the data
into arrays whose batches are pure functions of (seed, step); `inherited` is the meta of the run
this one starts from (init_from), whose tokenizer or vocabulary it must reuse. Sources never read the model's or the trainer's config.
"""
