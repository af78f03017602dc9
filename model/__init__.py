"""Model families: config `model.family` -> a Flax NNX module class.

A family is one module file plus one config file. Its class takes (model_cfg, **dims, rngs=) where
`dims` come from the task (vocab_size; num_classes and image_shape; in_features and out_features),
and its class lists the tasks it serves in `TASKS`. Every family is called as
`model(x, key=None)`; a key means training mode (dropout, batch statistics).
"""
from core.errors import UserError


def families() -> dict:
    from model.cnn import CNN
    from model.rnn import RNN
    from model.transformer import Transformer

    return {"transformer": Transformer, "cnn": CNN, "rnn": RNN}


def check_task(family: str, task: str, data_kind: str) -> None:
    """A one-line error when the model family cannot do the data's task (e.g. a CNN on text)."""
    known = families()
    if task not in known[family].TASKS:
        fits = [name for name, cls in known.items() if task in cls.TASKS]
        raise UserError(f"model={family} cannot train on data={data_kind} (task {task}); "
                        f"use model={' or model='.join(fits)}, or a data= that suits {family}")


def build(cfg, dims: dict, rngs):
    """Instantiate the module named by `cfg.family` for the task's dims."""
    known = families()
    if cfg.family not in known:
        raise UserError(f"unknown model.family={cfg.family!r}; available: {', '.join(sorted(known))}")
    return known[cfg.family](cfg, **dims, rngs=rngs)
