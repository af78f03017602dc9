"""Model families: `model=NAME` is `configs/model/NAME.yaml` plus the module file `model/NAME.py`.

A family file holds a `Config` dataclass (its typed schema: `family` plus its hyperparameters), the
tuple `TASKS` of the tasks it can train on, `INPUTS` (what it reads: the `INPUT`s of data sources),
and `Model`, an NNX module built as
`Model(cfg, rngs=..., **dims)` where `dims` are the data source's (text, tokens: vocab_size;
text_classify: vocab_size and num_classes; images: num_classes and image_shape; tabular, series:
in_features and out_features, or num_classes). Every model is called as `model(x, key=None)`; a key
means training mode (dropout, batch statistics). Adding a family adds those two files, nothing else.
"""
import importlib


def build(cfg, dims: dict, rngs):
    """Instantiate the module named by `cfg.family` for the data's dims."""
    return importlib.import_module(f"model.{cfg.family}").Model(cfg, rngs=rngs, **dims)
