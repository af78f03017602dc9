"""Typed config schemas, registered in Hydra's ConfigStore so a typo'd key fails at compose time.

The trainer's own keys are `TrainConfig`; `model`, `data` and `task` are the schemas of the chosen
family, source and task, each found by name beside its module (model/, data/, tasks/).
"""
import dataclasses
import functools
import importlib
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from core import distill, optim, prune
from core.distill import DistillConfig
from core.optim import OptimConfig
from core.prune import PruneConfig
from data import shards
from errors import UserError, first_line

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PACKAGES = {"model": "model", "data": "data", "task": "tasks"}  # config group -> the package of its modules
NODES = {"model": "family", "data": "kind", "task": "name"}  # the key naming each group's choice


# The names each group's module must define (docs/configuration.md, "Adding a model family...").
REQUIRED = {"model": ("Config", "TASKS", "INPUTS", "Model"), "data": ("Config", "PROVIDES", "INPUT", "load"),
            "task": ("Config", "READS", "feed", "loss")}


def choices(group: str) -> list[str]:
    """The choices of a config group: one YAML file (and one module of the same name) each."""
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, group)) if f.endswith(".yaml"))


@functools.cache
def problem(group: str, name: str) -> str | None:
    """Why choice `name`'s module cannot serve (it fails to import, lacks a required name), else None."""
    where = f"{PACKAGES[group]}/{name}.py"
    try:
        mod = importlib.import_module(f"{PACKAGES[group]}.{name}")
    except Exception as e:  # noqa: BLE001 - a researcher's half-written file must not break the other choices
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.endswith(where)]
        line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else frames[-1].lineno if frames else None
        return (f"{where} fails to import{f' (line {line})' if line else ''}: {type(e).__name__}: "
                f"{first_line(e)}; fix it, or remove configs/{group}/{name}.yaml")
    missing = [n for n in REQUIRED[group] if not hasattr(mod, n)]
    if missing:
        return (f"{where} lacks {', '.join(missing)}: a {group} module defines {', '.join(REQUIRED[group])} "
                f"(docs/configuration.md)")
    default = next((f.default for f in dataclasses.fields(mod.Config) if f.name == NODES[group]), None)
    if default != name:
        return f"{where}: its Config needs `{NODES[group]}: str = \"{name}\"` (it has {default!r})"
    return None


def usable(group: str) -> list[str]:
    """The choices whose modules serve (see `problem`)."""
    return [n for n in choices(group) if problem(group, n) is None]


def module(group: str, name: str):
    """The module of choice `name` in `group` (model/NAME.py, data/NAME.py, tasks/NAME.py); UserError if broken."""
    error = problem(group, name) if name in choices(group) else None
    if error:
        raise UserError(error)
    return importlib.import_module(f"{PACKAGES[group]}.{name}")


@dataclass
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axis
    fsdp: int = 1


@dataclass
class DistributedConfig:
    enabled: bool = False  # call jax.distributed.initialize() once, before any device is touched
    coordinator: Optional[str] = None  # "host:port" of process 0; None: auto-detect (TPU VM, SLURM)
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    timeout_s: int = 300


@dataclass
class TrainConfig:
    name: str = "default"
    steps: int = 2000
    batch_size: int = 32  # global, over every device of every host
    seed: int = 0
    out_dir: Optional[str] = None  # None: runs/<name>[,<overrides that name it>]; rerunning the command resumes
    eval_every: int = 250
    eval_batches: int = 20
    ckpt_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 10
    resume: bool = True  # False starts afresh, deleting the run's old checkpoints and logs
    on_nan: str = "stop"  # NaN/Inf loss or grads: "stop" the run, or "skip" the update and count it
    progress: bool = True
    parallel: str = "jit"  # "jit" (sharded over the mesh) or "pmap" (replicated, pmean of grads)
    # Train steps per dispatch (a lax.scan over K batches): less host overhead for small models.
    # Logging, eval, checkpoints and stop requests still land on their steps (calls end there).
    steps_per_call: int = 1
    # Start from another run's params (a fresh optimizer): every param whose path both models have,
    # at the newest checkpoint or init_from_step; init_from_skip lists param paths to leave fresh.
    init_from: Optional[str] = None
    init_from_step: Optional[int] = None
    init_from_skip: List[str] = field(default_factory=list)
    compile_cache: Optional[str] = "auto"  # XLA's persistent cache: auto (~/.cache/jaxlab/xla), a dir, or off
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    model: Any = None
    data: Any = None
    task: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)  # gradual magnitude pruning: core/prune.py
    distill: DistillConfig = field(default_factory=DistillConfig)  # a teacher run's outputs: core/distill.py


