"""AdamW with weight decay on matrices only, linear warmup + cosine decay, global-norm clipping."""
import jax
import optax


def schedule(cfg, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, cosine decay to min_lr at decay_steps (default: the run's steps)."""
    decay_steps = max(cfg.decay_steps or steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, decay_steps, end_value=cfg.min_lr)


def make_optimizer(cfg, steps: int) -> optax.GradientTransformation:
    # Biases, norm scales and other vectors are not decayed (nanoGPT, GPT-2 practice).
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
