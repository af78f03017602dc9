"""AdamW with weight decay on matrices only, linear warmup then cosine/linear decay, global-norm clipping."""
import re

import jax
import optax


def schedule(cfg, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, then decay to min_lr at decay_steps (default: the run's steps).

    cosine: nanoGPT's; linear: BERT's; constant: lr after the warmup.
    """
    decay_steps = max(cfg.decay_steps or steps, cfg.warmup_steps + 1)
    kind = cfg.get("schedule", "cosine")  # checkpoints from before the key: cosine
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, decay_steps, end_value=cfg.min_lr)
    end = cfg.min_lr if kind == "linear" else cfg.lr
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                                 optax.linear_schedule(cfg.lr, end, decay_steps - cfg.warmup_steps)],
                                [cfg.warmup_steps])


STACKED = "blocks"  # models keep layer-stacked params (leading N axis) under this name ...
STACKED_NAME = re.compile(r"_N[A-Z]*$")  # ... or name them with a shape suffix that starts with N (w_in_NHG)


def decay_mask(params):
    """True for matrices (embeddings and conv kernels included), False for biases and norm scales.

    A layer-stacked vector (N x D) is still a vector: its leading layer axis does not count.
    """
    def is_matrix(path, p):
        keys = [str(getattr(k, "key", "")) for k in path]
        stacked = STACKED in keys or bool(keys and STACKED_NAME.search(keys[-1]))
        return p.ndim - stacked >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg, steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
