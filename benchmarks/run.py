"""Speed of the pieces a researcher waits on: `python benchmarks/run.py [--quick] [--out FILE]`.

Prints a table and writes JSON (machine, versions, command, every figure). Measures:
- the fp32 matmul rate of this machine (best of several large jnp.dot), the denominator of MFU, and
  the bf16 one (float32 accumulation), the rate `model.matmul_dtype=bfloat16` matmuls can reach;
- train throughput and MFU of the CPU Shakespeare config and the GPU one (fewer steps), as configured
  (bf16 matmuls) and with float32 matmuls, with
  model FLOPs per token from the PaLM appendix, 6N + 12*L*T*D (N non-embedding params), and
  the causal-halved 6N + 6*L*T*D beside it, with
  one step per dispatch and ten (`steps_per_call=10`), and each step's dense matmuls alone (the
  ceiling XLA-CPU's kernels allow at those shapes);
- the CNN (images/s) and RNN (tokens/s) experiment configs;
- compile time and step time against depth (L = 2..32), with and without scan-over-layers;
- the sampler: new tokens/s at batch 1 and 16, KV-cached scan vs uncached recompute, prefill, and
  batch 1 within one context window (no slide: the decode rate without the re-prefills), in a process
  of its own on the XLA-CPU threads sample.py picks (one, for this model), and batch 1 once more in
  this process, on every core;
- checkpoint overhead: the share of wall time the loop is blocked by saving, async vs sync.
Speed is reported here, never asserted in tests.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core import runtime  # noqa: E402

if __name__ == "__main__":
    runtime.configure()  # measure what train.py runs, compiled as it compiles: core/runtime.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from core import checkpoint, config, mesh as mesh_lib  # noqa: E402
from core.sampler import compile_generate, cpu_threads_for  # noqa: E402
from core.state import model_bytes, setup, state_spec  # noqa: E402
from model.matmul import DOT_GENERAL, resolve  # noqa: E402
from tasks import classify, lm  # noqa: E402

config.register()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 65


def cfg_of(experiment, *overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"+experiment={experiment}", "mesh.data=1", *overrides])


def matmul_rate(n=2048, repeats=10, dtype=jnp.float32) -> float:
    """FLOP/s of the best of `repeats` (n x n) @ (n x n) dots; bfloat16 operands accumulate in float32."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    dot(a, a).block_until_ready()
    best = min(_timed(lambda: dot(a, a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def non_embedding_params(cfg) -> int:
    m = cfg.model
    return m.n_layers * (4 * m.d_model ** 2 + 2 * m.mlp_ratio * m.d_model ** 2)  # attention + MLP matrices


def flops_per_token(cfg) -> tuple[float, float]:
    m = cfg.model
    D, L, T = m.d_model, m.n_layers, cfg.data.seq_len
    n = non_embedding_params(cfg)
    return 6 * n + 12 * L * T * D, 6 * n + 6 * L * T * D


def _rows(cfg, rng) -> dict:
    """One batch of random process-local rows for the config's task."""
    B = cfg.batch_size
    if cfg.data.kind == "images":
        shape = IMAGE_SHAPES[cfg.data.tfds_name]
        return {"x": rng.normal(size=(B, *shape)).astype(np.float32), "y": rng.integers(0, 10, B).astype(np.int32)}
    t = rng.integers(0, VOCAB, size=(B, cfg.data.seq_len + 1)).astype(np.int32)
    return {"x": t[:, :-1], "y": t[:, 1:]}


IMAGE_SHAPES = {"cifar10": (32, 32, 3), "mnist": (28, 28, 1)}


def _setup(cfg, k: int = 1):
    """State, runner and 4 batches (each K stacked steps when k > 1) for the config."""
    images = cfg.data.kind == "images"
    dims = ({"num_classes": 10, "image_shape": list(IMAGE_SHAPES[cfg.data.tfds_name])} if images
            else {"vocab_size": VOCAB})
    built = setup(cfg, dims, classify.loss if images else lm.loss)
    spec, runner, state = built.spec, built.runner, built.fresh_state()
    rng = np.random.default_rng(0)
    if k == 1:
        batches = [runner.batch(_rows(cfg, rng)) for _ in range(4)]
    else:
        batches = [runner.stack([_rows(cfg, rng) for _ in range(k)]) for _ in range(4)]
    return spec, runner, state, batches


def train_throughput(cfg, steps: int, peak: float | None, k: int = 1, repeats: int = 3,
                     peak_bf16: float | None = None) -> dict:
    """Step time with k steps per dispatch (steps_per_call), the best of `repeats` timed runs; MFU for LMs."""
    spec, runner, state, batches = _setup(cfg, k)
    train = runner.train if k == 1 else runner.train_many
    t0 = time.perf_counter()
    state, m = train(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for i in range(2):
        state, m = train(state, batches[i % 4])
    jax.block_until_ready(m)
    calls, step_s = max(1, steps // k), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            state, m = train(state, batches[i % 4])
        jax.block_until_ready((state, m))
        step_s = min(step_s, (time.perf_counter() - t0) / (calls * k))
    out = {"step_ms": 1e3 * step_s, "compile_s": compile_s, "steps_per_call": k}
    if cfg.data.kind == "images":
        return out | {"images_per_s": cfg.batch_size / step_s}
    tokens = cfg.batch_size * cfg.data.seq_len
    out["tokens_per_s"] = tokens / step_s
    if cfg.model.family == "transformer":
        fpt, fpt_causal = flops_per_token(cfg)
        dtype = resolve(cfg.model.matmul_dtype)  # auto as this machine runs it
        out |= {"mfu": fpt * tokens / step_s / peak, "mfu_causal": fpt_causal * tokens / step_s / peak,
                "matmul_dtype": dtype}
        if dtype == "bfloat16" and peak_bf16:  # against the rate its matmuls could reach
            out["mfu_vs_bf16_matmul"] = fpt * tokens / step_s / peak_bf16
    return out


def matmul_floor(cfg, peak: float, k: int = 10, repeats: int = 3) -> dict:
    """The step's dense matmuls alone, in the forms, shapes and precision (`model.matmul_dtype`) XLA runs them.

    The gradient of a chain of each layer's four dense layers (qkv, attention output, fc, fc
    projection) with residual adds and nothing else: per layer the forward x@W and the backward
    input and weight gradients (12 matmuls), through the model's own `DOT_GENERAL`; k steps per call.
    No attention, norms, GELU, loss or optimizer: MFU at this time is the ceiling the matmul kernels
    allow for these shapes.
    """
    m = cfg.model
    T, D, F = cfg.batch_size * cfg.data.seq_len, m.d_model, m.mlp_ratio * m.d_model
    dtype = resolve(m.matmul_dtype)  # auto as this machine runs it
    dot = DOT_GENERAL[dtype]
    keys = iter(jax.random.split(jax.random.key(0), 5))
    w = {name: jax.random.normal(next(keys), (m.n_layers, a, b)) / np.sqrt(a)
         for name, (a, b) in {"qkv": (D, 3 * D), "proj": (D, D), "fc": (D, F), "fc_proj": (F, D)}.items()}
    x_KTD = jax.random.normal(next(keys), (k, T, D))

    def dense(x, w):
        return dot(x, w, (((1,), (0,)), ((), ())))

    def chain(w, x_TD, r_TD):
        for i in range(m.n_layers):
            qkv_TD3 = dense(x_TD, w["qkv"][i])  # all three parts used, so XLA cannot slice the weight
            x_TD = x_TD + dense(qkv_TD3[:, :D] + qkv_TD3[:, D:2 * D] + qkv_TD3[:, 2 * D:], w["proj"][i])
            x_TD = x_TD + dense(dense(x_TD, w["fc"][i]), w["fc_proj"][i])
        return jnp.sum(x_TD * r_TD)  # a random cotangent: a constant one lets XLA turn matmuls into sums

    @jax.jit
    def many(w, x_KTD):
        def step(acc, x_TD):
            g = jax.grad(chain)(w, x_TD, x_TD[::-1])
            return acc + sum(jnp.sum(a[:1, :1, :1]) for a in jax.tree.leaves(g)), None
        return jax.lax.scan(step, 0.0, x_KTD)[0]

    jax.block_until_ready(many(w, x_KTD))
    step_s = min(_timed(lambda: jax.block_until_ready(many(w, x_KTD))) for _ in range(repeats)) / k
    fpt, _ = flops_per_token(cfg)
    return {"step_ms": 1e3 * step_s, "mfu": fpt * T / step_s / peak, "matmul_dtype": dtype,
            "matmul_gflops": 6 * non_embedding_params(cfg) * T / step_s / 1e9}


def compile_vs_depth(depths, steps: int) -> dict:
    """Compile time and step time of the CPU config's train step at several depths, scan-over-layers or not."""
    out = {}
    for scan in (False, True):
        for n in depths:
            cfg = cfg_of("shakespeare_char_cpu", f"model.n_layers={n}", f"model.scan_layers={scan}")
            spec, runner, state, batches = _setup(cfg)
            t0 = time.perf_counter()
            compiled = runner.train.lower(state, batches[0]).compile()
            compile_s = time.perf_counter() - t0
            state, m = compiled(state, batches[0])
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for i in range(steps):
                state, m = compiled(state, batches[i % 4])
            jax.block_until_ready(m)
            out[f"L{n}_{'scan' if scan else 'unrolled'}"] = {
                "n_layers": n, "scan_layers": scan, "compile_s": compile_s,
                "step_ms": 1e3 * (time.perf_counter() - t0) / steps}
    return out


def lm_state(cfg):
    """(spec, state) of a freshly initialised LM for the config: what the sampler benchmarks decode with."""
    spec = state_spec(cfg, {"vocab_size": VOCAB}, mesh_lib.make_mesh(cfg.mesh))
    return spec, jax.jit(spec.make_state)()


def generate_call(spec, state, batch: int, new_tokens: int, cached: bool = True):
    """A compiled, warmed-up sampler call: `new_tokens` after a 1-token prompt at temperature 1, no filters.

    Returns call(key) -> tokens_BN, run to completion. Sampler globals (core/sampler.py) are read here.
    """
    gen = compile_generate(spec.graphdef, cached=cached, max_new_tokens=new_tokens, temperature=1.0, top_k=0, top_p=1.0)
    prompt = jnp.zeros((batch, 1), jnp.int32)

    def call(key=jax.random.key(1)):
        return jax.block_until_ready(gen(state["params"], state["rest"], prompt, key))

    call(jax.random.key(0))
    return call


def sampler_speed(cfg, batch: int, new_tokens: int, cached: bool) -> dict:
    spec, state = lm_state(cfg)
    call = generate_call(spec, state, batch, new_tokens, cached)
    # Best call over at least 3 calls and 2 s of calls: this host's speed drifts by 10-30% within seconds
    # (benchmarks/README.md), and a short window can miss its quiet moments entirely.
    times = []
    while len(times) < 3 or sum(times) < 2.0:
        times.append(_timed(call))
    best = min(times)
    out = {"new_tokens_per_s": batch * new_tokens / best, "seconds": best, "calls": len(times)}
    if cached:  # prefill of a full block, alone
        model = nnx.merge(spec.graphdef, state["params"], state["rest"])
        full = jnp.zeros((batch, cfg.model.block_size), jnp.int32)
        prefill = jax.jit(lambda p: model(p, cache=model.init_cache(batch), pos=0)[0])
        prefill(full).block_until_ready()
        out["prefill_ms"] = 1e3 * min(_timed(lambda: prefill(full).block_until_ready()) for _ in range(5))
    return out


def sampler_rows(quick: bool) -> dict:
    """The CPU config's sampler rows, measured as sample.py runs them: in a process of their own whose XLA-CPU
    thread pool sample.py would pick for this model (core/runtime.py: cpu_threads)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--sampler-only", *(["--quick"] if quick else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the sampler benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sampler_only(quick: bool) -> dict:
    """sampler_rows' child: decide the threads before JAX starts, as sample.py does, then measure."""
    cpu, f32 = cfg_of("shakespeare_char_cpu"), "model.matmul_dtype=float32"
    runtime.cpu_threads(cpu_threads_for(model_bytes(cpu, {"vocab_size": VOCAB})))
    n = 100 if quick else 500
    rows = {f"{'cached' if c else 'uncached'}_batch{b}": sampler_speed(cpu, b, n, c)
            for b in (1, 16) for c in (True, False)}
    rows["cached_batch1_fp32"] = sampler_speed(cfg_of("shakespeare_char_cpu", f32), 1, n, True)
    # one window: block_size - 1 new tokens after a 1-token prompt fill the cache, no slide
    rows["cached_batch1_one_window"] = sampler_speed(cpu, 1, cpu.model.block_size - 1, True)
    for r in rows.values():
        r["cpu_threads"] = runtime.cpu_thread_count()
    return rows


def checkpoint_overhead(cfg, steps: int, every: int) -> dict:
    spec, runner, state, batches = _setup(cfg)
    out = {}
    for mode in ("async", "sync"):
        with tempfile.TemporaryDirectory() as d:
            mngr = checkpoint.manager(d, keep=2)
            blocked, t0 = 0.0, time.perf_counter()
            for i in range(1, steps + 1):
                state, m = runner.train(state, batches[i % 4])
                if i % every == 0:
                    jax.block_until_ready(state)  # waiting for the step itself is not saving
                    t = time.perf_counter()
                    checkpoint.save(mngr, i, state, {"config": {}, "vocab": ""})
                    if mode == "sync":
                        checkpoint.wait(mngr)
                    blocked += time.perf_counter() - t
            jax.block_until_ready(state)
            checkpoint.wait(mngr)
            wall = time.perf_counter() - t0
            mngr.close()
        out[mode] = {"blocked_share": blocked / wall, "wall_s": wall}
    return out


def precision_ab(rounds: int) -> None:
    """The CPU config's step with bf16 and float32 matmuls, interleaved so the machine's drift hits both."""
    peak = matmul_rate()
    for r in range(rounds):
        for dtype in ("bfloat16", "float32"):
            cfg = cfg_of("shakespeare_char_cpu", f"model.matmul_dtype={dtype}")
            res = train_throughput(cfg, 60, peak, k=10)
            print(f"round {r}: {dtype} {res['step_ms']:.1f} ms/step ({100 * res['mfu']:.1f}% MFU)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run of the suite)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results.json"))
    parser.add_argument("--precision-ab", type=int, metavar="ROUNDS",
                        help="only the CPU config's step (10 per call), bf16 and float32 matmuls alternated ROUNDS times")
    parser.add_argument("--sampler-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sampler_only:
        return print(json.dumps(sampler_only(args.quick)))
    if args.precision_ab:
        return precision_ab(args.precision_ab)
    q = args.quick
    peak, peak_bf16 = matmul_rate(), matmul_rate(dtype=jnp.bfloat16)
    cpu, gpu = "shakespeare_char_cpu", "shakespeare_char"
    f32 = "model.matmul_dtype=float32"
    cpu_cfg = cfg_of(cpu)
    results = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "devices": [str(d) for d in jax.devices()]},
        "versions": {"jax": jax.__version__, "flax": __import__("flax").__version__, "python": platform.python_version()},
        "matmul_gflops": peak / 1e9,
        "matmul_gflops_bf16": peak_bf16 / 1e9,
        "train": {
            cpu: train_throughput(cfg_of(cpu), 10 if q else 60, peak, peak_bf16=peak_bf16),
            f"{cpu}_steps_per_call_10": train_throughput(cfg_of(cpu), 20 if q else 60, peak, k=10, peak_bf16=peak_bf16),
            f"{cpu}_fp32_steps_per_call_10": train_throughput(cfg_of(cpu, f32), 20 if q else 60, peak, k=10),
            gpu: train_throughput(cfg_of(gpu, "model.dropout=0"), 1 if q else 3, peak, repeats=1, peak_bf16=peak_bf16),
            f"{gpu}_fp32": train_throughput(cfg_of(gpu, "model.dropout=0", f32), 1 if q else 3, peak, repeats=1),
        },
        "matmul_floor": {cpu: matmul_floor(cfg_of(cpu), peak),
                         f"{cpu}_fp32": matmul_floor(cfg_of(cpu, f32), peak),
                         gpu: matmul_floor(cfg_of(gpu), peak, k=1, repeats=1 if q else 2),
                         f"{gpu}_fp32": matmul_floor(cfg_of(gpu, f32), peak, k=1, repeats=1 if q else 2)},
        "families": {
            "mnist_cnn": train_throughput(cfg_of("mnist_cnn"), 5 if q else 30, peak),
            "cifar10_cnn": train_throughput(cfg_of("cifar10_cnn"), 5 if q else 30, peak),
            "shakespeare_rnn": train_throughput(cfg_of("shakespeare_rnn"), 5 if q else 30, peak),
        },
        "compile_vs_depth": compile_vs_depth((2, 8) if q else (2, 4, 8, 16, 32), 2 if q else 5),
        "sampler": sampler_rows(q) | {
            # in this process, on every core: what a script of your own that samples after training gets
            "cached_batch1_all_cores": {**sampler_speed(cpu_cfg, 1, 100 if q else 500, True),
                                        "cpu_threads": runtime.cpu_thread_count()}},
        "checkpoint": checkpoint_overhead(cfg_of(cpu), 50 if q else 500, 10 if q else 250),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"fp32 matmul: {results['matmul_gflops']:.0f} GFLOP/s, bf16 (float32 accumulation): "
          f"{results['matmul_gflops_bf16']:.0f} ({results['machine']['cpus']} CPUs, jax {jax.__version__})")
    print("| train config | matmuls | steps/call | ms/step | tokens/s | MFU (6N+12LTD) | MFU causal | MFU vs bf16 rate "
          "| compile s |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in results["train"].items():
        vs_bf16 = f"{100 * r['mfu_vs_bf16_matmul']:.1f}%" if "mfu_vs_bf16_matmul" in r else ""
        print(f"| {name} | {r['matmul_dtype']} | {r['steps_per_call']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{100 * r['mfu']:.1f}% | {100 * r['mfu_causal']:.1f}% | {vs_bf16} | {r['compile_s']:.1f} |")
    for name, r in results["matmul_floor"].items():
        print(f"{name}: its dense matmuls alone ({r['matmul_dtype']}) take {r['step_ms']:.1f} ms/step "
              f"({r['matmul_gflops']:.0f} GFLOP/s), a ceiling of {100 * r['mfu']:.1f}% MFU for this step on XLA-CPU")
    print("| family config | ms/step | throughput | compile s |\n|---|---|---|---|")
    for name, r in results["families"].items():
        rate = f"{r['images_per_s']:.0f} images/s" if "images_per_s" in r else f"{r['tokens_per_s']:.0f} tokens/s"
        print(f"| {name} | {r['step_ms']:.1f} | {rate} | {r['compile_s']:.1f} |")
    print("| depth (CPU config width) | layers | compile s | step ms |\n|---|---|---|---|")
    for name, r in results["compile_vs_depth"].items():
        print(f"| {'scan' if r['scan_layers'] else 'unrolled'} | {r['n_layers']} | {r['compile_s']:.2f} | {r['step_ms']:.1f} |")
    print("| sampler (CPU config) | XLA-CPU threads | new tokens/s | prefill ms |\n|---|---|---|---|")
    for name, r in results["sampler"].items():
        print(f"| {name} | {r['cpu_threads']} | {r['new_tokens_per_s']:.0f} | "
              f"{r.get('prefill_ms', float('nan')):.2f} |")
    for mode, r in results["checkpoint"].items():
        print(f"checkpoint {mode}: {100 * r['blocked_share']:.2f}% of wall time blocked on saving")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
