"""Data sources: `data=NAME` is `configs/data/NAME.yaml` plus the module file `data/NAME.py`.

A source file holds a `Config` dataclass (`kind` plus its settings), `PROVIDES` (what it can feed a
task: "tokens", "classes", "values") and `load(cfg)`, which reads the data into arrays whose
batches are pure functions of (seed, step). Sources never read the model's or the trainer's config.
"""
import importlib
import os

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "data")


def names() -> list[str]:
    """Every source, by its config file."""
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def source(name: str):
    """The module of source `name` (its Config, PROVIDES and load)."""
    if name not in names():
        raise KeyError(name)
    return importlib.import_module(f"data.{name}")
