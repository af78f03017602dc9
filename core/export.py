"""A run's forward pass, and a language model's decode step, as files that need no code of ours to run.

Every exported function takes the weights as its first argument, a flat dict {"path/of/leaf": array}
(params.npz, or a SavedModel's variables), never as constants in the program: one program serves every
checkpoint of the same config, and it stays small. The batch is a symbolic dimension B, and so is the
length L of a sequence model's inputs (at most model.block_size where the model has positions).

Why the reference attention: with `model.attention=auto` the transformer picks model/attention_cpu.py's
layouts when it is traced on the CPU backend, and that choice is frozen into the program; the reference
layout is the same math, a fair layout on every platform, and gives the decode cache one layout
(B, M, H, K) whichever machine exported it. The program is then lowered for every platform asked for
(cpu, cuda, tpu by default): jax.export keeps one lowering each and the caller's device picks. For the
same reason `model.matmul_dtype=auto` exports as float32 (exact, whichever machine exported it);
`bfloat16` named outright stays bfloat16.

Shape key: B batch, L length, V vocab; docs/export.md describes the artifacts and signature.json.
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import jax
import numpy as np
from flax import nnx

import model as models
from model import matmul
from core.state import Run, run_dims
from errors import UserError

FORMATS = ("stablehlo", "savedmodel")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
FILES = {"forward": "model.jaxexport", "decode": "decode.jaxexport"}
TF_SIGNATURES = {"forward": "serving_default", "decode": "decode"}


@dataclass
class Program:
    """One function to export: fn(weights, *inputs) -> outputs, its inputs described in signature.json's terms."""
    name: str  # forward | decode
    fn: Callable
    inputs: list  # [(name, shape, dtype)]: "B" and "L" in a shape are symbolic; a list of those (the cache)
    outputs: list  # names of the outputs, in order
    constraints: tuple = ()  # e.g. ("L <= 256",)
    notes: dict = field(default_factory=dict)


def portable_model(run: Run):
    """An abstract model of the run's config, attention in the reference layout and auto matmuls float32 (above)."""
    abstract = nnx.eval_shape(lambda: models.build(run.cfg.model, run_dims(run.meta), rngs=nnx.Rngs(0)))
    for _, module in nnx.iter_modules(abstract):
        if hasattr(module, "attention"):
            module.attention = "reference"
        if getattr(module, "dot_general", None) is matmul.auto_dot_general:
            module.dot_general = matmul.flat_dot_general
    return abstract


def flat_weights(state: dict) -> tuple[dict, Callable]:
    """({"path/of/leaf": array} of the params and `rest` (batch statistics), a function rebuilding (params, rest))."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path({"params": state["params"], "rest": state["rest"]})
    keys = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path[1:]) for path, _ in leaves]
    assert len(set(keys)) == len(keys), "params and rest share a path"
    flat = {k: np.asarray(jax.device_get(leaf)) for k, (_, leaf) in zip(keys, leaves)}

    def unflatten(weights: dict):
        tree = jax.tree.unflatten(treedef, [weights[k] for k in keys])
        return tree["params"], tree["rest"]

    return flat, unflatten


def _input(run: Run, abstract) -> tuple:
    """(name, shape, dtype) of the model's input, from what the data gave it."""
    dims = run_dims(run.meta)
    if "vocab_size" in dims:
        return "tokens", ("B", "L"), "int32"
    if "image_shape" in dims:
        return "images", ("B", *dims["image_shape"]), "float32"
    if hasattr(abstract, "init_cache"):  # a recurrent model reads sequences of feature vectors
        return "series", ("B", "L", dims["in_features"]), "float32"
    return "features", ("B", dims["in_features"]), "float32"


def _shape(aval) -> list:
    """A shape with its symbolic dimensions as their names."""
    return [d if isinstance(d, int) else str(d) for d in aval.shape]


