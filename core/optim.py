"""AdamW with weight decay on matrices only, linear warmup then cosine/linear decay, global-norm clipping,
and optionally a learning rate that shrinks with depth below the head (layer-wise decay, for fine-tuning)."""
import math
import re
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from errors import UserError


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    schedule: str = "cosine"  # cosine | linear (warmup, then linear decay to min_lr) | constant (after warmup)
    warmup_steps: int = 100
    decay_steps: Optional[int] = None  # None: decay over the whole run (`steps`)
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only: never biases, norm scales or other vectors
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    grad_accum: int = 1  # micro-batches per step; the batch is split, the update is one
    # Fine-tuning: layer i of N learns at lr * layer_decay^(N - i), the embeddings at ^(N + 1),
    # the head at lr (ELECTRA's layer-wise decay); 1.0 is off.
    layer_decay: float = 1.0


def check(o) -> None:
    """UserError naming the first optim.* value that cannot train (the composed config's optim node)."""
    if o.grad_accum <= 0:
        raise UserError(f"optim.grad_accum={o.grad_accum} must be a positive integer (1 is off)")
    bad = next((k for k, v in o.items() if isinstance(v, float) and not math.isfinite(v)), None)
    if bad:  # NaN passes every comparison below
        raise UserError(f"optim.{bad}={o[bad]} must be a finite number")
    if o.lr <= 0 or o.min_lr < 0 or o.warmup_steps < 0:
        raise UserError(f"optim.lr={o.lr} must be > 0, optim.min_lr={o.min_lr} and optim.warmup_steps="
                        f"{o.warmup_steps} >= 0")
    if not 0.0 < o.layer_decay <= 1.0:
        raise UserError(f"optim.layer_decay={o.layer_decay} must be in (0, 1]: 1 is off, 0.8 ELECTRA's fine-tuning value")
    if o.schedule not in ("cosine", "linear", "constant"):
        raise UserError(f"optim.schedule={o.schedule} must be cosine, linear or constant")
    if o.min_lr > o.lr:
        raise UserError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}: the schedule decays from lr to min_lr")
    if o.decay_steps is not None and o.decay_steps <= 0:
        raise UserError(f"optim.decay_steps={o.decay_steps} must be positive (leave it unset to decay over steps)")
    for key in ("b1", "b2"):
        if not 0.0 <= o[key] < 1.0:
            raise UserError(f"optim.{key}={o[key]} must be in [0, 1)")
    if o.eps <= 0 or o.weight_decay < 0 or o.grad_clip < 0:
        raise UserError(f"optim.eps={o.eps} must be > 0, optim.weight_decay={o.weight_decay} and optim.grad_clip="
                        f"{o.grad_clip} >= 0 (grad_clip 0 is off)")


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


def _names(path) -> list:
    return [str(getattr(k, "key", "")) for k in path]


def _stacked(names: list) -> bool:
    """Whether a param (by its path's names) has a leading layer axis."""
    return STACKED in names or bool(names and STACKED_NAME.search(names[-1]))


def decay_mask(params):
    """True for matrices (embeddings and conv kernels included), False for biases and norm scales.

    A layer-stacked vector (N x D) is still a vector: its leading layer axis does not count.
    """
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim - _stacked(_names(path)) >= 2, params)


def depth_scales(params, decay: float):
    """Each param's learning-rate factor under layer-wise decay (ELECTRA's, Clark et al. 2020).

    The N stacked layers get decay^(N - i) for layer i (an (N, 1, ...) array), embedding tables
    decay^(N + 1), everything else (final norm, heads) 1: the layers nearest the input, whose
    pretrained features are most general, move least.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    N = max((leaf.shape[0] for path, leaf in flat if _stacked(_names(path))), default=0)

    def scale(path, p):
        names = _names(path)
        if _stacked(names):
            return (decay ** (N - jnp.arange(N, dtype=jnp.float32))).reshape((N,) + (1,) * (p.ndim - 1))
        return jnp.float32(decay ** (N + 1) if names and names[-1] == "embedding" else 1.0)

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_depth(decay: float) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, depth_scales(updates, decay)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg, steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    layer_decay = cfg.get("layer_decay", 1.0)  # configs from before the key: off
    parts = ([optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []) + [adamw]
    # After AdamW: its whole step, weight decay included, shrinks with depth (a per-layer learning rate).
    parts += [scale_by_depth(layer_decay)] if layer_decay != 1.0 else []
    return optax.chain(*parts) if len(parts) > 1 else adamw
