"""Typed config schemas, registered in Hydra's ConfigStore so a typo'd key fails at compose time."""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from core.errors import UserError


@dataclass
class TransformerConfig:
    family: str = "transformer"
    n_layers: int = 6
    n_heads: int = 6
    d_model: int = 384
    mlp_ratio: int = 4
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = False
    dtype: str = "float32"  # compute dtype; params stay float32
    # bfloat16: the blocks' dense matmuls (forward and both gradients) read bf16 operands and accumulate
    # in float32, everything else stays float32 (model/matmul.py); float32: exact
    matmul_dtype: str = "float32"
    scan_layers: bool = False  # one compiled block in a lax.scan; off by default, XLA-CPU while loops are slow
    remat: bool = False


@dataclass
class CNNConfig:
    family: str = "cnn"
    # The classic CIFAR-10 network: conv 32 -> pool -> conv 64 -> pool -> conv 64 -> dense 64 -> classes.
    channels: List[int] = field(default_factory=lambda: [32, 64, 64])
    pool: List[bool] = field(default_factory=lambda: [True, True, False])  # 2x2 max-pool after conv i
    kernel_size: int = 3
    stride: int = 1
    padding: str = "VALID"  # or SAME
    batch_norm: bool = False  # after each conv; statistics live in the state's `rest`
    activation: str = "relu"  # relu | gelu | tanh | silu
    dense: List[int] = field(default_factory=lambda: [64])  # hidden dense layers before the classifier
    dropout: float = 0.0  # before each dense layer
    dtype: str = "float32"


@dataclass
class RNNConfig:
    family: str = "rnn"
    cell: str = "lstm"  # lstm | gru
    n_layers: int = 2
    d_hidden: int = 256
    dropout: float = 0.0  # between layers and before the head
    block_size: int = 128  # training window (truncated BPTT); sampling runs for any length
    dtype: str = "float32"


@dataclass
class TextDataConfig:
    kind: str = "text"
    path: Optional[str] = None  # a local UTF-8 file; None means TFDS `tfds_name`
    tfds_name: str = "tiny_shakespeare"
    tfds_data_dir: Optional[str] = None
    download_timeout: float = 60.0
    val_fraction: float = 0.1  # for local files: the last fraction of the text is validation
    eval_seed: int = 1234  # validation windows are fixed by this, not by the run's seed


@dataclass
class ImageDataConfig:
    kind: str = "images"
    path: Optional[str] = None  # FILE.npz with x_train/y_train/x_test/y_test, or x/y; None: TFDS `tfds_name`
    tfds_name: str = "cifar10"  # or mnist, fashion_mnist (anything with image/label features)
    tfds_data_dir: Optional[str] = None
    download_timeout: float = 60.0
    val_fraction: float = 0.1  # for an .npz holding only x, y: the last fraction is validation
    augment: bool = False  # random crop (padding 4) and horizontal flip, keyed on (seed, step)
    crop_padding: int = 4


@dataclass
class SeriesDataConfig:
    kind: str = "series"
    # Generated noisy sines (random frequency, phase and amplitude per window of model.block_size + 1
    # values), so sequence regression runs offline: predict x[t+1] from x[..t] at every t.
    noise: float = 0.05
    eval_seed: int = 1234


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: Optional[int] = None  # None: decay over the whole run (`steps`)
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    grad_accum: int = 1  # micro-batches per step; the batch is split, the update is one


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
    steps: int = 5000
    batch_size: int = 64  # global, over every device of every host
    seed: int = 0
    out_dir: Optional[str] = None  # None: runs/<name>, so rerunning the same command resumes
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
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    model: Any = None
    data: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)


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
    # XLA-CPU threads: None picks 1 for models of up to 16 MiB of weights (faster on small models:
    # core/xla_flags.py cpu_threads), else one per core; 0 is one per core; N is N.
    cpu_threads: Optional[int] = None


