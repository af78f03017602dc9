"""A nanoGPT `ckpt.pt` or a Hugging Face GPT-2 directory in, a run directory of ours out.

Both are GPT-2's architecture, which model/transformer.py has: pre-LN blocks, learned positions, a head
tied to the token embedding, LayerNorm eps 1e-5, biases (`model.bias`), and the MLP's GELU exact
(nanoGPT's nn.GELU: `model.activation=gelu`) or tanh-approximated (GPT-2's gelu_new: `gelu_tanh`).
The vocabulary is the checkpoint's (nanoGPT pads GPT-2's 50,257 to 50,304; both are kept as they are).
Weights are renamed into our layout: the per-layer tensors stacked on a leading N axis, torch
nn.Linear's (out, in) matrices transposed (GPT-2's Conv1D already is (in, out)). Anything the
checkpoint holds that has no place here (another architecture) is an error naming it, never dropped.

The run has the config `python train.py` would compose for that model, the checkpoint's step (nanoGPT's
iter_num; 0 for HF) with fresh optimizer moments, and the tokenizer in its meta: a char-level run's
vocab from nanoGPT's meta.pkl, else a tokenizers JSON (data/tokenizer.py). It is written beside out_dir
and renamed onto it once complete, as compress.py does; import.json records where it came from.
"""
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from core import tensorfile
from errors import UserError

SOURCES = ("nanogpt", "hf")
# GPT-2's per-layer and top-level weight names -> our param paths (model/transformer.py).
LAYER = {"ln_1.weight": "ln1/scale", "ln_1.bias": "ln1/bias", "attn.c_attn.weight": "attn/qkv/kernel",
         "attn.c_attn.bias": "attn/qkv/bias", "attn.c_proj.weight": "attn/proj/kernel",
         "attn.c_proj.bias": "attn/proj/bias", "ln_2.weight": "ln2/scale", "ln_2.bias": "ln2/bias",
         "mlp.c_fc.weight": "mlp/fc/kernel", "mlp.c_fc.bias": "mlp/fc/bias", "mlp.c_proj.weight": "mlp/proj/kernel",
         "mlp.c_proj.bias": "mlp/proj/bias"}
TOP = {"wte.weight": "wte/embedding", "wpe.weight": "wpe/embedding", "ln_f.weight": "ln_f/scale",
       "ln_f.bias": "ln_f/bias"}
BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers some files carry: not weights
NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "dropout")
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
REPORT = "import.json"


@dataclass
class ImportConfig:
    source: Optional[str] = None  # nanogpt | hf
    path: Optional[str] = None  # nanogpt: the ckpt.pt; hf: the directory (config.json + weights)
    out_dir: Optional[str] = None  # the run directory to write; it must not exist
    meta: Optional[str] = None  # nanogpt, char-level: the dataset's meta.pkl (stoi/itos)
    tokenizer: Optional[str] = None  # a tokenizer.json, or a directory holding one or vocab.json + merges.txt


@dataclass
class Source:
    """A checkpoint read into our terms: architecture, GPT-2-named weights as (in, out) matrices, step."""
    arch: dict  # n_layers, n_heads, d_model, block_size, bias, activation, dropout, vocab_size
    weights: dict  # "h.0.attn.c_attn.weight" -> array
    step: int
    tokenizer_hint: str  # where a tokenizer would come from, for the error when none is given


def _tied(weights: dict, origin: str) -> dict:
    """`weights` without lm_head.weight, which must be the token embedding (our head is tied to it)."""
    head = weights.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(np.asarray(head), np.asarray(weights.get("wte.weight"))):
        raise UserError(f"{origin}: lm_head.weight differs from the token embedding wte.weight; model=transformer "
                        f"ties its head to the embedding, so an untied checkpoint cannot be imported")
    return weights


def _check_tensors(weights: dict, origin: str) -> None:
    """Every weight must have been read as an array (not a placeholder for something tensorfile cannot read)."""
    for k, v in weights.items():
        if not isinstance(v, np.ndarray):
            raise UserError(f"{origin}: weight {k!r} is not a tensor we can read ({v!r:.80}); save it as a plain "
                            f"float tensor")