def programs(run: Run) -> tuple[list[Program], dict]:
    """(what to export for this run, its weights as a flat dict): the forward pass; for LMs a decode step too."""
    abstract = portable_model(run)
    graphdef = nnx.graphdef(abstract)
    weights, unflatten = flat_weights(run.state)
    block_size = run.cfg.model.get("block_size")
    limit = (f"L <= {block_size}",) if block_size else ()
    name, shape, dtype = _input(run, abstract)

    def forward(weights, x):
        return nnx.merge(graphdef, *unflatten(weights))(x)

    out = "values" if run.task == "regress" else "logits"
    progs = [Program("forward", forward, [(name, shape, dtype)], [out], limit if "L" in shape else ())]
    if run.task == "lm" and hasattr(abstract, "init_cache"):
        B = jax.export.symbolic_shape("B")[0]
        cache_avals, cache_def = jax.tree.flatten(jax.eval_shape(lambda: abstract.init_cache(B)))
        cache = [("cache", _shape(a), str(a.dtype)) for a in cache_avals]

        def decode(weights, cache_list, tokens_BL, pos):
            model = nnx.merge(graphdef, *unflatten(weights))
            logits_BLV, cache = model(tokens_BL, cache=jax.tree.unflatten(cache_def, cache_list), pos=pos)
            return logits_BLV, jax.tree.leaves(cache)

        notes = {"cache": "start from zeros of the cache's shapes and dtypes; pass the returned cache back in",
                 "pos": "the position of tokens[:, 0]: how many tokens the cache holds already"}
        if block_size:
            notes |= {"max_positions": block_size, "pos": notes["pos"] + f"; pos + L <= {block_size}"}
        else:
            notes["pos"] = "unused: a recurrent model's cache is its carry"
        progs.append(Program("decode", decode, [cache, ("tokens", ("B", "L"), "int32"), ("pos", (), "int32")],
                             ["logits", "cache"], limit, notes))
    return progs, weights


def _fix_batch(entry, batch: int | None):
    """An input (or a list of them) with B replaced by the fixed `batch`, if one is given."""
    if isinstance(entry, list):
        return [_fix_batch(e, batch) for e in entry]
    name, shape, dtype = entry
    return name, tuple(batch if d == "B" and batch else d for d in shape), dtype


def specs(program: Program, batch: int | None) -> list:
    """ShapeDtypeStructs of the program's inputs, symbolic dimensions in one scope (a fixed `batch` replaces B)."""
    scope = jax.export.SymbolicScope(program.constraints)

    def spec(entry):
        if isinstance(entry, list):
            return [spec(e) for e in entry]
        _, shape, dtype = _fix_batch(entry, batch)
        dims = jax.export.symbolic_shape(", ".join(map(str, shape)), scope=scope) if shape else ()
        return jax.ShapeDtypeStruct(dims, np.dtype(dtype))

    return [spec(e) for e in program.inputs]


def _describe(entry) -> dict:
    """{"name", "shape", "dtype"} of an input; a list input (the cache) as {"name", "list": [{"shape", "dtype"}]}."""
    if isinstance(entry, list):
        return {"name": entry[0][0], "list": [{"shape": list(s), "dtype": d} for _, s, d in entry]}
    name, shape, dtype = entry
    return {"name": name, "shape": list(shape), "dtype": dtype}


def describe(program: Program, batch: int | None, weight_specs: dict) -> dict:
    """signature.json's entry for one program: inputs and outputs with their shapes and dtypes."""
    inputs = [_fix_batch(e, batch) for e in program.inputs]
    outs = jax.eval_shape(program.fn, weight_specs, *specs(program, batch))
    outs = outs if isinstance(outs, tuple) else (outs,)
    outputs = []
    for name, o in zip(program.outputs, outs):
        outputs.append({"name": name, "list": [{"shape": _shape(a), "dtype": str(a.dtype)} for a in o]}
                       if isinstance(o, list) else {"name": name, "shape": _shape(o), "dtype": str(o.dtype)})
    return {"inputs": [_describe(e) for e in inputs], "outputs": outputs, "constraints": list(program.constraints),
            **program.notes}


def preprocessing(run: Run) -> dict:
    """What an outside user needs to turn raw data into the model's inputs and its outputs back: from run.meta."""
    meta, out = run.meta, {}
    if meta.get("vocab"):
        out["vocab"] = meta["vocab"]
        out["tokens"] = "token id i is character i of `vocab`"
    if "image_shape" in meta:
        out |= {k: meta[k] for k in ("image_shape", "mean", "std")}
        out["images"] = "float32 N x H x W x C, each channel c as (pixel - mean[c]) / std[c]"
    if "features" in meta:
        out["features"] = meta["features"]
        out["encoding"] = ("one input per numeric column, (v - mean) / std (with `quantiles`: the normal score "
                           "of v through them, data/tabular.py); one-hot inputs per string column over "
                           "`categories` (an unseen one: all zeros); a missing value is 0; inputs in `features` order")
        out |= {k: meta[k] for k in ("target", "target_kind", "target_mean", "target_std") if k in meta}
        if "target_mean" in meta:
            out["values"] = "value in target units = output * target_std + target_mean"
    if "tokenizer" in meta:
        out["tokenizer"] = "tokenizer.json"
        out["tokens"] = ("Hugging Face `tokenizers` JSON: ids of [CLS] text [SEP], cut to L, padded with [PAD]=0 "
                         "(padded positions change no output)" if run.task != "lm" else
                         "Hugging Face `tokenizers` JSON: ids of the text (`Tokenizer.encode(text).ids`)")
    if run.cfg.model.get("type_vocab"):
        out["segments"] = "every token in segment 0 (sentence A): the export takes no segment ids"
    if run.task == "classify":
        out["labels"] = meta.get("labels") or list(range(meta["num_classes"]))
    if run.cfg.data.kind == "series":
        out["series"] = "raw values, float32 B x L x 1; output t predicts value t + 1"
    return out


