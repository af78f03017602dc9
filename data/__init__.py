"""Data sources: `data=NAME` is `configs/data/NAME.yaml` plus the module file `data/NAME.py`.

A source file holds a `Config` dataclass (`kind` plus its settings), `PROVIDES` (what it can feed a
task: "tokens", "classes", "values") and `load(cfg)`, which reads the data into arrays whose
batches are pure functions of (seed, step). Sources never read the model's or the trainer's config.
"""
