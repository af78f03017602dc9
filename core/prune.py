"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"), inside the train step.

`prune.sparsity=S` trains with a mask per prunable tensor, kept in the train state (so an exact
resume holds). Between `prune.start_step` t0 and `prune.end_step` t1, every `prune.every` steps, the
masks are recomputed from the weights' magnitudes at the cubic schedule's sparsity
s(t) = S * (1 - (1 - (t - t0) / (t1 - t0))^3), then held: the weights the masks drop are zero in the
forward pass, and set to zero again after every optimizer update, so Adam's moments can never revive
them. `scope=global` ranks every prunable weight together; `layer` ranks each tensor (each layer
of a layer-stacked tensor) alone. With t0 = t1 = 0 it prunes a loaded run once, then fine-tunes
(`init_from=RUN prune.sparsity=S prune.start_step=0 prune.end_step=0`).
"""
import re
from dataclasses import dataclass, field
from typing import List, Optional

import jax
import jax.numpy as jnp

from errors import UserError


@dataclass
class PruneConfig:
    sparsity: float = 0.0  # the final fraction of zeros among the prunable weights; 0 is off
    start_step: int = 0
    end_step: Optional[int] = None  # None: three quarters of `steps` (the rest fine-tunes at full sparsity)
    every: int = 50  # steps between mask updates
    scope: str = "global"  # global | layer
    # Params whose path (a/b/kernel) matches one of these regexes are pruned: the dense and conv
    # kernels by default, not embeddings, norms or biases.
    tensors: List[str] = field(default_factory=lambda: ["kernel$"])


def enabled(cfg) -> bool:
    """Whether `cfg` (a train config, possibly from before pruning existed) prunes."""
    return bool(cfg.get("prune")) and cfg.prune.sparsity > 0


def end_step(cfg) -> int:
    return cfg.prune.end_step if cfg.prune.end_step is not None else (3 * cfg.steps) // 4


def check(cfg) -> None:
    p = cfg.prune
    if not 0.0 <= p.sparsity < 1.0:
        raise UserError(f"prune.sparsity={p.sparsity} must be in [0, 1) (0 turns pruning off)")
    if not enabled(cfg):
        return
    if p.scope not in ("global", "layer"):
        raise UserError(f"prune.scope={p.scope} must be 'global' or 'layer'")
    if p.every <= 0:
        raise UserError(f"prune.every={p.every} must be positive")
    if not 0 <= p.start_step <= end_step(cfg) <= cfg.steps:
        raise UserError(f"prune.start_step={p.start_step} and prune.end_step={end_step(cfg)} must satisfy "
                        f"0 <= start_step <= end_step <= steps={cfg.steps}")
    for pattern in p.tensors:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"prune.tensors: {pattern!r} is not a regular expression ({e})") from None


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def prunable(params, patterns) -> dict:
    """The params tree with True at the leaves to prune."""
    which = jax.tree_util.tree_map_with_path(lambda p, _: any(re.search(r, _path(p)) for r in patterns), params)
    if not any(jax.tree.leaves(which)):
        names = [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]][:6]
        raise UserError(f"prune.tensors={list(patterns)} matches no parameter; paths look like {', '.join(names)}")
    return which


def initial_masks(params, which):
    """All ones: a mask per prunable leaf, a scalar 1 elsewhere (the tree keeps the params' shape)."""
    return jax.tree.map(lambda x, w: jnp.ones(x.shape if w else (), jnp.bool_), params, which)


def schedule(step, start: int, end: int, sparsity: float):
    """s(t): 0 before `start`, rising as a cubic to `sparsity` at `end`, flat after."""
    progress = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0) if end > start else (step >= start) * 1.0
    return sparsity * (1.0 - (1.0 - progress) ** 3)


def _stacked(path) -> bool:
    """Layer-stacked tensors (the transformer's and encoder's blocks) hold one layer per leading index."""
    return "blocks" in _path(path)


def masks_at(params, which, sparsity, scope: str):
    """Keep-masks dropping the `sparsity` fraction of smallest-magnitude prunable weights."""
    def keep(x, s):  # ties at the threshold are dropped with it: already-zero weights stay pruned
        k = jnp.floor(s * x.size).astype(jnp.int32)
        threshold = jnp.sort(x.ravel())[jnp.maximum(k - 1, 0)]
        return jnp.where(k > 0, x > threshold, True)

    if scope == "global":
        mags = [jnp.abs(x).astype(jnp.float32).ravel() for x, w in zip(jax.tree.leaves(params), jax.tree.leaves(which))
                if w]
        everything = jnp.concatenate(mags)
        k = jnp.floor(sparsity * everything.size).astype(jnp.int32)
        threshold = jnp.where(k > 0, jnp.sort(everything)[jnp.maximum(k - 1, 0)], -1.0)
        return jax.tree.map(lambda x, w: (jnp.abs(x) > threshold) if w else jnp.ones((), jnp.bool_), params, which)

    def per_tensor(path, x, w):
        if not w:
            return jnp.ones((), jnp.bool_)
        mag = jnp.abs(x).astype(jnp.float32)
        if _stacked(path) and x.ndim > 1:
            return jax.vmap(lambda m: keep(m, sparsity).reshape(m.shape))(mag)
        return keep(mag, sparsity).reshape(x.shape)

    return jax.tree_util.tree_map_with_path(per_tensor, params, which)


def apply(params, masks):
    return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), params, masks)


def sparsity_of(params, which) -> jax.Array:
    """The fraction of exactly-zero weights among the prunable tensors, from the params themselves."""
    leaves = [x for x, w in zip(jax.tree.leaves(params), jax.tree.leaves(which)) if w]
    return sum(jnp.sum(x == 0) for x in leaves) / sum(x.size for x in leaves)


@dataclass
class Pruner:
    """What the train step needs: when to recompute the masks, and how."""
    which: dict
    start: int
    end: int
    every: int
    sparsity: float
    scope: str

    def before_update(self, state):
        """The state with new masks, and its params masked by them, if this step is due; else as it is
        (every update already left the params masked)."""
        t = state["step"]
        due = (t >= self.start) & (t <= self.end) & (((t - self.start) % self.every == 0) | (t == self.end))

        def update():
            masks = masks_at(state["params"], self.which, schedule(t, self.start, self.end, self.sparsity), self.scope)
            return masks, apply(state["params"], masks)

        masks, params = jax.lax.cond(due, update, lambda: (state["masks"], state["params"]))
        return {**state, "masks": masks, "params": params}


def pruner(cfg, params) -> Pruner | None:
    """The run's Pruner (None without pruning); `params` may be abstract."""
    if not enabled(cfg):
        return None
    p = cfg.prune
    return Pruner(prunable(params, list(p.tensors)), p.start_step, end_step(cfg), p.every, p.sparsity, p.scope)
