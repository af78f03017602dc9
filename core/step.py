"""The pure train and eval steps, and the one place they are jitted (with the mesh's shardings).

State is a plain pytree: {"step", "params", "opt_state", "rest", "nonfinite"}; params and rest (non-Param
model state such as batch-norm statistics) are pure dicts that `nnx.merge` turns back into
the module inside the jitted function.
"""
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from core import mesh as mesh_lib


def init_state(model_fn, tx, seed: int) -> dict:
    """A fresh train state; call under jax.jit (or eval_shape) so params are born sharded."""
    _, params, rest = nnx.split(model_fn(nnx.Rngs(params=seed)), nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    zero = jnp.zeros((), jnp.int32)
    return {"step": zero, "params": params, "opt_state": tx.init(params), "rest": rest,
            "nonfinite": {"count": zero, "last_step": zero}}  # steps skipped for a NaN/Inf, and the last


def _loss_and_grads(state, batch, key, *, graphdef, loss_fn):
    def loss_of(params, rest):
        model = nnx.merge(graphdef, params, rest)
        loss, metrics = loss_fn(model, batch, key)
        return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

    (loss, (metrics, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"], state["rest"])
    return grads, metrics, rest


def train_step(state, batch, *, graphdef, tx, loss_fn, lr_fn, seed: int, grad_accum: int = 1):
    """One optimizer update from the global batch: (state, batch) -> (state, metrics). Pure."""
    key = jax.random.fold_in(jax.random.key(seed), state["step"])
    grads_of = partial(_loss_and_grads, graphdef=graphdef, loss_fn=loss_fn)
    if grad_accum == 1:
        grads, metrics, rest = grads_of(state, batch, key)
    else:
        # Micro-batch i takes rows i, i+A, i+2A...: every device keeps feeding from its own shard.
        micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(carry, xs):
            grads_acc, metrics_acc, rest = carry
            mb, i = xs
            grads, metrics, rest = grads_of({**state, "rest": rest}, mb, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, metrics_acc, metrics), rest), None

        zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
        shapes = jax.eval_shape(grads_of, state, jax.tree.map(lambda x: x[0], micro), key)
        init = (zeros(shapes[0]), zeros(shapes[1]), state["rest"])
        (grads, metrics, rest), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
        grads, metrics = jax.tree.map(lambda g: g / grad_accum, (grads, metrics))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient skips the update, so no NaN ever reaches params or checkpoints;
    # the host learns of it from the counter at its next log or checkpoint (no per-step sync).
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    bad = state["nonfinite"]
    new_state = {"step": state["step"] + 1,
                 "params": keep(optax.apply_updates(state["params"], updates), state["params"]),
                 "opt_state": keep(opt_state, state["opt_state"]), "rest": keep(rest, state["rest"]),
                 "nonfinite": {"count": bad["count"] + (~ok).astype(jnp.int32),
                               "last_step": jnp.where(ok, bad["last_step"], state["step"] + 1)}}
    metrics = {f"train_{k}": v for k, v in metrics.items()}
    metrics |= {"grad_norm": grad_norm, "lr": lr_fn(state["step"]), "nonfinite_steps": new_state["nonfinite"]["count"]}
    return new_state, metrics


def eval_step(params, rest, batch, *, graphdef, loss_fn):
    """Metrics of the deterministic model (no dropout, running statistics) on one batch."""
    _, metrics = loss_fn(nnx.merge(graphdef, params, rest), batch, None)
    return metrics


def compile_steps(mesh, state_sharding, *, graphdef, tx, loss_fn, lr_fn, seed, grad_accum):
    """jit both steps once, with in/out shardings and the train state donated."""
    batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    train = jax.jit(
        partial(train_step, graphdef=graphdef, tx=tx, loss_fn=loss_fn, lr_fn=lr_fn, seed=seed, grad_accum=grad_accum),
        in_shardings=(state_sharding, batch_sh), out_shardings=(state_sharding, repl), donate_argnums=0)
    evaluate = jax.jit(partial(eval_step, graphdef=graphdef, loss_fn=loss_fn),
                       in_shardings=(state_sharding["params"], state_sharding["rest"], batch_sh),
                       out_shardings=repl)
    return train, evaluate


def lm_loss(model, batch, key):
    """Next-token cross-entropy; `key` enables dropout (None: eval)."""
    logits_BLV = model(batch["x"], key=key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32), batch["y"]).mean()
    return loss, {"loss": loss}
