"""What a run's train state is, from its config: built fresh for training, or reloaded from a run dir.

`load_run(out_dir)` is the whole story for sampling and for users' own reload scripts: the
checkpoint carries its config and what the data contributed (vocab; class count, image shape and
normalisation), so nothing else is needed.
"""
import os
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, Callable

import jax
import optax
from flax import nnx
from omegaconf import OmegaConf

import model as models
from core import checkpoint, config, mesh as mesh_lib, prune
from core.optim import make_optimizer, schedule
from core.step import Runner, compile_steps, init_state
from errors import UserError


@dataclass
class StateSpec:
    make_state: Callable  # () -> fresh state; jit it with out_shardings=shardings
    abstract: Any  # ShapeDtypeStructs of the state
    shardings: Any  # NamedShardings of the state on the mesh
    graphdef: Any  # static NNX graph of the model
    tx: Any
    lr_fn: Callable


def state_spec(cfg, dims: dict, mesh) -> StateSpec:
    """The state of `cfg`'s model; `dims` are the task's model arguments (e.g. {"vocab_size": 65})."""
    model_fn = partial(models.build, cfg.model, dims)
    # A compressed run (model.quant: compress.py) is never trained: its checkpoints hold no optimizer moments.
    tx = optax.identity() if cfg.model.get("quant", "none") != "none" else make_optimizer(cfg.optim, cfg.steps)
    make_state = partial(init_state, model_fn, tx, cfg.seed, list(cfg.prune.tensors) if prune.enabled(cfg) else None)
    abstract = jax.eval_shape(make_state)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(0))))
    return StateSpec(make_state, abstract, mesh_lib.state_shardings(mesh, abstract), graphdef, tx,
                     schedule(cfg.optim, cfg.steps))


@dataclass
class Setup:
    """Everything a run computes with: the mesh, its state's layout and the compiled steps."""
    mesh: Any
    spec: StateSpec
    runner: Runner
    sparsity: Callable | None = None  # canonical params -> fraction of zeros among the prunable (pruned runs)

    def fresh_state(self):
        """A newly initialised train state, born sharded by the mesh rules."""
        return jax.jit(self.spec.make_state, out_shardings=self.spec.shardings)()


def setup(cfg, dims: dict, loss_fn: Callable, mesh=None, teacher=None) -> Setup:
    """Mesh -> state spec -> compiled steps for `cfg` (the loop, tests and benchmarks all start here).

    teacher: a core/distill.Teacher already on `mesh`, for distillation.
    """
    mesh = mesh or mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_batch(cfg.batch_size, mesh, cfg.optim.grad_accum)
    spec = state_spec(cfg, dims, mesh)
    pruner = prune.pruner(cfg, spec.abstract["params"])
    runner = compile_steps(mesh, spec.shardings, graphdef=spec.graphdef, tx=spec.tx, loss_fn=loss_fn,
                           lr_fn=spec.lr_fn, seed=cfg.seed, grad_accum=cfg.optim.grad_accum, parallel=cfg.parallel,
                           pruner=pruner, teacher=teacher)
    sparsity = None if pruner is None else jax.jit(partial(prune.sparsity_of, which=pruner.which))
    return Setup(mesh, spec, runner, sparsity)


def model_bytes(cfg, dims: dict) -> int:
    """Bytes of `cfg`'s model weights, from shapes alone (no JAX backend is started)."""
    model = nnx.eval_shape(lambda: models.build(cfg.model, dims, rngs=nnx.Rngs(0)))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))


def run_dims(meta: dict) -> dict:
    """The model arguments a checkpoint's meta records (older checkpoints stored only the vocab)."""
    return meta.get("dims") or {"vocab_size": len(meta["vocab"])}


def saved_config(saved: dict):
    """A checkpoint's resolved config (OmegaConf), with the keys added to the schemas since it was saved
    at their defaults (config.with_defaults), so code reading `cfg.model.NEW_KEY` loads old runs."""
    for group in config.PACKAGES:
        choice = (saved.get(group) or {}).get(config.NODES[group])
        if choice is not None and choice not in config.choices(group):
            raise UserError(f"the run was trained with {group}={choice}, which this code lacks ({config.PACKAGES[group]}/"
                            f"{choice}.py and configs/{group}/{choice}.yaml): restore them to load it")
    return OmegaConf.create(config.with_defaults(saved))


@dataclass
class Run:
    cfg: Any  # the run's resolved config (OmegaConf)
    meta: dict  # the checkpoint's meta: config, task, dims, and vocab (text) or num_classes, mean, std (images)
    step: int
    model: nnx.Module  # ready to call; eval mode unless a dropout key is passed
    state: dict  # the full train state: step, params, opt_state, rest

    @property
    def task(self) -> str:
        return self.meta.get("task", "lm")

    @property
    def vocab(self) -> str:
        """The characters of the token ids (text runs); images use meta["mean"], meta["std"] instead."""
        return self.meta.get("vocab", "")

    @cached_property
    def codec(self):
        """text <-> token ids of an LM run, characters or subwords (data/tokenizer.py)."""
        from data.tokenizer import codec

        return codec(self.meta)


def load_run(out_dir: str, step: int | None = None, mesh=None) -> Run:
    """Reload a run directory (latest checkpoint, or `step`) onto `mesh` (default: all local devices)."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if not os.path.isdir(out_dir):
        raise UserError(f"out_dir={out_dir} {'is a file' if os.path.exists(out_dir) else 'does not exist'}; "
                        f"pass the directory of a training run")
    if not os.path.isdir(checkpoint.ckpt_dir(out_dir)):
        raise UserError(f"{out_dir} holds no checkpoints; train first (python train.py out_dir={out_dir})")
    mngr = checkpoint.manager(out_dir, read_only=True)
    steps = sorted(mngr.all_steps())
    if not steps:
        raise UserError(f"{out_dir} holds no complete checkpoint; train first or wait for the first save")
    if step is not None and step not in steps:
        raise UserError(f"no checkpoint at step {step} in {out_dir}; available: {steps}")
    tried = [step] if step is not None else steps[::-1]
    found = checkpoint.first_readable_meta(mngr, tried, out_dir)
    if found is None:
        raise UserError(f"no readable checkpoint in {out_dir} (tried steps {tried}); pass another step= or retrain")
    newest, meta = found
    cfg = saved_config(meta["config"])
    mesh = mesh or mesh_lib.make_mesh(OmegaConf.create({"data": -1, "fsdp": 1}))
    spec = state_spec(cfg, run_dims(meta), mesh)
    restored = checkpoint.restore_latest(mngr, checkpoint.abstract_like(spec.abstract, spec.shardings), step=step,
                                          set_aside=False, newest=newest)
    mngr.close()
    step_found, state, meta = restored
    return Run(cfg, meta, step_found, nnx.merge(spec.graphdef, state["params"], state["rest"]), state)
