"""Encoder MLM training tokens/s: our jitted step against Hugging Face's BertForMaskedLM, side by side.

`python benchmarks/encoder_torch.py [--steps 30] [--repeats 3] [--torch-python /work/torchvenv/bin/python]`

Both train the +experiment=sst2_mlm shapes (4 layers, 6 heads, width 192, MLP 768, seq 64, batch 128,
vocab 8000, dropout 0.1) on the same random rows ([CLS] tokens [SEP], every position real) masked by
tasks/mlm.py (15%, 80/10/10) with AdamW, on the same number of threads. PyTorch is not a dependency:
its side runs as a child process of `--torch-python` (an interpreter with torch and transformers),
`torch.set_num_threads(--threads)`. Ours runs as train.py does (core/runtime.py), steps_per_call=10
(the experiment's) and 1, with bf16 matmuls (the experiment's) and float32. BertForMaskedLM scores
the vocab at every position (its MLM head has no gather); ours only at the masked ones: part of the
gap is that design, part XLA. Prints one table; speed is reported here, never asserted in tests.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"layers": 4, "heads": 6, "width": 192, "mlp": 768, "seq": 64, "batch": 128, "vocab": 8000,
          "dropout": 0.1, "lr": 1e-3}


def batches(n: int, seed: int = 0) -> list:
    """n masked batches of random full-length sentences: {"x", "y", "w", "pos"} as tasks/mlm.py makes them."""
    import numpy as np

    sys.path.insert(0, ROOT)
    from data.wordpiece import CLS, SEP, SPECIALS
    from tasks import mlm

    rng = np.random.default_rng(seed)
    B, L, V = SHAPES["batch"], SHAPES["seq"], SHAPES["vocab"]
    out = []
    for i in range(n):
        ids = rng.integers(len(SPECIALS), V, (B, L)).astype(np.int32)
        ids[:, 0], ids[:, -1] = CLS, SEP
        out.append(mlm.mask_batch(ids, seed, 5, i, B, slice(None), V))
    return out


def time_steps(step, n_batches: int, steps: int, repeats: int, per_call: int = 1) -> float:
    """Best-of-`repeats` seconds per training step; `step(i)` runs `per_call` steps on batch i."""
    for i in range(2):
        step(i)  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(max(1, steps // per_call)):
            step(i % n_batches)
        best = min(best, (time.perf_counter() - t0) / (max(1, steps // per_call) * per_call))
    return best


def torch_side(args) -> dict:
    """(child process) BertForMaskedLM + AdamW: seconds per step."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = SHAPES
    cfg = transformers.BertConfig(vocab_size=s["vocab"], hidden_size=s["width"], num_hidden_layers=s["layers"],
                                  num_attention_heads=s["heads"], intermediate_size=s["mlp"],
                                  max_position_embeddings=s["seq"], type_vocab_size=1, hidden_act="gelu",
                                  hidden_dropout_prob=s["dropout"], attention_probs_dropout_prob=s["dropout"])
    model = transformers.BertForMaskedLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01)
    import numpy as np

    stored = np.load(args.batches)
    data = []
    for b in ({k: stored[f"{k}{i}"] for k in "xyw"} for i in range(4)):
        labels = torch.from_numpy(b["y"].astype("int64"))
        labels[torch.from_numpy(b["w"]) == 0] = -100  # scored at the masked positions only, like ours
        data.append((torch.from_numpy(b["x"].astype("int64")), labels))

    def step(i):
        x, labels = data[i]
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec = time_steps(step, len(data), args.steps, args.repeats)
    return {"step_s": sec, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "attention": model.config._attn_implementation}


def ours(args, matmul_dtype: str, per_call: int) -> float:
    """Our jitted train step (core/state.setup, as the loop builds it): seconds per step."""
    import jax
    from hydra import compose, initialize_config_dir

    from core import config
    from core.state import setup
    from tasks import mlm

    config.register()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=sst2_mlm", "mesh.data=1",
                                                      f"model.matmul_dtype={matmul_dtype}", f"optim.lr={SHAPES['lr']}"])
    built = setup(cfg, {"vocab_size": SHAPES["vocab"]}, mlm.loss)
    rows = batches(max(4, per_call))
    if per_call == 1:
        data, train = [built.runner.batch(r) for r in rows[:4]], built.runner.train
    else:
        data, train = [built.runner.stack(rows[:per_call])], built.runner.train_many
    state = [built.fresh_state()]

    def step(i):
        state[0], m = train(state[0], data[i % len(data)])
        jax.block_until_ready(m)

    return time_steps(step, len(data), args.steps, args.repeats, per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-python", default="/work/torchvenv/bin/python")
    parser.add_argument("--torch-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_side:
        print(json.dumps(torch_side(args)))
        return
    sys.path.insert(0, ROOT)
    from core import runtime

    runtime.configure()  # XLA's flags as train.py sets them, before JAX starts
    import jax
    import numpy as np

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as d:  # the same masked rows for both (the child has no JAX)
        path = os.path.join(d, "batches.npz")
        np.savez(path, **{f"{k}{i}": b[k] for i, b in enumerate(batches(4)) for k in "xyw"})
        proc = subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch-side", f"--steps={args.steps}",
                               f"--repeats={args.repeats}", f"--threads={args.threads}", f"--batches={path}"],
                              env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: the PyTorch side failed under {args.torch_python}: {proc.stderr.strip().splitlines()[-1:]}")
    t = json.loads(proc.stdout.strip().splitlines()[-1])

    tokens = SHAPES["batch"] * SHAPES["seq"]
    print(f"MLM training, {SHAPES}; {os.cpu_count()} CPUs, {args.threads} torch threads, jax {jax.__version__}, "
          f"torch {t['torch']}, transformers {t['transformers']} (attention: {t['attention']}); best of "
          f"{args.repeats} x {args.steps} steps")
    print(f"{'':44} {'ms/step':>8} {'tokens/s':>10} {'vs torch':>9}")
    print(f"{'PyTorch BertForMaskedLM, AdamW, float32':44} {t['step_s'] * 1e3:8.1f} {tokens / t['step_s']:10,.0f} {1:9.2f}")
    for dtype, per_call in (("bfloat16", 10), ("bfloat16", 1), ("float32", 10), ("float32", 1)):
        s = ours(args, dtype, per_call)
        name = f"ours, {dtype} matmuls, steps_per_call={per_call}"
        print(f"{name:44} {s * 1e3:8.1f} {tokens / s:10,.0f} {t['step_s'] / s:9.2f}", flush=True)


if __name__ == "__main__":
    main()
