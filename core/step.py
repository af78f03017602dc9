"""The pure train and eval steps, and the one place they are jitted (with the mesh's shardings).

State is a plain pytree: {"step", "params", "opt_state", "rest", "nonfinite"} (and "masks" when
pruning, core/prune.py); params and rest (non-Param
model state such as batch-norm statistics) are pure dicts that `nnx.merge` turns back into
the module inside the jitted function.
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from core import mesh as mesh_lib, prune
from tasks import WEIGHT


def init_state(model_fn, tx, seed: int, prune_tensors=None) -> dict:
    """A fresh train state; call under jax.jit (or eval_shape) so params are born sharded.

    prune_tensors: with pruning (core/prune.py), the state also holds its keep-masks, all ones.
    """
    _, params, rest = nnx.split(model_fn(nnx.Rngs(params=seed)), nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    zero = jnp.zeros((), jnp.int32)
    state = {"step": zero, "params": params, "opt_state": tx.init(params), "rest": rest,
             "nonfinite": {"count": zero, "last_step": zero}}  # steps skipped for a NaN/Inf, and the last
    if prune_tensors:
        state["masks"] = prune.initial_masks(params, prune.prunable(params, prune_tensors))
    return state


def _split_weight(metrics: dict):
    """(the metrics to log, what their means were over: tasks.WEIGHT as float32, or None)."""
    metrics = dict(metrics)
    weight = metrics.pop(WEIGHT, None)
    return metrics, None if weight is None else jnp.asarray(weight, jnp.float32)


def _pool(tree, weight, axis_name):
    """Shards' means (and gradients of means) pooled over pmap's devices: weighted by what each averaged
    over (tasks.WEIGHT), or equally without a weight. (pooled tree, the total weight)."""
    if weight is None:
        return jax.lax.pmean(tree, axis_name), None
    total = jax.lax.psum(weight, axis_name)
    return jax.tree.map(lambda x: jax.lax.psum(x * weight, axis_name) / jnp.maximum(total, 1e-12), tree), total


def _loss_and_grads(state, batch, key, *, graphdef, loss_fn, axis_name=None, teacher=None):
    """(grads, metrics, rest, weight): weight is what the means were over (tasks.WEIGHT), or None."""
    def loss_of(params, rest):
        model = nnx.merge(graphdef, params, rest)
        if axis_name is not None:  # pmap: batch statistics over the global batch, as jit computes them
            for _, module in nnx.iter_modules(model):
                if isinstance(module, nnx.BatchNorm):
                    module.axis_name = axis_name
        loss, metrics = loss_fn(model, batch, key) if teacher is None else loss_fn(model, batch, key, teacher)
        return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

    (loss, (metrics, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"], state["rest"])
    metrics, weight = _split_weight(metrics)
    if axis_name is not None:  # pmap: each device saw its rows; pooled, the means are the global batch's
        (grads, metrics), weight = _pool((grads, metrics), weight, axis_name)
        rest = jax.lax.pmean(rest, axis_name)
    return grads, metrics, rest, weight


def train_step(state, batch, teacher_state=None, *, graphdef, tx, loss_fn, lr_fn, seed: int, grad_accum: int = 1,
               axis_name=None, pruner=None, teacher_graphdef=None, teacher_loss=None):
    """One optimizer update from the global batch: (state, batch) -> (state, metrics). Pure.

    Under pmap (`axis_name` set) the same function runs per device on its rows of the batch.
    pruner (core/prune.py): masks updated when due and applied before the update, and again after it.
    teacher_state (core/distill.py): each teacher's {"params", "rest"}; `teacher_loss` replaces `loss_fn`.
    """
    teacher = None
    if teacher_state is not None:
        teacher = tuple(nnx.merge(g, t["params"], t["rest"]) for g, t in zip(teacher_graphdef, teacher_state))
        loss_fn = teacher_loss
    if pruner is not None:
        state = pruner.before_update(state)
    key = jax.random.fold_in(jax.random.key(seed), state["step"])
    if axis_name is not None:  # dropout masks differ per device, as the rows they apply to do
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    grads_of = partial(_loss_and_grads, graphdef=graphdef, loss_fn=loss_fn, axis_name=axis_name, teacher=teacher)
    if grad_accum == 1:
        grads, metrics, rest, _ = grads_of(state, batch, key)
    else:
        # Micro-batch i takes rows i, i+A, i+2A...: every device keeps feeding from its own shard.
        micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(carry, xs):  # sums weighted by each micro-batch's weight (1 without one)
            grads_acc, metrics_acc, weight_acc, rest = carry
            mb, i = xs
            grads, metrics, rest, weight = grads_of({**state, "rest": rest}, mb, jax.random.fold_in(key, i))
            w = jnp.float32(1.0) if weight is None else weight
            add = lambda acc, x: jax.tree.map(lambda a, b: a + b * w, acc, x)  # noqa: E731
            return (add(grads_acc, grads), add(metrics_acc, metrics), weight_acc + w, rest), None

        zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
        shapes = jax.eval_shape(grads_of, state, jax.tree.map(lambda x: x[0], micro), key)
        init = (zeros(shapes[0]), zeros(shapes[1]), jnp.float32(0.0), state["rest"])
        (grads, metrics, weight, rest), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
        grads, metrics = jax.tree.map(lambda g: g / jnp.maximum(weight, 1e-12), (grads, metrics))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient skips the update, so no NaN ever reaches params or checkpoints;
    # the host learns of it from the counter at its next log or checkpoint (no per-step sync).
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    bad = state["nonfinite"]
    params = optax.apply_updates(state["params"], updates)
    params = params if pruner is None else prune.apply(params, state["masks"])  # Adam revives no pruned weight
    new_state = {"step": state["step"] + 1,
                 "params": keep(params, state["params"]),
                 "opt_state": keep(opt_state, state["opt_state"]), "rest": keep(rest, state["rest"]),
                 "nonfinite": {"count": bad["count"] + (~ok).astype(jnp.int32),
                               "last_step": jnp.where(ok, bad["last_step"], state["step"] + 1)}}
    if pruner is not None:
        new_state["masks"] = state["masks"]
    metrics = {f"train_{k}": v for k, v in metrics.items()}
    metrics |= {"grad_norm": grad_norm, "lr": lr_fn(state["step"]), "nonfinite_steps": new_state["nonfinite"]["count"]}
    return new_state, metrics


def eval_step(params, rest, batch, *, graphdef, loss_fn, axis_name=None):
    """Metrics of the deterministic model (no dropout, running statistics) on one batch."""
    _, metrics = loss_fn(nnx.merge(graphdef, params, rest), batch, None)
    metrics, weight = _split_weight(metrics)
    return metrics if axis_name is None else _pool(metrics, weight, axis_name)[0]


def _many(state, batches, teacher_state=None, *, step):
    """K train steps in one dispatch (a lax.scan over K stacked batches); the last step's metrics."""
    state, metrics = jax.lax.scan(lambda s, b: step(s, b, teacher_state), state, batches)
    return state, jax.tree.map(lambda m: m[-1], metrics)


