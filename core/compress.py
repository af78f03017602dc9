"""Post-training int8 quantization: a trained run in, a new self-describing run directory out.

The new run is the source's config with `model.quant` set (and `model.quant_embeddings`), and a checkpoint
of the same step whose dense weights are int8 with per-output-channel scales (model/quant.py), written by
the loop's own checkpoint code: `load_run`, sample.py, serve.py and export.py read it as any run. It has no
optimizer moments (core/state.py) and is never trained. Beside it, compression.json: the task's validation
metrics before and after (the run's own validation batches, as the loop evaluates them), weight bytes
before and after, and speed before and after on this machine (batch-1 sampling for language models, the
forward pass over a validation batch for the others), measured in turns so that drift hits both alike.
"""
import os
import time

import jax
import numpy as np
from omegaconf import OmegaConf

from core import checkpoint, config, runtime, task as tasks
from core.export import check_dest, write_run
from core.sampler import compile_generate, cpu_threads_for
from core.state import Setup, load_run, model_bytes, run_dims, saved_config, setup
from errors import UserError
from model import quant

REPORT = "compression.json"
SAMPLE_TOKENS = 500  # new tokens per timed sampling call, after a 1-token prompt (benchmarks/run.py's rows)
MIN_CALLS, MIN_SECONDS = 3, 2.0  # each speed is the best call of at least this many, over at least this long


def families() -> list[str]:
    """The model families with an int8 form: those whose schema has `quant`."""
    return [n for n in config.usable("model") if "quant" in config.schema_keys("model", n)]


def quantized_config(cfg, method: str, embeddings: bool, source: str, dest: str):
    """The compressed run's config: the source's, with model.quant (and model.quant_embeddings) set."""
    family = cfg.model.family
    if cfg.model.get("quant", "none") != "none":
        raise UserError(f"{source} is already quantized (model.quant={cfg.model.quant}); compress its "
                        f"float source instead")
    if family not in families():
        raise UserError(f"model={family} has no int8 form; compress.py quantizes {', '.join(families())} runs")
    fields = config.schema_keys("model", family)
    if embeddings and "quant_embeddings" not in fields:
        raise UserError(f"model={family} has no token embeddings to quantize; drop embeddings=true")
    out = OmegaConf.to_container(cfg, resolve=True)
    out["model"]["quant"] = method
    if "quant_embeddings" in fields:
        out["model"]["quant_embeddings"] = embeddings
    out["out_dir"] = dest
    return OmegaConf.create(out)


def evaluate(built: Setup, task, state, meta: dict) -> dict:
    """The validation metrics the loop logs, for a state in the canonical layout."""
    return tasks.validate(task, built.runner, built.runner.put(state), meta)


def best_times(calls: list) -> list[float]:
    """Each call's fastest run (seconds), the calls taken in turns after one warm-up (compile) each."""
    for call in calls:
        jax.block_until_ready(call())
    best, n, start = [float("inf")] * len(calls), 0, time.perf_counter()
    while n < MIN_CALLS or time.perf_counter() - start < MIN_SECONDS:
        for i, call in enumerate(calls):
            t = time.perf_counter()
            jax.block_until_ready(call())
            best[i] = min(best[i], time.perf_counter() - t)
        n += 1
    return best


def speeds(builds: list[Setup], states: list, task) -> tuple[str, list[float], str]:
    """(unit, each model's units per second, what was timed): batch-1 sampling for LMs, else a forward pass."""
    if task.name == "lm":
        prompt_BP, key = np.zeros((1, 1), np.int32), jax.random.key(0)
        calls = []
        for built, state in zip(builds, states):
            generate = compile_generate(built.spec.graphdef, max_new_tokens=SAMPLE_TOKENS, temperature=0.8,
                                        top_k=0, top_p=1.0)
            calls.append(lambda g=generate, s=state: g(s["params"], s["rest"], prompt_BP, key))
        times = best_times(calls)
        return "tokens", [SAMPLE_TOKENS / t for t in times], \
            f"batch-1 sampling (core/sampler.py), {SAMPLE_TOKENS} new tokens after a 1-token prompt, temperature 0.8"
    rows, _ = task.feed.eval_batch(0)
    n = len(jax.tree.leaves(rows)[0]) * task.feed.units_per_example
    calls = []
    for built, state in zip(builds, states):
        placed, batch = built.runner.put(state), built.runner.batch(rows)
        calls.append(lambda b=built, p=placed, x=batch: b.runner.evaluate(p, x))
    times = best_times(calls)
    return task.unit, [n / t for t in times], f"the forward pass and loss over one validation batch ({n} {task.unit})"