@dataclass
class SampleConfig:
    out_dir: Optional[str] = None
    step: Optional[int] = None  # None: the latest checkpoint
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    seed: int = 1337
    prompt: str = "\n"
    # XLA-CPU threads: None picks 1 for models of up to 16 MiB of weights, else one per core; 0 is one
    # per core; N is N (core/runtime.py).
    cpu_threads: Optional[int] = None
    compile_cache: Optional[str] = "auto"


@dataclass
class ServeConfig:
    out_dir: Optional[str] = None
    step: Optional[int] = None  # None: the latest checkpoint
    host: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface
    port: int = 8000  # 0: any free port (the log line says which)
    api_key: Optional[str] = None  # None: $JAXLAB_API_KEY if set, else no auth
    slots: int = 16  # sequences decoded at once (the largest batch bucket)
    chunk_tokens: int = 8  # decode steps per device call: sequences join and leave the batch between chunks
    # From idle, how long to gather concurrent requests into a first batch. 0: a language model admits
    # arrivals at every chunk boundary anyway; a wait only adds latency (benchmarks/README.md).
    batch_wait_ms: float = 0.0
    max_queue: int = 256  # requests waiting beyond this get 429
    max_prompt_tokens: Optional[int] = None  # None: the model's context (1024 for recurrent models)
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    max_n: int = 16  # completions per request (prompts x n)
    predict_rows: int = 256  # rows per predict request, and per batch
    max_body_bytes: int = 1 << 20
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    cpu_threads: Optional[int] = 0  # XLA-CPU threads: 0 is one per core (batches gain from them)
    compile_cache: Optional[str] = "auto"


@dataclass
class ExportConfig:
    out_dir: Optional[str] = None
    step: Optional[int] = None  # None: the latest checkpoint
    format: str = "stablehlo"  # stablehlo (jax.export) | savedmodel (TF, through jax2tf)
    dest: Optional[str] = None  # the directory to write: complete or not there at all
    batch: Optional[int] = None  # None: a symbolic batch dimension; N fixes it (for runtimes that want static shapes)
    overwrite: bool = False  # replace dest if it holds an earlier export
    # Lowered for each (jax.export keeps one lowering per platform; the caller's device picks).
    platforms: List[str] = field(default_factory=lambda: ["cpu", "cuda", "tpu"])


@dataclass
class CompressConfig:
    out_dir: Optional[str] = None  # the trained (float) run to compress
    step: Optional[int] = None  # None: the latest checkpoint
    method: str = "int8"  # int8: weight-only | int8_dynamic: int8 activations too, per-token scales
    dest: Optional[str] = None  # the run directory to write: complete or not there at all
    overwrite: bool = False  # replace dest if it holds an earlier compressed run
    embeddings: bool = False  # quantize the token embedding too (a transformer's is its output head as well)
    data_path: Optional[str] = None  # evaluate on this file, not the run's data.path (the data moved)
    # XLA-CPU threads while measuring both models' speed: None picks as sample.py does for the float run.
    cpu_threads: Optional[int] = None
    compile_cache: Optional[str] = "auto"


