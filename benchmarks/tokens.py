"""Token datasets: `python benchmarks/tokens.py [--prepare] [--memory] [--big-gb 4.2] [--gpt2]`.

--prepare: prepare.py's byte-level BPE on a 33 MB corpus (tiny Shakespeare 30 times, each copy's lines
  in another seeded order), timing the tokenizer's training and the encoding apart; MB/s of UTF-8 text.
--memory: the CPU recipe's training (`+experiment=shakespeare_char_cpu data=tokens`) on a token file of
  --big-gb GB and on one of 20 MB (random ids of its 65-character vocabulary: speed and memory do not
  depend on them), each in its own process: peak resident memory and the median tokens/s after warm-up.
--gpt2: a few steps of +experiment=owt_gpt2_124m (GPT-2 small, 1024-token windows, vocabulary 50,257) at
  batch 4 without gradient accumulation: the recipe is meant for accelerators, this only times it.
Speed is reported here, never asserted in tests. Files go under --dir (default: a temporary directory).
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def prepare_speed(workdir: str) -> dict:
    from omegaconf import OmegaConf

    from data import shards

    text = open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), encoding="utf-8").read().splitlines(keepends=True)
    corpus = os.path.join(workdir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for copy in range(30):
            lines = text[:]
            random.Random(copy).shuffle(lines)
            f.write("".join(lines))
    size = os.path.getsize(corpus)
    cfg = OmegaConf.structured(shards.Config(input=corpus, tokenizer="bpe", vocab_size=4096,
                                             dest=os.path.join(workdir, "bpe"), overwrite=True))
    timings = {}
    train_bpe = shards.tokenizers.train_bpe

    def timed_train(*a, **k):  # the tokenizer's training, timed apart from the encoding
        t0 = time.perf_counter()
        out = train_bpe(*a, **k)
        timings["train_s"] = time.perf_counter() - t0
        return out

    shards.tokenizers.train_bpe = timed_train
    t0 = time.perf_counter()
    meta, _ = shards.prepare(cfg)
    total = time.perf_counter() - t0
    encode_s = total - timings["train_s"]
    return {"corpus_bytes": size, "tokens": meta["train_tokens"] + meta["val_tokens"], "vocab_size": 4096,
            "train_tokenizer_s": timings["train_s"], "encode_s": encode_s, "total_s": total,
            "encode_MB_per_s": size / 1e6 / encode_s, "total_MB_per_s": size / 1e6 / total,
            "cores": os.cpu_count()}


def random_dataset(path: str, n_tokens: int, vocab: str = "") -> None:
    """A prepare.py-format dataset of random ids of `vocab` (default: tiny Shakespeare's characters)."""
    import numpy as np

    from data import shards

    os.makedirs(path, exist_ok=True)
    vocab = vocab or "".join(sorted(set(open(os.path.join(ROOT, "data", "tinyshakespeare.txt")).read())))
    rng, n_val = np.random.default_rng(0), 200_000
    for split, n in (("train", n_tokens), ("val", n_val)):
        with open(os.path.join(path, f"{split}.bin"), "wb") as f:
            for start in range(0, n, 1 << 26):
                f.write(rng.integers(0, len(vocab), min(1 << 26, n - start), dtype=np.uint16).tobytes())
    meta = {"format": shards.FORMAT, "dtype": "uint16", "vocab_size": len(vocab), "vocab": vocab, "tokenizer": "char",
            "train_tokens": n_tokens, "val_tokens": n_val, "train_bytes": n_tokens, "val_bytes": n_val}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)


def train_footprint(data_dir: str, out_dir: str, steps: int, experiment: str = "shakespeare_char_cpu",
                    extra: tuple = ()) -> dict:
    """Peak RSS (MB) and median tokens/s of a train.py run on `data_dir`, measured on its own process."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"+experiment={experiment}", "data=tokens",
           f"data.dir={data_dir}", f"out_dir={out_dir}", f"steps={steps}", f"eval_every={steps}", "eval_batches=2",
           f"ckpt_every={steps}", "progress=false", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"train.py failed: {err[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > steps // 5]
    return {"peak_rss_MB": usage.ru_maxrss / 1024, "tokens_per_s": statistics.median(rates), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--big-gb", type=float, default=4.2)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--gpt2", action="store_true")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    if not (args.prepare or args.memory or args.gpt2):
        args.prepare = args.memory = True
    workdir = args.dir or tempfile.mkdtemp(prefix="tokens_bench_")
    results = {}
    if args.prepare:
        r = results["prepare"] = prepare_speed(workdir)
        print(f"prepare, byte-level BPE {r['vocab_size']}: {r['corpus_bytes'] / 1e6:.1f} MB -> {r['tokens']:,} tokens; "
              f"tokenizer trained in {r['train_tokenizer_s']:.1f} s, encoded in {r['encode_s']:.1f} s "
              f"({r['encode_MB_per_s']:.1f} MB/s encoding, {r['total_MB_per_s']:.1f} MB/s overall, "
              f"{r['cores']} cores)")
    if args.memory:
        rows = {}
        for name, n in (("20MB", 10_000_000), (f"{args.big_gb:g}GB", int(args.big_gb * 1e9 / 2))):
            path = os.path.join(workdir, f"tokens_{name}")
            if not os.path.isfile(os.path.join(path, "meta.json")):
                random_dataset(path, n)
            rows[name] = train_footprint(path, os.path.join(workdir, f"run_{name}"), args.steps)
            rows[name]["file_GB"] = n * 2 / 1e9
            del rows[name]["rows"]
            print(f"train on a {n * 2 / 1e9:.2f} GB token file: peak RSS {rows[name]['peak_rss_MB']:.0f} MB, "
                  f"{rows[name]['tokens_per_s']:,.0f} tokens/s (median after warm-up, {args.steps} steps)")
        results["memory"] = rows
    if args.gpt2:
        path = os.path.join(workdir, "tokens_gpt2")
        if not os.path.isfile(os.path.join(path, "meta.json")):  # 50,257 distinct characters stand in for GPT-2's BPE
            random_dataset(path, 2_000_000, "".join(chr(c) for c in range(0x4E00, 0x4E00 + 50_257)))
        steps = 4
        r = train_footprint(path, os.path.join(workdir, "run_gpt2"), steps, "owt_gpt2_124m",
                            ("batch_size=4", "optim.grad_accum=1", "log_every=1", "steps_per_call=1"))
        times = [b["time_s"] - a["time_s"] for a, b in zip(r["rows"], r["rows"][1:])
                 if "train_loss" in a and "train_loss" in b]
        results["gpt2"] = {"s_per_step": min(times), "tokens_per_s": 4 * 1024 / min(times),
                           "peak_rss_MB": r["peak_rss_MB"], "first_step_s": r["rows"][0]["time_s"]}
        print(f"owt_gpt2_124m on this CPU, batch 4 x 1024: {min(times):.1f} s/step (best of {len(times)}), "
              f"{4 * 1024 / min(times):,.0f} tokens/s, peak RSS {r['peak_rss_MB']:,.0f} MB; first step (compile) "
              f"at {r['rows'][0]['time_s']:.0f} s")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
