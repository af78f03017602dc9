"""Model families: config `model.family` -> constructor(model_cfg, vocab_size, rngs=...)."""
from core.errors import UserError


def build(cfg, vocab_size: int, rngs):
    """Instantiate the module named by `cfg.family`."""
    from model.transformer import Transformer

    families = {"transformer": Transformer}
    if cfg.family not in families:
        raise UserError(f"unknown model.family={cfg.family!r}; available: {', '.join(sorted(families))}")
    return families[cfg.family](cfg, vocab_size, rngs=rngs)