def register() -> None:
    """Put every schema in Hydra's ConfigStore; each YAML file lists its schema first in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="compress_schema", node=CompressConfig)
    cs.store(name="prepare_schema", node=shards.Config)
    cs.store(group="optim", name="adamw_schema", node=OptimConfig)
    for group in PACKAGES:
        for name in usable(group):  # a broken module is reported when chosen (module(), cli.compose_error)
            cs.store(group=group, name=f"{name}_schema", node=module(group, name).Config)
    if not OmegaConf.has_resolver("unnamed_keys"):
        OmegaConf.register_new_resolver("unnamed_keys", lambda: sorted(UNNAMED_KEYS))


def _module(cfg, group: str):
    choice = cfg[group].get(NODES[group])
    if choice not in choices(group):
        raise UserError(f"unknown {group}.{NODES[group]}={choice!r}; available: {', '.join(choices(group))}")
    return module(group, choice)


def check(cfg) -> None:
    """Semantic checks compose cannot do; raise UserError naming the key, before anything compiles."""
    check_keys(cfg)
    if not str(cfg.name).strip() or "/" in str(cfg.name):
        raise UserError(f"name={cfg.name!r} names the run's directory: give a non-empty name without '/'")
    for key in ("steps", "batch_size", "eval_every", "eval_batches", "ckpt_every", "log_every", "steps_per_call",
                "keep_checkpoints"):
        if cfg[key] <= 0:
            raise UserError(f"{key}={cfg[key]} must be a positive integer")
    for key in ("seed", "data.seed", "data.eval_seed", "data.split_seed"):  # counter-based RNG keys are unsigned
        value = OmegaConf.select(cfg, key)
        if isinstance(value, int) and value < 0:
            raise UserError(f"{key}={value} must be >= 0")
    if cfg.parallel not in ("jit", "pmap"):
        raise UserError(f"parallel={cfg.parallel} must be 'jit' or 'pmap'")
    if cfg.parallel == "pmap" and cfg.mesh.fsdp != 1:
        raise UserError("parallel=pmap replicates the state: it needs mesh.fsdp=1 (use parallel=jit for FSDP)")
    if cfg.on_nan not in ("stop", "skip"):
        raise UserError(f"on_nan={cfg.on_nan} must be 'stop' or 'skip'")
    prune.check(cfg)
    family, source, task = (_module(cfg, g) for g in ("model", "data", "task"))
    if task.READS not in source.PROVIDES:
        fits = [n for n in usable("task") if module("task", n).READS in source.PROVIDES]
        raise UserError(f"task={cfg.task.name} reads {task.READS}, and data={cfg.data.kind} provides "
                        f"{' or '.join(source.PROVIDES)}; use task={' or task='.join(fits)}")

    def fits() -> str:  # the families that train the task on this data's input (only errors import them all)
        return " or model=".join(n for n in usable("model") if cfg.task.name in module("model", n).TASKS
                                 and source.INPUT in module("model", n).INPUTS)

    if cfg.task.name not in family.TASKS:
        raise UserError(f"model={cfg.model.family} cannot train task={cfg.task.name} (it does "
                        f"{', '.join(family.TASKS)}); use model={fits()}")
    if source.INPUT not in family.INPUTS:
        raise UserError(f"model={cfg.model.family} reads {' or '.join(family.INPUTS)}, and data={cfg.data.kind} "
                        f"gives {source.INPUT}; use model={fits()}")
    distill.check(cfg, cfg.task.name, source.INPUT)
    m, o = cfg.model, cfg.optim
    if not 0.0 <= m.get("dropout", 0.0) < 1.0:
        raise UserError(f"model.dropout={m.dropout} must be in [0, 1)")
    if m.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
        raise UserError(f"model.dtype={m.dtype} must be float32, bfloat16 or float16")
    if "seq_len" in cfg.data and cfg.data.seq_len <= 0:
        raise UserError(f"data.seq_len={cfg.data.seq_len} must be positive")
    for key in ("n_layers", "n_heads", "d_model", "mlp_ratio", "block_size", "d_hidden", "d_ff"):  # sizes
        if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool) and m[key] <= 0:
            raise UserError(f"model.{key}={m[key]} must be positive")
    if hasattr(family, "check"):
        family.check(m)
    if hasattr(family, "check_task"):  # options that only some of its tasks read
        family.check_task(m, cfg.task.name)
    if m.get("quant", "none") != "none":
        raise UserError(f"model.quant={m.quant} marks a run compress.py wrote, for inference only; train a float "
                        f"run (model.quant=none) and compress it")
    if "seq_len" in cfg.data and "block_size" in m and cfg.data.seq_len > m.block_size:
        raise UserError(f"data.seq_len={cfg.data.seq_len} is longer than the model's model.block_size="
                        f"{m.block_size} positions; lower data.seq_len or raise model.block_size")
    optim.check(o)
    if cfg.batch_size % o.grad_accum:
        raise UserError(f"batch_size={cfg.batch_size} is not divisible by optim.grad_accum={o.grad_accum}")
    if cfg.get("distill") and cfg.distill.get("teacher_step") is not None and not distill.enabled(cfg):
        raise UserError("distill.teacher_step picks a teacher's checkpoint: pass distill.teacher=RUN too, or drop it")
    if cfg.init_from_step is not None and not cfg.init_from:
        raise UserError("init_from_step needs init_from=RUN_DIR, the run to start from")


def check_keys(cfg) -> None:
    """Reject keys no schema declares (Hydra lets `+key=value` add them even to typed nodes)."""
    nodes = {"": (cfg, TrainConfig), "optim.": (cfg.optim, OptimConfig), "mesh.": (cfg.mesh, MeshConfig),
             "distributed.": (cfg.distributed, DistributedConfig), "prune.": (cfg.prune, PruneConfig),
             "distill.": (cfg.distill, DistillConfig)}
    for group in PACKAGES:
        nodes[f"{group}."] = (cfg[group], _module(cfg, group).Config)
    for prefix, (node, schema) in nodes.items():
        unknown = sorted(set(node.keys()) - {f.name for f in dataclasses.fields(schema)})
        if unknown:
            raise UserError(f"unknown config key '{prefix}{unknown[0]}'; check its spelling "
                            f"(`python train.py --cfg job` lists every key)")


# Keys that may change between a run's checkpoint and its resumption: none alters what was already
# trained. True: they do not name run directories either (they change no number and no way of
# running). False: they name them, so a command that differs in one is a new run unless out_dir= says.
RESUME_SAFE = {
    "out_dir": True, "resume": True, "progress": True, "log_every": True, "eval_every": True,
    "eval_batches": True, "ckpt_every": True, "keep_checkpoints": True, "on_nan": True, "compile_cache": True,
    "distributed": True, "data.tfds_data_dir": True, "data.download_timeout": True,
    "steps": False, "parallel": False, "steps_per_call": False, "mesh": False,
    "model.scan_layers": False, "model.remat": False, "model.matmul_dtype": False, "model.attention": False,
}
# Keys that name nothing though they matter: the experiment is the name already; paths make poor names
# (a run started from another is named by the source directory's name instead: train.py).
UNNAMED_PATHS = ("experiment", "hparams_search", "name", "data.path", "data.val_path", "data.dir", "init_from",
                 "distill.teacher", "data.tokenizer_from")


def _expand(key: str) -> list[str]:
    """A group key (mesh) as its leaves (mesh.data, mesh.fsdp), as overrides spell them."""
    schema = {"mesh": MeshConfig, "distributed": DistributedConfig}.get(key)
    return [f"{key}.{f.name}" for f in dataclasses.fields(schema)] if schema else [key]


UNNAMED_KEYS = {k for key, unnamed in RESUME_SAFE.items() if unnamed for k in _expand(key)} | set(UNNAMED_PATHS)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fill(saved: dict, defaults: dict) -> dict:
    """`saved` plus, at any depth, the keys only `defaults` has."""
    out = dict(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _fill(out[k], v)
    return out


def with_defaults(saved: dict) -> dict:
    """A checkpoint's config plus the keys added to the schemas since it was saved, at their defaults: what
    the run had. A group whose choice this code lacks (or cannot import) keeps its keys as saved."""
    defaults = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    for group in PACKAGES:
        choice = (saved.get(group) or {}).get(NODES[group])
        if choice in choices(group) and problem(group, choice) is None:
            defaults[group] = OmegaConf.to_container(OmegaConf.structured(module(group, choice).Config))
    return _fill(saved, defaults)


def schema_keys(group: str, name: str) -> set:
    """The keys choice `name` of `group` has (its Config's fields)."""
    return {f.name for f in dataclasses.fields(module(group, name).Config)}


def diff(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(harmful, harmless) keys that differ between a checkpoint's config and the current one.

    A key the checkpoint's config lacks (it was saved before the key existed) is harmless while the
    current value is the key's default, which is what the run had.
    """
    a, b, filled = flatten(saved), flatten(current), flatten(with_defaults(saved))
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    harmless = [k for k in changed if any(k == h or k.startswith(h + ".") for h in RESUME_SAFE)
                or (k not in a and k in filled and filled[k] == b.get(k))]
    choice_keys = {f"{g}.{node}" for g, node in NODES.items()}  # another family first: it explains the rest
    return sorted((k for k in changed if k not in harmless), key=lambda k: (k not in choice_keys, k)), harmless
