"""serve.py under load: `python benchmarks/serve.py [out_dir=RUN] [requests=2000] [clients=32]`.

Starts the server on 127.0.0.1 (a free port) on a run of the CPU Shakespeare config (a 1-step one
made in a temp dir unless out_dir= names one: speed does not depend on the weights) and measures:
- latency of one 64-token completion at concurrency 1 (median of 20), against the same generation
  in-process with `sample.py`'s sampler (the same code, batch 1, best of 20);
- tokens/s with 1 and with 16 concurrent clients (each asking 64 tokens, back to back, for 10 s), and
  the server's decode chunk alone at batch 1 and 16 (no HTTP, no scheduler): what batching can pay here;
- a soak: `requests` completions from `clients` concurrent clients with mixed prompt lengths,
  max_tokens, temperatures, top_p, stop strings, n and streaming: errors, p50/p99 latency,
  compiles after start-up (from /metrics) and the server's resident memory at the start and after each
  quarter of the requests.
Prints a table and writes benchmarks/serve.json. Clients and server share this machine's cores.
"""
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def start(out_dir: str):
    proc = subprocess.Popen([sys.executable, "serve.py", f"out_dir='{out_dir}'", "port=0"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("ready:"):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, re.search(r"http://[\d.]+:\d+", line).group(0)
        if line.startswith("error"):
            sys.exit(line.strip())
    sys.exit("the server exited before it was ready")


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def in_process(out_dir: str, new: int = 64, repeats: int = 20) -> float:
    """Seconds for sample.py's generation of `new` tokens at batch 1, best of `repeats` (compile excluded)."""
    import jax
    import numpy as np
    from flax import nnx

    from core.sampler import compile_generate
    from core.state import load_run

    run = load_run(out_dir)
    generate = compile_generate(nnx.graphdef(run.model), max_new_tokens=new, temperature=0.0)
    prompt = np.zeros((1, 1), np.int32)
    args = (run.state["params"], run.state["rest"], prompt, jax.random.key(0))
    jax.block_until_ready(generate(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.device_get(generate(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def device_ceiling(out_dir: str, repeats: int = 20) -> dict:
    """Tokens/s of the server's own decode chunk at batch 1 and 16, with no HTTP and no scheduler:
    how much batching can pay on this machine at most."""
    import numpy as np

    from core.state import load_run
    from serving import programs

    run = load_run(out_dir)
    params, rest = run.state["params"], run.state["rest"]
    progs, cache, logits_SV = programs.build(run.model, params, rest, slots=16, chunk=8, max_prompt=16)
    key_X = programs.seed_key(progs, 0)
    out = {}
    for b in (1, 16):
        rows = (np.ones(b, np.int32), np.zeros(b, np.int32), np.stack([key_X] * b), np.ones(b, np.float32),
                np.zeros(b, np.int32), np.ones(b, np.float32))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            cache, logits_SV, tokens = progs.decode[b](params, rest, cache, logits_SV, *rows)
            np.asarray(tokens)
            best = min(best, time.perf_counter() - t)
        out[f"batch_{b}"] = round(b * progs.chunk / best)
    out["ratio"] = round(out["batch_16"] / out["batch_1"], 2)
    return out


def throughput(url: str, clients: int, seconds: float = 10.0) -> float:
    stop_at, counts = time.perf_counter() + seconds, [0] * clients

    def client(i):
        with httpx.Client(timeout=120) as c:
            while time.perf_counter() < stop_at:
                r = c.post(f"{url}/v1/completions", json={"prompt": "\n", "max_tokens": 64, "temperature": 1.0})
                counts[i] += r.json()["usage"]["completion_tokens"]

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return sum(counts) / (time.perf_counter() - t)


def soak(url: str, pid: int, requests: int, clients: int, text: str) -> dict:
    rng = random.Random(0)
    bodies = []
    for _ in range(requests):
        start = rng.randrange(len(text) - 300)
        body = {"prompt": text[start:start + rng.choice([1, 8, 32, 64])], "max_tokens": rng.choice([1, 16, 64, 128]),
                "temperature": rng.choice([0.0, 0.7, 1.0]), "top_p": rng.choice([1.0, 0.9]), "n": rng.choice([1, 1, 2]),
                "stream": rng.random() < 0.3, "seed": rng.randrange(1000)}
        if rng.random() < 0.3:
            body["stop"] = ["\n\n"]
        bodies.append(body)
    latencies, errors, rss = [], [], [rss_mb(pid)]

    def one(body):
        with httpx.Client(timeout=300) as c:
            t = time.perf_counter()
            r = c.post(f"{url}/v1/completions", json=body)
            ok = r.status_code == 200 and (not body["stream"] or r.text.rstrip().endswith("data: [DONE]"))
            (latencies if ok else errors).append(time.perf_counter() - t if ok else f"{r.status_code} {r.text[:200]}")

    compiles = metric(url, 'serve_compiles_total{phase="serving"}')
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for i, _ in enumerate(pool.map(one, bodies)):
            if (i + 1) % (requests // 4) == 0:
                rss.append(rss_mb(pid))
    wall = time.perf_counter() - t
    q = statistics.quantiles(latencies, n=100)
    for e in sorted(set(errors))[:5]:
        print(f"error: {e}", file=sys.stderr)
    return {"requests": requests, "clients": clients, "errors": len(errors), "wall_s": round(wall, 1),
            "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
            "compiles_after_startup": metric(url, 'serve_compiles_total{phase="serving"}') - compiles,
            "rss_mb_start_and_each_quarter": [round(x) for x in rss]}


def main(argv):
    args = dict(a.split("=", 1) for a in argv)
    out_dir = args.get("out_dir")
    if not out_dir:
        out_dir = os.path.join(tempfile.mkdtemp(), "run")
        subprocess.run([sys.executable, "train.py", "+experiment=shakespeare_char_cpu", "steps=1", "eval_every=1",
                        f"out_dir={out_dir}"], cwd=ROOT, check=True, capture_output=True)
    requests, clients = int(args.get("requests", 2000)), int(args.get("clients", 32))
    baseline, ceiling = in_process(out_dir), device_ceiling(out_dir)
    proc, url = start(out_dir)
    try:
        with httpx.Client(timeout=120) as c:
            body = {"prompt": "\n", "max_tokens": 64, "temperature": 0.0}
            c.post(f"{url}/v1/completions", json=body)
            times = []
            for _ in range(20):
                t = time.perf_counter()
                assert c.post(f"{url}/v1/completions", json=body).json()["usage"]["completion_tokens"] == 64
                times.append(time.perf_counter() - t)
        one, sixteen = throughput(url, 1), throughput(url, 16)
        text = open(os.path.join(ROOT, "data", "tinyshakespeare.txt")).read()
        result = {"latency_64_tokens_ms": {"server_median": round(statistics.median(times) * 1000, 1),
                                           "in_process_best": round(baseline * 1000, 1)},
                  "tokens_per_s": {"clients_1": round(one), "clients_16": round(sixteen),
                                   "ratio": round(sixteen / one, 2)},
                  "decode_chunk_tokens_per_s_no_http": ceiling,
                  "soak": soak(url, proc.pid, requests, clients, text)}
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    result["sigterm_exit_code"] = code
    result["command"] = " ".join(["python", "benchmarks/serve.py", *argv])
    print(json.dumps(result, indent=2))
    with open(os.path.join(ROOT, "benchmarks", "serve.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from core import runtime

    runtime.configure()  # the in-process baseline compiled as sample.py compiles it: core/runtime.py
    main(sys.argv[1:])
