"""Time to first result: whole `train.py` and `sample.py` commands, cold and warm: `python benchmarks/latency.py`.

Each command runs as a user's shell runs it (a child process, with no XLA_FLAGS, thread or cache
variables of this shell's), timed from start to exit:
- `train`: the CPU config, 10 steps and a 2-batch eval, into a fresh run directory each time;
- `sample`: 5 samples of 500 new tokens from that run, then 1 new token (start-up alone) and 5,000.
"Cold" gives a command an empty compilation cache (`compile_cache=DIR`, a new temporary directory);
"warm" runs it again on the cache the cold run filled. Every child runs with JAX_LOG_COMPILES=1, from
whose log each jitted program's compile seconds are read (trace + lowering + XLA; a program loaded
from the cache is marked so). Rounds alternate cold and warm; the table gives each figure's best
round, as this host's speed drifts (benchmarks/README.md).

nanoGPT's figures stand beside them when a PyTorch nanoGPT checkout is given (`--nanogpt DIR`, with
`torch` importable): its CPU recipe at the same shapes, the same commands. Without one the output says so.
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["+experiment=shakespeare_char_cpu", "steps=10", "eval_every=10", "eval_batches=2"]
SAMPLES = {"sample_500": ["num_samples=5", "max_new_tokens=500"],
           "sample_1": ["num_samples=5", "max_new_tokens=1"],
           "sample_5000": ["num_samples=5", "max_new_tokens=5000"]}
# The same commands for nanoGPT (its README's CPU recipe for shakespeare_char, at our shapes).
NANOGPT_MODEL = ["--device=cpu", "--compile=False", "--block_size=64", "--batch_size=12", "--n_layer=4",
                 "--n_head=4", "--n_embd=128", "--dropout=0.0"]
NANOGPT_TRAIN = ["config/train_shakespeare_char.py", *NANOGPT_MODEL, "--max_iters=10", "--lr_decay_iters=2000",
                 "--eval_interval=10", "--eval_iters=2", "--log_interval=10", "--always_save_checkpoint=True"]
NANOGPT_SAMPLE = {"sample_500": ["--num_samples=5", "--max_new_tokens=500"],
                  "sample_1": ["--num_samples=5", "--max_new_tokens=1"],
                  "sample_5000": ["--num_samples=5", "--max_new_tokens=5000"]}
EVENTS = (("trace", re.compile(r"Finished tracing (\S+) for jit in ([\d.e-]+) sec")),
          ("lower", re.compile(r"Finished jaxpr to MLIR module conversion jit\((\S+)\) in ([\d.e-]+) sec")),
          ("xla", re.compile(r"Finished XLA compilation of jit\((\S+)\) in ([\d.e-]+) sec")))
HIT = re.compile(r"Persistent compilation cache hit for 'jit_(\S+)'")


def user_env() -> dict:
    """This environment without what the mains decide themselves: as a user's shell starts them."""
    drop = ("XLA_FLAGS", "PJRT_NPROC", "NPROC", "GLIBC_TUNABLES")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("JAX_")}
    return env | {"JAX_LOG_COMPILES": "1", "JAX_PLATFORMS": "cpu"}