@dataclass
class Runner:
    """The compiled steps plus the state layout they want.

    jit keeps the canonical state (sharded by the mesh rules); pmap keeps one replica per device
    along a leading axis. `put`/`get` convert, so checkpoints and the loop see one format, and a
    run can switch `parallel` between resumes. Metrics come back as scalars (jit) or one equal
    value per device (pmap): read them with `first`.
    """
    train: Callable  # (state, batch) -> (state, metrics)
    train_many: Callable  # (state, K stacked batches) -> (state, metrics of the last): K steps in one dispatch
    stack: Callable  # K process-local row dicts -> stacked global batches for train_many
    evaluate: Callable  # (state, batch) -> metrics
    put: Callable  # canonical state -> runner layout
    get: Callable  # runner layout (any subtree) -> canonical
    batch: Callable  # process-local rows -> global batch in the runner's layout


def first(x) -> float:
    return float(np.ravel(x)[0])


def compile_steps(mesh, state_sharding, *, graphdef, tx, loss_fn, lr_fn, seed, grad_accum, parallel="jit",
                  pruner=None, teacher=None) -> Runner:
    """Compile both steps once: jit with in/out shardings and the state donated, or pmap.

    teacher (core/distill.Teacher): its state is an argument of the train steps, passed by the Runner.
    """
    batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    step = partial(train_step, graphdef=graphdef, tx=tx, loss_fn=loss_fn, lr_fn=lr_fn, seed=seed, grad_accum=grad_accum,
                   pruner=pruner, teacher_graphdef=teacher and teacher.graphdef, teacher_loss=teacher and teacher.loss)
    t_state = None if teacher is None else teacher.state
    t_sh = () if teacher is None else (jax.tree.map(lambda x: x.sharding, t_state),)
    evaluate = partial(eval_step, graphdef=graphdef, loss_fn=loss_fn)
    if parallel == "jit":
        train = jax.jit(step, in_shardings=(state_sharding, batch_sh, *t_sh), out_shardings=(state_sharding, repl),
                        donate_argnums=0)
        ev = jax.jit(evaluate, in_shardings=(state_sharding["params"], state_sharding["rest"], batch_sh),
                     out_shardings=repl)
        stacked_sh = mesh_lib.stacked_batch_sharding(mesh)
        train_many = jax.jit(partial(_many, step=step), in_shardings=(state_sharding, stacked_sh, *t_sh),
                             out_shardings=(state_sharding, repl), donate_argnums=0)
        if teacher is not None:  # the teacher's weights go in as an argument, never as constants
            train, train_many = (partial(lambda f, s, b: f(s, b, t_state), f) for f in (train, train_many))

        def stack(rows: list) -> dict:
            return mesh_lib.global_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]}, stacked_sh)

        identity = lambda t: t  # noqa: E731
        return Runner(train, train_many, stack, lambda s, b: ev(s["params"], s["rest"], b), identity, identity,
                      partial(mesh_lib.global_batch, sharding=batch_sh))
    n = mesh_lib.data_parallel_size(mesh)
    axis = "batch"
    train = jax.pmap(partial(step, axis_name=axis), axis_name=axis, donate_argnums=0)
    train_many = jax.pmap(partial(_many, step=partial(step, axis_name=axis)), axis_name=axis, donate_argnums=0)
    ev = jax.pmap(partial(evaluate, axis_name=axis), axis_name=axis)
    put = jax.jit(lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), t), out_shardings=batch_sh)
    get = jax.jit(lambda t: jax.tree.map(lambda x: x[0], t), out_shardings=repl)
    if jax.process_count() > 1:  # pmap's outputs span this host's devices only: the first replica, made global
        get = lambda t: jax.tree.map(  # noqa: E731
            lambda x: jax.make_array_from_process_local_data(repl, np.asarray(x.addressable_shards[0].data)[0]), t)
    if teacher is not None:  # one replica per device, like the student's state
        t_replicas = put(t_state)
        train, train_many = (partial(lambda f, s, b: f(s, b, t_replicas), f) for f in (train, train_many))
    n_local = n // jax.process_count()

    def batch(local_rows: dict) -> dict:
        per_device = {k: v.reshape(n_local, -1, *v.shape[1:]) for k, v in local_rows.items()}
        return mesh_lib.global_batch(per_device, batch_sh)

    def stack(rows: list) -> dict:
        """K batches of local rows -> (devices, K, rows per device, ...): each device scans its own K."""
        per_device = {k: np.stack([r[k] for r in rows]).reshape(len(rows), n_local, -1, *rows[0][k].shape[1:])
                      for k in rows[0]}
        return mesh_lib.global_batch({k: v.swapaxes(0, 1) for k, v in per_device.items()}, batch_sh)

    return Runner(train, train_many, stack, lambda s, b: ev(s["params"], s["rest"], b), put, get, batch)