def _named(entries: list) -> list:
    """A TF signature's tensors: a list NAME is flat there, as NAME_0, NAME_1, ..."""
    return [c for e in entries
            for c in ([{"name": f"{e['name']}_{i}", **c} for i, c in enumerate(e["list"])] if "list" in e else [e])]


def signature(run: Run, out_dir: str, progs: list, weights: dict, fmt: str, batch: int | None, platforms) -> dict:
    """The contents of signature.json: what was exported from where, each program's inputs and outputs."""
    weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
    entries = {}
    for p in progs:
        entry = describe(p, batch, weight_specs)
        if fmt == "stablehlo":
            entries[p.name] = {"file": FILES[p.name], **entry}
        else:
            entries[p.name] = {"signature": TF_SIGNATURES[p.name], **entry, "inputs": _named(entry["inputs"]),
                               "outputs": _named(entry["outputs"])}
    return {
        "format": fmt, "jax_version": jax.__version__, "platforms": list(platforms),
        "run": {"out_dir": os.path.abspath(out_dir), "step": run.step, "family": run.cfg.model.family,
                "task": run.task, "data": run.cfg.data.kind},
        "weights": {"file": "params.npz" if fmt == "stablehlo" else "variables/",
                    "count": int(sum(v.size for v in weights.values())),
                    "leaves": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in weights.items()}},
        **entries,
        "preprocessing": preprocessing(run),
    }


def write_stablehlo(progs: list, weights: dict, path: str, batch: int | None, platforms) -> None:
    """model.jaxexport (and decode.jaxexport) as Exported.serialize() bytes, and params.npz."""
    weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
    for p in progs:
        exported = jax.export.export(jax.jit(p.fn), platforms=tuple(platforms))(weight_specs, *specs(p, batch))
        with open(os.path.join(path, FILES[p.name]), "wb") as f:
            f.write(exported.serialize())
    np.savez(os.path.join(path, "params.npz"), **weights)


def write_savedmodel(progs: list, weights: dict, path: str, batch: int | None, platforms) -> None:
    """A TF SavedModel: the weights as variables, one signature per program, each calling the StableHLO.

    jax2tf wraps the same lowering as write_stablehlo in TF's XlaCallModule op, so TF runs XLA's
    program for it; the signatures' inputs are flat tensors (cache_0, cache_1, ... for the cache).
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    keys = list(weights)
    module = tf.Module()
    module.weights_list = [tf.Variable(weights[k], trainable=False, name=k.replace("/", ".")) for k in keys]
    signatures = {}
    for p in progs:
        inputs = [_fix_batch(e, batch) for e in p.inputs]
        flat = [t for e in inputs for t in ([(f"{n}_{i}", s, d) for i, (n, s, d) in enumerate(e)]
                                            if isinstance(e, list) else [e])]
        poly = [[_poly(s) for _, s, _ in e] if isinstance(e, list) else _poly(e[1]) for e in inputs]
        converted = jax2tf.convert(p.fn, polymorphic_shapes=[None, *poly], polymorphic_constraints=p.constraints,
                                   with_gradient=False, native_serialization_platforms=tuple(platforms))
        tensor_specs = [tf.TensorSpec([d if isinstance(d, int) else None for d in s], tf.as_dtype(d), name=n)
                        for n, s, d in flat]

        def serve(*args, converted=converted, inputs=inputs, outputs=p.outputs):
            it = iter(args)
            outs = converted(dict(zip(keys, module.weights_list)),
                             *([next(it) for _ in e] if isinstance(e, list) else next(it) for e in inputs))
            named = {}
            for name, o in zip(outputs, outs if len(outputs) > 1 else (outs,)):
                named |= {f"{name}_{i}": t for i, t in enumerate(o)} if isinstance(o, list) else {name: o}
            return named

        signatures[TF_SIGNATURES[p.name]] = tf.function(serve, input_signature=tensor_specs,
                                                        autograph=False).get_concrete_function()
    tf.saved_model.save(module, path, signatures=signatures)


def _poly(shape) -> str | None:
    """jax2tf's polymorphic shape string of a shape with symbolic names (None: nothing symbolic)."""
    return "(" + ", ".join(map(str, shape)) + ")" if any(isinstance(d, str) for d in shape) else None