def read_nanogpt(path: str) -> Source:
    """nanoGPT's ckpt.pt: {'model': state_dict, 'model_args': {...}, 'iter_num': N, ...}."""
    ckpt = tensorfile.read_torch(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path} holds no 'model' state dict: not a nanoGPT ckpt.pt (nanoGPT's train.py saves "
                        f"{{'model': ..., 'model_args': ..., 'iter_num': ...}})")
    args = ckpt.get("model_args")
    if not isinstance(args, dict):
        raise UserError(f"{path} holds no 'model_args': not a nanoGPT ckpt.pt")
    for k in NANOGPT_ARGS[:5]:
        if not isinstance(args.get(k), int):
            raise UserError(f"{path}: model_args['{k}'] is missing or not an integer ({args.get(k)!r})")
    extra = sorted(k for k, v in args.items() if k not in NANOGPT_ARGS and v)
    if extra:  # a fork's switch that is on (use_rmsnorm=True...): another architecture
        raise UserError(f"{path}: model_args['{extra[0]}']={args[extra[0]]!r} is not part of nanoGPT's GPT, and "
                        f"model=transformer has no such option; import a checkpoint of nanoGPT's own model.py")
    state = {re.sub(r"^(_orig_mod\.)?(transformer\.)?", "", k): v for k, v in ckpt["model"].items()}
    _check_tensors(state, path)
    for k, v in state.items():  # nn.Linear stores (out, in); ours is (in, out)
        if k.split(".", 2)[-1] in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            state[k] = v.T
    dataset = ckpt["config"].get("dataset") if isinstance(ckpt.get("config"), dict) else None
    arch = dict(n_layers=args["n_layer"], n_heads=args["n_head"], d_model=args["n_embd"],
                block_size=args["block_size"], vocab_size=args["vocab_size"],
                bias=bool(args.get("bias", "ln_f.bias" in state)), activation="gelu",
                dropout=float(args.get("dropout", 0.0)))
    hint = (f"pass meta=PATH/meta.pkl for a char-level run (nanoGPT keeps it at data/{dataset or '<dataset>'}/"
            f"meta.pkl), or tokenizer=PATH (GPT-2's tokenizer.json, or a directory with vocab.json and merges.txt) "
            f"for a GPT-2 BPE one")
    return Source(arch, _tied(state, path), int(ckpt.get("iter_num", 0) or 0), hint)