def timed(cmd: list[str], cwd: str, env: dict) -> dict:
    """Wall seconds of one whole command, and the compile seconds of each program it jitted."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    programs, hits = {}, set(HIT.findall(proc.stderr))
    for kind, pattern in EVENTS:
        for name, seconds in pattern.findall(proc.stderr):
            entry = programs.setdefault(name, {"trace": 0.0, "lower": 0.0, "xla": 0.0, "calls": 0})
            entry[kind] += float(seconds)
            entry["calls"] += kind == "xla"
    for name, entry in programs.items():
        entry["cached"] = name in hits
    return {"wall_s": wall, "compile_s": sum(e["trace"] + e["lower"] + e["xla"] for e in programs.values()),
            "programs": programs}


def ours(rounds: int, work: str) -> dict:
    """Every command cold then warm, `rounds` times; each round trains a fresh run to sample from."""
    env, py = user_env(), sys.executable
    out = {name: {"cold": [], "warm": []} for name in ["train", *SAMPLES]}
    for r in range(rounds):
        caches = {name: os.path.join(work, f"cache_{name}_{r}") for name in out}
        run_dir = None
        for phase in ("cold", "warm"):
            run_dir_now = os.path.join(work, f"run_{r}_{phase}")
            res = timed([py, "train.py", *TRAIN, f"out_dir={run_dir_now}", f"compile_cache={caches['train']}"],
                        ROOT, env)
            out["train"][phase].append(res)
            run_dir = run_dir or run_dir_now
        for name, args in SAMPLES.items():
            for phase in ("cold", "warm"):
                res = timed([py, "sample.py", f"out_dir={run_dir}", *args, f"compile_cache={caches[name]}"], ROOT, env)
                out[name][phase].append(res)
        print(f"round {r + 1}: " + ", ".join(f"{n} {v['cold'][-1]['wall_s']:.2f}/{v['warm'][-1]['wall_s']:.2f} s"
                                           for n, v in out.items()) + " (cold/warm)", file=sys.stderr, flush=True)
    return out


def nanogpt(path: str | None, rounds: int) -> dict | str:
    """nanoGPT's whole commands at the same shapes, or why they were not run."""
    if importlib.util.find_spec("torch") is None:
        return "not measured: PyTorch is not installed (nanoGPT needs it; this benchmark never installs it)"
    if not path or not os.path.isfile(os.path.join(path, "sample.py")):
        return "not measured: pass --nanogpt DIR, a checkout of karpathy/nanoGPT"
    data = os.path.join(path, "data", "shakespeare_char")
    if not os.path.exists(os.path.join(data, "train.bin")):  # prepare.py downloads input.txt unless it is there
        shutil.copy(os.path.join(ROOT, "data", "tinyshakespeare.txt"), os.path.join(data, "input.txt"))
        subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    out = {name: [] for name in ["train", *NANOGPT_SAMPLE]}
    for _ in range(rounds):
        run_dir = tempfile.mkdtemp(prefix="nanogpt_")
        out["train"].append(timed([sys.executable, "train.py", *NANOGPT_TRAIN, f"--out_dir={run_dir}"], path, env))
        for name, args in NANOGPT_SAMPLE.items():
            out[name].append(timed([sys.executable, "sample.py", f"--out_dir={run_dir}", "--device=cpu",
                                    "--compile=False", *args], path, env))
        shutil.rmtree(run_dir, ignore_errors=True)
    return {name: min(r["wall_s"] for r in rows) for name, rows in out.items()}


def best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nanogpt", metavar="DIR", help="a karpathy/nanoGPT checkout (needs torch)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "latency.json"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="latency_")
    try:
        results = {"command": " ".join(["python", *sys.argv]), "ours": ours(args.rounds, work),
                   "nanogpt": nanogpt(args.nanogpt, args.rounds)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    ref = results["nanogpt"]
    print(f"best of {args.rounds} rounds, whole process, seconds; nanoGPT: "
          f"{ref if isinstance(ref, str) else 'measured in the same run'}")
    print("| command | cold | warm | nanoGPT | compile s cold | compile s warm |\n|---|---|---|---|---|---|")
    for name, phases in results["ours"].items():
        cold, warm = best(phases["cold"]), best(phases["warm"])
        theirs = f"{ref[name]:.2f}" if isinstance(ref, dict) else "-"
        print(f"| {name} | {cold['wall_s']:.2f} | {warm['wall_s']:.2f} | {theirs} | {cold['compile_s']:.2f} | "
              f"{warm['compile_s']:.2f} |")
    print("| command | program | XLA compiles | cold: trace + lower + XLA s | warm s |\n|---|---|---|---|---|")
    for name, phases in results["ours"].items():
        cold, warm = best(phases["cold"])["programs"], best(phases["warm"])["programs"]
        for prog, c in sorted(cold.items(), key=lambda kv: -kv[1]["xla"]):
            w = warm.get(prog)
            how = "traced only" if w and not w["calls"] else "loaded" if w and w["cached"] else "compiled"
            warm_s = f"{w['trace'] + w['lower'] + w['xla']:.2f} ({how})" if w else "-"
            cold_s = f"{c['trace']:.2f} + {c['lower']:.2f} + {c['xla']:.2f}"
            print(f"| {name} | {prog} | {c['calls']} | {cold_s} | {warm_s} |")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