def write_extras(run: Run, sig: dict, path: str) -> None:
    """signature.json, and the tokenizer of a WordPiece run."""
    if "tokenizer" in run.meta:
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            f.write(run.meta["tokenizer"])
    with open(os.path.join(path, "signature.json"), "w") as f:
        f.write(_dumps(sig) + "\n")


def _dumps(x, indent: int = 0) -> str:
    """JSON with whatever fits in 100 columns on one line: a shape reads [B, L, 65], not five lines."""
    flat = json.dumps(x)
    if len(flat) + indent <= 100 or not isinstance(x, (dict, list)) or not x:
        return flat
    pad, end = " " * (indent + 1), "\n" + " " * indent
    if isinstance(x, dict):
        return "{\n" + ",\n".join(f"{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in x.items()) + end + "}"
    return "[\n" + ",\n".join(pad + _dumps(v, indent + 1) for v in x) + end + "]"


def save(run: Run, out_dir: str, dest: str, fmt: str, batch: int | None = None,
         platforms=("cpu", "cuda", "tpu")) -> list[Program]:
    """Write `run`'s export to `dest` (checked by check_dest): all of it, or nothing at all."""
    progs, weights = programs(run)
    tmp = staging(dest)
    try:
        (write_stablehlo if fmt == "stablehlo" else write_savedmodel)(progs, weights, tmp, batch, platforms)
        write_extras(run, signature(run, out_dir, progs, weights, fmt, batch, platforms), tmp)
        publish(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, or a directory that went away while writing
            raise UserError(f"could not write dest={dest} ({e.strerror or e}); nothing was written there") from None
        raise
    return progs


def check_dest(dest: str, overwrite: bool, marker: str = "signature.json", what: str = "export") -> str:
    """The absolute destination; UserError if it exists (and may not or must not be replaced).

    overwrite=true replaces only a directory holding `marker`, the file every `what` (an export) has.
    """
    dest = os.path.abspath(os.path.expanduser(dest))
    if os.path.lexists(dest):
        if not overwrite:
            raise UserError(f"dest={dest} exists; pass overwrite=true to replace it, or another dest=")
        if not os.path.isfile(os.path.join(dest, marker)):
            raise UserError(f"dest={dest} exists and holds no {what} (no {marker}); not replacing it, "
                            f"even with overwrite=true: remove it yourself or pick another dest=")
    probe = os.path.dirname(dest)  # the nearest existing ancestor: staging() makes the rest
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"dest={dest} is not writable ({probe} is not a writable directory); pick another dest=")
    return dest


def staging(dest: str) -> str:
    """An empty directory beside `dest`, to be renamed onto it once complete."""
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.", dir=os.path.dirname(dest))
    except OSError as e:
        raise UserError(f"dest={dest} is not writable ({e.strerror or e}); pick another dest=") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    return tmp


def publish(tmp: str, dest: str) -> None:
    """Move the finished export onto `dest`, replacing an earlier export there (checked by check_dest)."""
    if os.path.lexists(dest):
        old = tmp + ".old"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dest)


def write_run(dest: str, cfg, state, meta: dict, step: int, report_name: str, report: dict, key: str = "dest") -> None:
    """A new run directory (checkpoints/STEP, config.yaml and a JSON report) that `load_run` reads, staged
    beside `dest` and renamed onto it only when complete (compress.py and import_checkpoint.py write one)."""
    from omegaconf import OmegaConf

    from core import checkpoint

    tmp = staging(dest)
    try:
        mngr = checkpoint.manager(tmp, keep=1)
        try:
            checkpoint.save(mngr, step, state, meta)
        finally:
            checkpoint.close(mngr)
        OmegaConf.save(cfg, os.path.join(tmp, "config.yaml"), resolve=True)
        with open(os.path.join(tmp, report_name), "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        publish(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write {key}={dest} ({e.strerror or e}); nothing was written there") from None
        raise
