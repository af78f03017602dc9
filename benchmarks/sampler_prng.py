"""Interleaved A/Bs of the sampler's draws (core/sampler.py) on the CPU config.

`python benchmarks/sampler_prng.py [--rounds 10] [--batch 1] [--tokens 500] [impl ...]` compares PRNG
impls (SAMPLING_PRNG); with `--ahead-ab`, the current impl with its Gumbel noise drawn ahead of each decode
segment (NOISE_AHEAD, the default) against drawn one step at a time. Prints per variant the per-step
decode time in every round (best of 3 calls each), then min and median. Rounds alternate the variants
so that this machine's drift hits them alike. Every variant samples the same tokens.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core import runtime  # noqa: E402

if __name__ == "__main__":
    runtime.configure()  # as the mains do, before JAX is imported: core/runtime.py

import run as bench  # noqa: E402

import jax  # noqa: E402

from core import sampler  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("impls", nargs="*", default=["threefry2x32", sampler.SAMPLING_PRNG])
    parser.add_argument("--ahead-ab", action="store_true", help="noise drawn ahead vs per step, current impl")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=500)
    args = parser.parse_args()
    spec, state = bench.lm_state(bench.cfg_of("shakespeare_char_cpu"))
    ahead = sampler.NOISE_AHEAD
    variants = ({"noise ahead": (sampler.SAMPLING_PRNG, ahead), "noise per step": (sampler.SAMPLING_PRNG, 0)}
                if args.ahead_ab else {impl: (impl, ahead) for impl in args.impls})
    calls = {}
    for name, (impl, budget) in variants.items():  # both are read when each function is traced, here
        sampler.SAMPLING_PRNG, sampler.NOISE_AHEAD = impl, budget
        calls[name] = bench.generate_call(spec, state, args.batch, args.tokens)
    if args.ahead_ab:
        same = calls["noise ahead"](jax.random.key(0)) == calls["noise per step"](jax.random.key(0))
        assert same.all(), "noise drawn ahead changed the tokens"
    us = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            us[name].append(1e6 * min(bench._timed(call) for _ in range(3)) / args.tokens)
    for name, v in us.items():
        print(f"{name:14s} batch {args.batch}: " + " ".join(f"{x:.1f}" for x in v)
              + f"  min {min(v):.1f}  median {sorted(v)[len(v) // 2]:.1f} us per step")


if __name__ == "__main__":
    main()
