"""The batch-1 sampler with XLA-CPU's small-loop hoisting off and on: `python benchmarks/small_loops.py [--rounds 3]`.

`--threads-ab` instead runs it (hoisting on) with XLA-CPU's thread pool at every core and at one thread
(core/runtime.py: cpu_threads, which sample.py applies to small models); `--batch 16` for batch 16.

core/runtime.py raises `xla_cpu_small_while_loop_byte_threshold` from XLA's 1024 bytes to 16 MiB, so
the CPU config's batch-1 decode loop compiles into one function instead of running kernel by kernel.
XLA reads the option once per process, so each round runs two child processes back to back, off then
on. Each child compiles the sampler (500 new tokens after a 1-token prompt, temperature 1), then times
calls for `--seconds`, and reports its compile time, its best and median call, and the CPU time the
hypervisor stole meanwhile (/proc/stat), which is what makes this host's figures drift.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core import runtime  # noqa: E402  (no JAX import: the parent stays light)

OFF = runtime.flag(runtime.XLA_DEFAULT)


def child(seconds: float, new_tokens: int, batch: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    runtime.apply()  # the small-loop threshold, unless XLA_FLAGS already holds the option (the "off" child)
    import run as bench

    spec, state = bench.lm_state(bench.cfg_of("shakespeare_char_cpu"))
    t0 = time.perf_counter()
    call = bench.generate_call(spec, state, batch, new_tokens)  # compiles, then one call
    compile_s = time.perf_counter() - t0
    steal0, times = _steal_ticks(), []
    while len(times) < 5 or sum(times) < seconds:
        times.append(bench._timed(call))
    times.sort()
    print(json.dumps({"threshold": runtime.small_loop_bytes(), "threads": runtime.cpu_thread_count(),
                      "compile_s": compile_s, "best_s": times[0],
                      "median_s": times[len(times) // 2], "tokens_per_s": batch * new_tokens / times[0],
                      "steal_s": (_steal_ticks() - steal0) / os.sysconf("SC_CLK_TCK"), "calls": len(times)}))


def _steal_ticks() -> int:
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8])
    except (OSError, IndexError, ValueError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="of calls per child")
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads-ab", action="store_true", help="every core vs one thread, hoisting on")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.seconds, args.new_tokens, args.batch)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", *runtime.THREAD_VARS)}
    variants = ((("all cores", env), ("1 thread", {**env, runtime.THREAD_VARS[0]: "1"})) if args.threads_ab
                else (("off", {**env, "XLA_FLAGS": OFF}), ("on", env)))
    results = {name: [] for name, _ in variants}
    for r in range(args.rounds):
        for name, child_env in variants:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--seconds", str(args.seconds),
                                   "--new-tokens", str(args.new_tokens), "--batch", str(args.batch)],
                                  env=child_env, capture_output=True, text=True, check=True)
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name].append(out)
            print(f"round {r + 1} {name:9s} (threshold {out['threshold']:>8d} B, {out['threads']} threads): compile "
                  f"{out['compile_s']:5.1f} s, best {1e3 * out['best_s']:6.2f} ms = {out['tokens_per_s']:6.0f} tokens/s, median "
                  f"{1e3 * out['median_s']:6.2f} ms, {out['steal_s']:4.2f} s stolen over {out['calls']} calls", flush=True)
    for name, rows in results.items():
        print(f"{name}: best {max(r['tokens_per_s'] for r in rows):.0f} tokens/s, "
              f"best of medians {args.batch * args.new_tokens / min(r['median_s'] for r in rows):.0f}, "
              f"compile {min(r['compile_s'] for r in rows):.1f} s")


if __name__ == "__main__":
    main()