def register() -> None:
    """Put every schema in Hydra's ConfigStore; YAML files list them first in their defaults."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(group="model", name="transformer_schema", node=TransformerConfig)
    cs.store(group="model", name="cnn_schema", node=CNNConfig)
    cs.store(group="model", name="rnn_schema", node=RNNConfig)
    cs.store(group="data", name="text_schema", node=TextDataConfig)
    cs.store(group="data", name="images_schema", node=ImageDataConfig)
    cs.store(group="data", name="series_schema", node=SeriesDataConfig)
    cs.store(group="optim", name="adamw_schema", node=OptimConfig)


def check(cfg) -> None:
    """Semantic checks compose cannot do; raise UserError naming the key, before anything compiles."""
    check_keys(cfg)
    for key in ("steps", "batch_size", "eval_every", "eval_batches", "ckpt_every", "log_every", "steps_per_call"):
        if cfg[key] <= 0:
            raise UserError(f"{key}={cfg[key]} must be a positive integer")
    if cfg.parallel not in ("jit", "pmap"):
        raise UserError(f"parallel={cfg.parallel} must be 'jit' or 'pmap'")
    if cfg.parallel == "pmap" and cfg.steps_per_call != 1:
        raise UserError("parallel=pmap runs one step per call: use steps_per_call=1, or parallel=jit")
    if cfg.parallel == "pmap" and cfg.mesh.fsdp != 1:
        raise UserError("parallel=pmap replicates the state: it needs mesh.fsdp=1 (use parallel=jit for FSDP)")
    if cfg.on_nan not in ("stop", "skip"):
        raise UserError(f"on_nan={cfg.on_nan} must be 'stop' or 'skip'")
    m, o = cfg.model, cfg.optim
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout={m.dropout} must be in [0, 1)")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"model.dtype={m.dtype} must be float32, bfloat16 or float16")
    if m.family == "transformer":
        if m.matmul_dtype not in ("float32", "bfloat16"):
            raise UserError(f"model.matmul_dtype={m.matmul_dtype} must be float32 or bfloat16")
        if m.d_model % m.n_heads:
            raise UserError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
        if m.block_size <= 0 or m.n_layers <= 0:
            raise UserError("model.block_size and model.n_layers must be positive")
    elif m.family == "rnn":
        if m.cell not in ("lstm", "gru"):
            raise UserError(f"model.cell={m.cell} must be 'lstm' or 'gru'")
        if m.block_size <= 0 or m.n_layers <= 0 or m.d_hidden <= 0:
            raise UserError("model.block_size, model.n_layers and model.d_hidden must be positive")
    elif m.family == "cnn":
        if len(m.pool) != len(m.channels) or not m.channels:
            raise UserError(f"model.pool has {len(m.pool)} entries for {len(m.channels)} model.channels; "
                            f"give one true/false per conv layer")
        if m.padding not in ("VALID", "SAME"):
            raise UserError(f"model.padding={m.padding} must be VALID or SAME")
        if m.activation not in ACTIVATIONS:
            raise UserError(f"model.activation={m.activation} must be one of {', '.join(ACTIVATIONS)}")
        if min([m.kernel_size, m.stride, *m.channels, *m.dense]) <= 0:
            raise UserError("model.kernel_size, model.stride, model.channels and model.dense must be positive")
    if o.grad_accum <= 0 or cfg.batch_size % o.grad_accum:
        raise UserError(f"batch_size={cfg.batch_size} is not divisible by optim.grad_accum={o.grad_accum}")
    if o.lr <= 0 or o.min_lr < 0 or o.warmup_steps < 0:
        raise UserError("optim.lr must be > 0, optim.min_lr and optim.warmup_steps >= 0")


ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
MODEL_SCHEMAS = {"transformer": TransformerConfig, "cnn": CNNConfig, "rnn": RNNConfig}
DATA_SCHEMAS = {"text": TextDataConfig, "images": ImageDataConfig, "series": SeriesDataConfig}


def check_keys(cfg) -> None:
    """Reject keys no schema declares (Hydra lets `+key=value` add them even to typed nodes)."""
    model_schema = MODEL_SCHEMAS.get(cfg.model.get("family"))
    data_schema = DATA_SCHEMAS.get(cfg.data.get("kind"))
    if model_schema is None:
        raise UserError(f"unknown model.family={cfg.model.get('family')!r}; available: {', '.join(MODEL_SCHEMAS)}")
    if data_schema is None:
        raise UserError(f"unknown data.kind={cfg.data.get('kind')!r}; available: {', '.join(DATA_SCHEMAS)}")
    nodes = {"": (cfg, TrainConfig), "model.": (cfg.model, model_schema), "data.": (cfg.data, data_schema),
             "optim.": (cfg.optim, OptimConfig), "mesh.": (cfg.mesh, MeshConfig),
             "distributed.": (cfg.distributed, DistributedConfig)}
    for prefix, (node, schema) in nodes.items():
        unknown = sorted(set(node.keys()) - {f.name for f in dataclasses.fields(schema)})
        if unknown:
            raise UserError(f"unknown config key '{prefix}{unknown[0]}'; check its spelling "
                            f"(`python train.py --cfg job` lists every key)")


# Keys whose change between a run and its resumption cannot alter what was already trained.
HARMLESS_KEYS = ("steps", "out_dir", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints",
                 "log_every", "resume", "progress", "on_nan", "mesh", "parallel", "steps_per_call",
                 "distributed", "model.scan_layers", "model.remat", "model.matmul_dtype",
                 "data.tfds_data_dir", "data.download_timeout")


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(harmful, harmless) keys that differ between a checkpoint's config and the current one."""
    a, b = flatten(saved), flatten(current)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    harmless = [k for k in changed if any(k == h or k.startswith(h + ".") for h in HARMLESS_KEYS)]
    return [k for k in changed if k not in harmless], harmless