def _hf_weights(path: str) -> dict:
    """The state dict of an HF directory: model.safetensors, pytorch_model.bin, or their sharded indexes."""
    readers = (("model.safetensors", tensorfile.read_safetensors), ("pytorch_model.bin", tensorfile.read_torch))
    for name, read in readers:
        if os.path.isfile(os.path.join(path, name)):
            weights = read(os.path.join(path, name))
            if not isinstance(weights, dict):
                raise UserError(f"{os.path.join(path, name)} holds no state dict ({type(weights).__name__})")
            return weights
        index = os.path.join(path, name + ".index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise UserError(f"{index} does not parse ({e}); download it again") from None
            out = {}
            for shard in shards:
                out.update(read(os.path.join(path, shard)))
            return out
    raise UserError(f"path={path} holds no model.safetensors or pytorch_model.bin; pass a Hugging Face GPT-2 "
                    f"directory as save_pretrained writes it")


def read_hf(path: str) -> Source:
    """A Hugging Face GPT-2 directory: config.json and model.safetensors or pytorch_model.bin."""
    if not os.path.isdir(path):
        raise UserError(f"path={path} is not a directory; source=hf reads a save_pretrained directory "
                        f"(config.json + model.safetensors or pytorch_model.bin)")
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            c = json.load(f)
    except FileNotFoundError:
        raise UserError(f"path={path} holds no config.json; pass a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path} does not parse as JSON ({e}); download it again") from None
    n_embd = c.get("n_embd", 768)
    checks = [("model_type", c.get("model_type") == "gpt2", "only GPT-2 (model_type gpt2) has our architecture"),
              ("activation_function", c.get("activation_function", "gelu_new") in HF_ACTIVATIONS,
               f"model.activation has {', '.join(HF_ACTIVATIONS)}"),
              ("n_inner", c.get("n_inner") in (None, 4 * n_embd), "our MLP is 4 x n_embd wide"),
              ("layer_norm_epsilon", abs(c.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "our LayerNorms use 1e-5"),
              ("scale_attn_weights", c.get("scale_attn_weights", True) is True, "our attention scales by 1/sqrt(K)"),
              ("scale_attn_by_inverse_layer_idx", not c.get("scale_attn_by_inverse_layer_idx", False),
               "our attention does not scale by layer"),
              ("add_cross_attention", not c.get("add_cross_attention", False), "ours is decoder-only"),
              ("tie_word_embeddings", c.get("tie_word_embeddings", True) is True, "our head is tied to the embedding")]
    for key, ok, why in checks:
        if not ok:
            raise UserError(f"{cfg_path}: {key}={c.get(key)!r} is an architecture model=transformer does not have "
                            f"({why}); it cannot be imported")
    state = {k.removeprefix("transformer."): v for k, v in _hf_weights(path).items()}
    _check_tensors(state, path)
    arch = dict(n_layers=c.get("n_layer", 12), n_heads=c.get("n_head", 12), d_model=n_embd,
                block_size=c.get("n_positions", 1024), vocab_size=c.get("vocab_size", 50257), bias=True,
                activation=HF_ACTIVATIONS[c.get("activation_function", "gelu_new")],
                dropout=float(c.get("resid_pdrop", 0.0)))
    hint = (f"{path} holds no tokenizer.json or vocab.json + merges.txt: pass tokenizer=PATH (a tokenizer.json or "
            f"its directory)")
    return Source(arch, _tied(state, path), 0, hint)


def to_params(src: Source, abstract_params, origin: str) -> dict:
    """Our params tree (float32 numpy) from the source's weights; UserError naming any weight without a place,
    missing, or of another shape."""
    from core.init_from import merge, paths

    want = paths(abstract_params)
    N = src.arch["n_layers"]
    names = {f"blocks/{ours}": [f"h.{i}.{theirs}" for i in range(N)] for theirs, ours in LAYER.items()}
    names.update({ours: [theirs] for theirs, ours in TOP.items()})
    used = {n for ours, theirs in names.items() if ours in want for n in theirs}
    buffers = {f"h.{i}.{b}" for i in range(N) for b in BUFFERS}
    unknown = sorted(k for k in src.weights if k not in used and k not in buffers)
    if unknown:
        raise UserError(f"{origin}: weight {unknown[0]!r} has no place in model=transformer with these sizes "
                        f"(n_layers={N}, bias={src.arch['bias']}): another architecture, which cannot be imported")
    loaded = {}
    for ours, want_leaf in want.items():
        theirs = names.get(ours)
        missing = [n for n in theirs or [ours] if n not in src.weights]
        if theirs is None or missing:
            raise UserError(f"{origin} lacks weight {(missing or [ours])[0]!r}, which model=transformer needs; it "
                            f"is not a complete GPT-2/nanoGPT checkpoint")
        arrays = [np.asarray(src.weights[n]) for n in theirs]
        if any(not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16" for a in arrays):
            raise UserError(f"{origin}: weight {theirs[0]!r} is {arrays[0].dtype}, not floating point")
        value = (np.stack(arrays) if ours.startswith("blocks/") else arrays[0]).astype(np.float32)
        if value.shape != tuple(want_leaf.shape):
            needs = tuple(want_leaf.shape)[1:] if ours.startswith("blocks/") else tuple(want_leaf.shape)
            raise UserError(f"{origin}: weight {theirs[0]!r} has shape {arrays[0].shape}, and the config's model "
                            f"needs {needs}; the checkpoint's config does not describe its weights")
        loaded[ours] = value
    return merge(abstract_params, loaded)


def tokenizer_meta(src: Source, icfg, hf_dir: str | None) -> dict:
    """meta["vocab"] (a char-level nanoGPT run's meta.pkl) or meta["tokenizer"] (a tokenizers JSON)."""
    from data import tokenizer

    V = src.arch["vocab_size"]
    if icfg.meta and icfg.tokenizer:
        raise UserError("pass meta= (a char-level run's meta.pkl) or tokenizer=, not both")
    if icfg.meta:
        if icfg.source != "nanogpt":
            raise UserError("meta= is nanoGPT's char-level meta.pkl; source=hf takes its tokenizer from the directory "
                            "or tokenizer=")
        m = tensorfile.read_pickle(os.path.abspath(os.path.expanduser(icfg.meta)))
        itos = m.get("itos") if isinstance(m, dict) else None
        if not isinstance(itos, dict) or sorted(itos) != list(range(len(itos))) or \
                not all(isinstance(c, str) and len(c) == 1 for c in itos.values()):
            raise UserError(f"meta={icfg.meta} holds no character table 'itos' ({{id: char}}): not a char-level "
                            f"dataset's meta.pkl; for GPT-2 BPE pass tokenizer= instead")
        if len(itos) != V:
            raise UserError(f"meta={icfg.meta} has {len(itos)} characters and the checkpoint's vocab_size is {V}: "
                            f"pass the meta.pkl of the dataset it was trained on")
        return {"vocab": "".join(itos[i] for i in range(V))}
    where = icfg.tokenizer or (hf_dir if hf_dir and any(os.path.isfile(os.path.join(hf_dir, f)) for f in
                                                        ("tokenizer.json", "vocab.json")) else None)
    if where is None:
        raise UserError(f"no tokenizer for this checkpoint: {src.tokenizer_hint}")
    json_str = tokenizer.from_files(where)
    size = tokenizer.load(json_str).get_vocab_size()
    if size > V:
        raise UserError(f"the tokenizer at {where} has {size:,} tokens, more than the model's vocab_size {V:,}: "
                        f"pass the tokenizer the checkpoint was trained with")
    return {"tokenizer": json_str}


def model_overrides(arch: dict) -> list[str]:
    """The `model.*` overrides that build this architecture (what init_from= runs must pass too)."""
    keys = ("n_layers", "n_heads", "d_model", "block_size", "bias", "activation", "dropout")
    return ["model=transformer", "model.mlp_ratio=4"] + \
        [f"model.{k}={str(arch[k]).lower() if isinstance(arch[k], bool) else arch[k]}" for k in keys]


def train_config(arch: dict, step: int, out_dir: str):
    """The config `python train.py` composes for this model (training windows of block_size tokens)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from core import config

    overrides = model_overrides(arch) + [f"data.seq_len={arch['block_size']}", f"steps={max(step, 1)}"]
    if GlobalHydra.instance().is_initialized():  # inside a @hydra.main (import_checkpoint.py): its config dir
        cfg = compose(config_name="train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=config.CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    cfg.out_dir = out_dir
    config.check(cfg)
    return cfg


def run(icfg) -> dict:
    """Import `icfg.path` (ImportConfig) into the run directory `icfg.out_dir`; returns what import.json records."""
    if icfg.source not in SOURCES:
        raise UserError(f"source={icfg.source} must be one of {', '.join(SOURCES)}")
    if not icfg.path or not icfg.out_dir:
        raise UserError("pass path= (the checkpoint: a ckpt.pt, or an HF directory) and out_dir= (the run to write)")
    path = os.path.abspath(os.path.expanduser(icfg.path))
    if not os.path.exists(path):
        raise UserError(f"path={path} does not exist; pass the checkpoint to import")
    out_dir = os.path.abspath(os.path.expanduser(icfg.out_dir))
    if os.path.lexists(out_dir):
        raise UserError(f"out_dir={out_dir} exists; import into a new directory (an import never writes over a run)")
    parent = os.path.dirname(out_dir)  # the nearest existing ancestor must be writable: staging makes the rest
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"out_dir={out_dir} is not writable ({parent} is not a writable directory); pick another")
    src = read_nanogpt(path) if icfg.source == "nanogpt" else read_hf(path)
    meta_tok = tokenizer_meta(src, icfg, path if icfg.source == "hf" else None)
    cfg = train_config(src.arch, src.step, out_dir)
    report = {"source": icfg.source, "path": path, "step": src.step, "meta": icfg.meta, "tokenizer": icfg.tokenizer,
              "model_overrides": model_overrides(src.arch), "vocab_size": src.arch["vocab_size"]}
    write(out_dir, cfg, src, meta_tok, report)
    return report


def write(out_dir: str, cfg, src: Source, meta_tok: dict, report: dict) -> None:
    """The run directory (checkpoints/STEP, config.yaml, import.json), staged beside out_dir, renamed onto it."""
    import jax
    from omegaconf import OmegaConf

    from core import mesh as mesh_lib
    from core.export import write_run
    from core.state import state_spec

    dims = {"vocab_size": src.arch["vocab_size"]}
    spec = state_spec(cfg, dims, mesh_lib.make_mesh(OmegaConf.create({"data": -1, "fsdp": 1})))
    params = to_params(src, spec.abstract["params"], report["path"])
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), spec.abstract)
    state.update(step=np.int32(src.step), params=params, opt_state=spec.tx.init(params))
    if jax.tree.structure(state) != jax.tree.structure(spec.abstract):
        raise AssertionError("the imported state does not have the model's structure")
    state = jax.device_put(state, spec.shardings)
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "task": "lm", "dims": dims, **meta_tok}
    write_run(out_dir, cfg, state, meta, src.step, REPORT, report, key="out_dir")
