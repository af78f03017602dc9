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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (sets up the path and huge pages first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from core import mesh as mesh_lib, sampler  # noqa: E402
from core.state import state_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("impls", nargs="*", default=["threefry2x32", sampler.SAMPLING_PRNG])
    parser.add_argument("--ahead-ab", action="store_true", help="noise drawn ahead vs per step, current impl")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=500)
    args = parser.parse_args()
    cfg = bench.cfg_of("shakespeare_char_cpu")
    spec = state_spec(cfg, {"vocab_size": bench.VOCAB}, mesh_lib.make_mesh(cfg.mesh))
    state = jax.jit(spec.make_state)()
    prompt = jnp.zeros((args.batch, 1), jnp.int32)
    ahead = sampler.NOISE_AHEAD
    variants = ({"noise ahead": (sampler.SAMPLING_PRNG, ahead), "noise per step": (sampler.SAMPLING_PRNG, 0)}
                if args.ahead_ab else {impl: (impl, ahead) for impl in args.impls})
    gens, tokens = {}, {}
    for name, (impl, budget) in variants.items():  # both are read when each function is traced, here
        sampler.SAMPLING_PRNG, sampler.NOISE_AHEAD = impl, budget
        gens[name] = sampler.compile_generate(spec.graphdef, max_new_tokens=args.tokens, temperature=1.0, top_k=0,
                                              top_p=1.0)
        tokens[name] = gens[name](state["params"], state["rest"], prompt, jax.random.key(0)).block_until_ready()
    if args.ahead_ab:
        assert (tokens["noise ahead"] == tokens["noise per step"]).all(), "noise drawn ahead changed the tokens"
    us = {name: [] for name in gens}
    for _ in range(args.rounds):
        for name, gen in gens.items():
            call = lambda: gen(state["params"], state["rest"], prompt, jax.random.key(1)).block_until_ready()  # noqa: E731
            us[name].append(1e6 * min(bench._timed(call) for _ in range(3)) / args.tokens)
    for name, v in us.items():
        print(f"{name:14s} batch {args.batch}: " + " ".join(f"{x:.1f}" for x in v)
              + f"  min {min(v):.1f}  median {sorted(v)[len(v) // 2]:.1f} us per step")


if __name__ == "__main__":
    main()