def weight_bytes(state) -> int:
    """Bytes of the weights a model runs with: params and `rest` (batch statistics)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state["params"], state["rest"])))


def cpu_threads(out_dir: str, step: int | None) -> int:
    """XLA-CPU threads as sample.py picks them for the float run (decided before JAX starts its backend)."""
    meta = checkpoint.peek_meta(os.path.expanduser(out_dir), step)
    try:
        return cpu_threads_for(model_bytes(saved_config(meta["config"]), run_dims(meta)))
    except Exception:  # noqa: BLE001 - a hint only: load_run reports an unreadable run with its own error
        return 0


def refuse_training(out_dir: str) -> None:
    """A UserError if out_dir holds a compressed run (its meta says so): those are for inference only."""
    made = (checkpoint.peek_meta(out_dir) or {}).get("compression")
    if made:
        raise UserError(f"out_dir={out_dir} holds a run compress.py quantized ({made['method']}) from "
                        f"{made['source']}; it samples, serves and exports but does not train: train the source, "
                        f"or pick another out_dir=")


def data_config(run_cfg, data_path: str | None):
    """The run's config to evaluate with: its data (data.path, or data.dir for prepared tokens) replaced by
    data_path; a one-line error if what it reads is gone."""
    key = "dir" if run_cfg.data.get("kind") == "tokens" else "path"
    if data_path:
        data_path = os.path.abspath(os.path.expanduser(data_path))
        if not os.path.exists(data_path):
            raise UserError(f"data_path={data_path} does not exist; pass the data the run trained on "
                            f"(data.{key}={run_cfg.data.get(key)})")
        run_cfg = OmegaConf.merge(run_cfg, {"data": {key: data_path}})
    for k in (key, "val_path"):
        path = run_cfg.data.get(k)
        if path and not os.path.exists(os.path.expanduser(path)):
            fix = "pass data_path=FILE (the same data)" if k == key else "put it back there"
            raise UserError(f"the run trained on data.{k}={path}, which is gone; {fix} to evaluate the "
                            f"compressed run")
    return run_cfg


def run(cfg) -> dict:
    """Quantize `cfg.out_dir` into `cfg.dest` (CompressConfig); returns the report written to compression.json."""
    dest = check_dest(cfg.dest, cfg.overwrite, marker=REPORT, what="compressed run")
    source = os.path.abspath(os.path.expanduser(cfg.out_dir))
    src = load_run(source, cfg.step)
    qcfg = quantized_config(src.cfg, cfg.method, cfg.embeddings, source, dest)
    task = tasks.load(data_config(src.cfg, cfg.data_path), src.meta)  # the run's data, its tokens and labels
    # an imported run's meta has only its tokenizer: what it lacks cannot differ
    changed = sorted(k for k, v in task.meta.items() if k in src.meta and src.meta[k] != v)
    if changed:
        raise UserError(f"the data the run's config names differs from what it trained on ({', '.join(changed)}); "
                        f"pass data_path= the file it trained on to evaluate the compressed run")
    built, qbuilt = setup(src.cfg, task.dims, task.loss_fn), setup(qcfg, task.dims, task.loss_fn)
    params, done = quant.quantize_params(src.state["params"], qbuilt.spec.abstract["params"])
    qstate = {**src.state, "params": params, "opt_state": qbuilt.spec.tx.init(params)}
    if jax.tree.structure(qstate) != jax.tree.structure(qbuilt.spec.abstract):
        raise AssertionError("the quantized state does not have the compressed model's structure")
    before, after = evaluate(built, task, src.state, src.meta), evaluate(qbuilt, task, qstate, src.meta)
    unit, (speed_before, speed_after), measure = speeds([built, qbuilt], [src.state, qstate], task)
    report = {
        "method": cfg.method, "embeddings": bool(cfg.embeddings), "source": source, "step": src.step,
        **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
        "bytes_before": weight_bytes(src.state), "bytes_after": weight_bytes(qstate),
        f"{unit}_per_s_before": speed_before, f"{unit}_per_s_after": speed_after,
        "speedup": speed_after / speed_before, "speed_measure": measure,
        "cpu_threads": runtime.cpu_thread_count() if jax.default_backend() == "cpu" else None,
        "device": jax.devices()[0].device_kind, "jax_version": jax.__version__, "quantized": done,
    }
    report["bytes_ratio"] = report["bytes_after"] / report["bytes_before"]
    meta = {**src.meta, "config": OmegaConf.to_container(qcfg, resolve=True),
            "compression": {k: report[k] for k in ("method", "embeddings", "source", "step")}}
    write(dest, qcfg, qstate, meta, report, src.step)
    return report


def write(dest: str, qcfg, state, meta: dict, report: dict, step: int) -> None:
    """The run directory (checkpoints/STEP, config.yaml, compression.json), staged beside dest, renamed onto it."""
    write_run(dest, qcfg, state, meta, step, REPORT, report)
